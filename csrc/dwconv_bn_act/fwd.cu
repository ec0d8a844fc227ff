// dwconv_bn_act_fwd: launch. bf16/fp16 channels_last with 16-byte vectors at stride 1 or 2, dilation 1 on sm_80+:
// fwd_mma_kernel (tensor cores, mma_fwd.cuh; the one switch is use_mma_fwd). Else channels_last with 16-byte
// vectors: fwd_band_kernel (staged band tiles); otherwise
// fwd_kernel (NCHW, or channels_last with C % V != 0 / unaligned bases), for 3 dtypes x 3 kernel sizes x 2 column
// patterns, and two strip widths in channels_last at column pattern 1.
#include "common/cuda_check.cuh"
#include "common/dispatch.h"
#include "dwconv_bn_act/kernels.cuh"
#include "dwconv_bn_act/launch.h"
#include "dwconv_bn_act/mma_fwd.cuh"

namespace mnet {

void dw_fwd_cuda(const DwParams& p, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  MNET_DISPATCH_DTYPE(p.dtype, __half, __nv_bfloat16, T, [&] {
    MNET_DISPATCH_KSIZE(p.k, K, [&] {
      if constexpr (sizeof(T) == 2) {
        if (dev::use_mma_fwd<T>(p)) {
          dev::launch_mma_fwd<T, K>(p, s);
          return;
        }
      }
      MNET_DISPATCH_BOOL(strip_j(p.stride, p.dilation) == 2, J2, [&] {
        constexpr int J = J2 ? 2 : 1;
        if (dev::full_vectors<T>(p, {p.x, p.y})) {  // channels_last, 16-byte vectors: staged band tiles
          dev::launch_band_kernel<T, J, K>(p, false, 2, s, [&](auto tw, auto whole) {  // 2 rows: scale, shift
            return dev::fwd_band_kernel<T, K, J, decltype(tw)::value, decltype(whole)::value>;
          });
          return;
        }
        const TilePlan t = dev::launch_plan(p, (int)sizeof(T));
        const dim3 grid(dev::fwd_blocks(t), (unsigned)t.lg.groups);
        const unsigned threads = (unsigned)(t.lg.lanes * t.lg.walkers);
        const size_t smem = dev::param_smem_bytes(K, t.V, 2, t.lg.lanes);  // weights, scale, shift
        MNET_DISPATCH_BOOL(p.channels_last, CL, [&] {  // FULL = false: NCHW, or C % V != 0 / unaligned
          dev::launch_strips<CL, J, K>(t, [&](auto tw) {
            constexpr int TW = decltype(tw)::value;
            dev::allow_smem(dev::fwd_kernel<T, K, J, CL, false, TW>, smem);
            dev::fwd_kernel<T, K, J, CL, false, TW><<<grid, threads, smem, s>>>(p, t);
          });
        });
      });
    });
  });
  MNET_CUDA_CHECK_LAUNCH();
}

}  // namespace mnet
