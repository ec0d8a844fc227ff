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

int64_t dw_stats_workspace(const DwParams& p) {
  return MNET_DISPATCH_DTYPE(p.dtype, __half, __nv_bfloat16, T, [&] {
    return 3 * p.C * dev::launch_plan(p, (int)sizeof(T)).nchunks;
  });
}

void dw_stats_cuda(const DwParams& p, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  int64_t nchunks = 1;
  MNET_DISPATCH_DTYPE(p.dtype, __half, __nv_bfloat16, T, [&] {
    const TilePlan t = dev::launch_plan(p, (int)sizeof(T));
    nchunks = t.nchunks;
    const dim3 grid((unsigned)t.nchunks, (unsigned)t.lg.groups);
    const unsigned threads = (unsigned)(t.lg.lanes * t.lg.walkers);
    MNET_DISPATCH_KSIZE(p.k, K, [&] {
      const size_t smem = dev::param_smem_bytes(K, t.V, 0, t.lg.lanes);
      MNET_DISPATCH_BOOL(strip_j(p.stride, p.dilation) == 2, J2, [&] {
        MNET_DISPATCH_LAYOUT(p.channels_last, dev::full_vectors<T>(p, {p.x}), CL, FULL, [&] {
          constexpr int J = J2 ? 2 : 1;
          dev::launch_strips<CL, J, K>(t, [&](auto tw) {
            constexpr int TW = decltype(tw)::value;
            dev::allow_smem(dev::stats_partial_kernel<T, K, J, CL, FULL, TW>, smem);
            dev::stats_partial_kernel<T, K, J, CL, FULL, TW><<<grid, threads, smem, s>>>(p, t);
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
