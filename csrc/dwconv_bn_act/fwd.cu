// dwconv_bn_act_fwd: launch (fwd_kernel for 3 dtypes x 3 kernel sizes x 2 column patterns x 3 layout variants,
// and for channels_last at K = 3 and 5 with column pattern 1 two strip widths).
#include <stdexcept>
#include <type_traits>

#include "common/cuda_check.cuh"
#include "common/dispatch.h"
#include "dwconv_bn_act/kernels.cuh"
#include "dwconv_bn_act/launch.h"

namespace mnet {

void dw_fwd_cuda(const DwParams& p, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  MNET_DISPATCH_DTYPE(p.dtype, __half, __nv_bfloat16, T, [&] {
    const TilePlan t = dev::launch_plan(p, (int)sizeof(T), true);
    const dim3 grid(dev::fwd_blocks(t), (unsigned)t.lg.groups);
    const unsigned threads = (unsigned)(t.lg.lanes * t.lg.walkers);
    MNET_DISPATCH_KSIZE(p.k, K, [&] {
      const size_t smem = dev::param_smem_bytes(K, t.V, 2, t.lg.lanes);  // weights, scale, shift
      MNET_DISPATCH_BOOL(strip_j(p.stride, p.dilation) == 2, J2, [&] {
        MNET_DISPATCH_LAYOUT(p.channels_last, dev::full_vectors<T>(p, {p.x, p.y}), CL, FULL, [&] {
          constexpr int J = J2 ? 2 : 1;
          const auto launch = [&](auto tw) {
            constexpr int TW = decltype(tw)::value;
            if (t.TW != TW) throw std::logic_error("mnet_ext: fwd strip width differs from the tile plan's");
            dev::allow_smem(dev::fwd_kernel<T, K, J, CL, FULL, TW>, smem);
            dev::fwd_kernel<T, K, J, CL, FULL, TW><<<grid, threads, smem, s>>>(p, t);
          };
          // The strip widths tile.h's fwd_tile_width picks for this (layout, K, column pattern).
          if constexpr (!fwd_wide(CL, K)) {
            launch(std::integral_constant<int, reduce_tile_width(CL, J)>{});
          } else if (J == 1 && t.TW == kFwdLongTW) {
            launch(std::integral_constant<int, J == 1 ? kFwdLongTW : kFwdTW>{});
          } else {
            launch(std::integral_constant<int, kFwdTW>{});
          }
        });
      });
    });
  });
  MNET_CUDA_CHECK_LAUNCH();
}

}  // namespace mnet
