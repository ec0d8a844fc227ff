// dwconv_bn_act_bwd_reduce: per-(chunk, channel) partial sums of g and g*xhat, then a fixed-order sum.
#include "common/cuda_check.cuh"
#include "common/dispatch.h"
#include "dwconv_bn_act/kernels.cuh"
#include "dwconv_bn_act/launch.h"

namespace mnet {
namespace dev {

// out0[c], out1[c] = the sums over the chunks of the two components (sum g, sum g*xhat), in double.
struct SumD2 {
  double a, b;
};

__global__ void __launch_bounds__(kFinalLanes* kFinalWalkers)
    sum2_final_kernel(const float* __restrict__ part, int64_t nchunks, int64_t C, float* out0, float* out1) {
  __shared__ SumD2 tree[kFinalLanes * kFinalWalkers];
  const int lane = threadIdx.x % kFinalLanes, walker = threadIdx.x / kFinalLanes;
  const int64_t c = (int64_t)blockIdx.x * kFinalLanes + lane, nc = nchunks * C;
  SumD2 acc{0.0, 0.0};
  if (c < C)
    for (int64_t j = walker; j < nchunks; j += kFinalWalkers) {
      acc.a += part[j * C + c];
      acc.b += part[nc + j * C + c];
    }
  acc = block_tree(acc, tree, kFinalLanes, kFinalWalkers,
                   [](const SumD2& a, const SumD2& b) { return SumD2{a.a + b.a, a.b + b.b}; });
  if (walker == 0 && c < C) {
    out0[c] = (float)acc.a;
    out1[c] = (float)acc.b;
  }
}

}  // namespace dev

int64_t dw_bwd_reduce_workspace(const DwParams& p) {
  return MNET_DISPATCH_DTYPE(p.dtype, __half, __nv_bfloat16, T, [&] {
    return 2 * p.C * dev::launch_plan(p, (int)sizeof(T)).nchunks;
  });
}

void dw_bwd_reduce_cuda(const DwParams& p, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  int64_t nchunks = 1;
  MNET_DISPATCH_DTYPE(p.dtype, __half, __nv_bfloat16, T, [&] {
    const TilePlan t = dev::launch_plan(p, (int)sizeof(T));
    nchunks = t.nchunks;
    const dim3 grid((unsigned)t.nchunks, (unsigned)t.lg.groups);
    const unsigned threads = (unsigned)(t.lg.lanes * t.lg.walkers);
    MNET_DISPATCH_KSIZE(p.k, K, [&] {
      const size_t smem = dev::param_smem_bytes(K, t.V, 4, t.lg.lanes);
      MNET_DISPATCH_BOOL(strip_j(p.stride, p.dilation) == 2, J2, [&] {
        MNET_DISPATCH_LAYOUT(p.channels_last, dev::full_vectors<T>(p, {p.x, p.grad_y}), CL, FULL, [&] {
          constexpr int J = J2 ? 2 : 1;
          dev::launch_strips<CL, J, K>(t, [&](auto tw) {
            constexpr int TW = decltype(tw)::value;
            dev::allow_smem(dev::bwd_reduce_partial_kernel<T, K, J, CL, FULL, TW>, smem);
            dev::bwd_reduce_partial_kernel<T, K, J, CL, FULL, TW><<<grid, threads, smem, s>>>(p, t);
          });
        });
      });
    });
  });
  MNET_CUDA_CHECK_LAUNCH();
  dev::sum2_final_kernel<<<dev::final_blocks(p.C), dev::kFinalLanes * dev::kFinalWalkers, 0, s>>>(
      p.work, nchunks, p.C, p.out0, p.out1);
  MNET_CUDA_CHECK_LAUNCH();
}

}  // namespace mnet
