// dwconv_bn_stats: per-(chunk, channel) Welford partials, then a deterministic Chan combine per channel.
#include "common/cuda_check.cuh"
#include "common/dispatch.h"
#include "dwconv_bn_act/kernels.cuh"
#include "dwconv_bn_act/launch.h"

namespace mnet {
namespace dev {

// mean and biased variance from the Welford partials.
__global__ void __launch_bounds__(kFinalLanes* kFinalWalkers)
    stats_final_kernel(const float* __restrict__ part, int64_t nchunks, int64_t C, float* mean, float* var) {
  __shared__ WelfordD tree[kFinalLanes * kFinalWalkers];
  const int lane = threadIdx.x % kFinalLanes, walker = threadIdx.x / kFinalLanes;
  const int64_t c = (int64_t)blockIdx.x * kFinalLanes + lane, nc = nchunks * C;
  WelfordD acc{0.0, 0.0, 0.0};
  if (c < C)
    for (int64_t j = walker; j < nchunks; j += kFinalWalkers) {
      const float* q = part + j * C + c;
      acc = welford_combine(acc, (double)q[0], (double)q[nc], (double)q[2 * nc]);
    }
  acc = block_tree(acc, tree, kFinalLanes, kFinalWalkers,
                   [](const WelfordD& a, const WelfordD& b) { return welford_combine(a, b.count, b.mean, b.m2); });
  if (walker == 0 && c < C) {
    mean[c] = (float)acc.mean;
    var[c] = acc.count > 0.0 ? (float)(acc.m2 / acc.count) : 0.0f;
  }
}

}  // namespace dev

// Partials of the staged kernel (channels_last, 16-byte vectors) or the strip kernel: room for either, since the
// choice also depends on the alignment of x.
int64_t dw_stats_workspace(const DwParams& p) {
  return MNET_DISPATCH_DTYPE(p.dtype, __half, __nv_bfloat16, T, [&] {
    int64_t nchunks = dev::launch_plan(p, (int)sizeof(T)).nchunks;
    if (p.channels_last) {
      const int64_t staged = dev::band_launch_plan(p, (int)sizeof(T), true).nchunks;
      nchunks = staged > nchunks ? staged : nchunks;
    }
    return 3 * p.C * nchunks;
  });
}

void dw_stats_cuda(const DwParams& p, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  int64_t nchunks = 1;
  MNET_DISPATCH_DTYPE(p.dtype, __half, __nv_bfloat16, T, [&] {
    MNET_DISPATCH_KSIZE(p.k, K, [&] {
      MNET_DISPATCH_BOOL(strip_j(p.stride, p.dilation) == 2, J2, [&] {
        constexpr int J = J2 ? 2 : 1;
        if (dev::full_vectors<T>(p, {p.x})) {  // channels_last, 16-byte vectors: staged band tiles
          nchunks = dev::launch_band_kernel<T, J, K>(p, true, 0, s, [&](auto tw, auto whole) {  // weights only
                      return dev::stats_band_kernel<T, K, J, decltype(tw)::value, decltype(whole)::value>;
                    }).nchunks;
          return;
        }
        const TilePlan t = dev::launch_plan(p, (int)sizeof(T));
        nchunks = t.nchunks;
        const dim3 grid((unsigned)t.nchunks, (unsigned)t.lg.groups);
        const unsigned threads = (unsigned)(t.lg.lanes * t.lg.walkers);
        const size_t smem = dev::param_smem_bytes(K, t.V, 0, t.lg.lanes);
        MNET_DISPATCH_BOOL(p.channels_last, CL, [&] {  // FULL = false: NCHW, or C % V != 0 / unaligned
          dev::launch_strips<CL, J, K>(t, [&](auto tw) {
            constexpr int TW = decltype(tw)::value;
            dev::allow_smem(dev::stats_partial_kernel<T, K, J, CL, false, TW>, smem);
            dev::stats_partial_kernel<T, K, J, CL, false, TW><<<grid, threads, smem, s>>>(p, t);
          });
        });
      });
    });
  });
  MNET_CUDA_CHECK_LAUNCH();
  dev::stats_final_kernel<<<dev::final_blocks(p.C), dev::kFinalLanes * dev::kFinalWalkers, 0, s>>>(
      p.work, nchunks, p.C, p.out0, p.out1);
  MNET_CUDA_CHECK_LAUNCH();
}

}  // namespace mnet
