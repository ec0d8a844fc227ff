// squeeze_excite launches: se_pool, se_scale, se_bwd_reduce, se_bwd_apply.
#include "common/cuda_check.cuh"
#include "common/dispatch.h"
#include "squeeze_excite/kernels.cuh"
#include "squeeze_excite/launch.h"

namespace mnet {
namespace {

template <bool PROD>
void reduce(const SeParams& p, const void* a, const Strides4& as, const void* b, const Strides4& bs, float scale,
            cudaStream_t s) {
  const int64_t L = p.channels_last ? 32 : 1;
  const unsigned blocks = (unsigned)(p.N * ((p.C + L - 1) / L));
  MNET_DISPATCH_DTYPE(p.dtype, __half, __nv_bfloat16, T, [&] {
    MNET_DISPATCH_BOOL(p.channels_last, CL, [&] {
      dev::se_reduce_kernel<T, CL, PROD><<<blocks, dev::kThreads, 0, s>>>(
          p, static_cast<const T*>(a), as, static_cast<const T*>(b), bs, scale);
    });
  });
  MNET_CUDA_CHECK_LAUNCH();
}

void affine(const SeParams& p, const void* a, const Strides4& as, const float* t, float tdiv, cudaStream_t s) {
  const unsigned blocks = dev::elementwise_blocks(p.N * p.C * p.H * p.W);
  MNET_DISPATCH_DTYPE(p.dtype, __half, __nv_bfloat16, T, [&] {
    MNET_DISPATCH_BOOL(p.channels_last, CL, [&] {
      dev::se_affine_kernel<T, CL><<<blocks, dev::kThreads, 0, s>>>(p, static_cast<const T*>(a), as, t, tdiv);
    });
  });
  MNET_CUDA_CHECK_LAUNCH();
}

}  // namespace

void se_pool_cuda(const SeParams& p, void* stream) {
  reduce<false>(p, p.x, p.xs, p.x, p.xs, 1.0f / (float)(p.H * p.W), static_cast<cudaStream_t>(stream));
}

void se_bwd_reduce_cuda(const SeParams& p, void* stream) {
  reduce<true>(p, p.grad_y, p.gs, p.x, p.xs, 1.0f, static_cast<cudaStream_t>(stream));
}

void se_scale_cuda(const SeParams& p, void* stream) {
  affine(p, p.x, p.xs, nullptr, 1.0f, static_cast<cudaStream_t>(stream));
}

void se_bwd_apply_cuda(const SeParams& p, void* stream) {
  affine(p, p.grad_y, p.gs, p.dpooled, (float)(p.H * p.W), static_cast<cudaStream_t>(stream));
}

}  // namespace mnet
