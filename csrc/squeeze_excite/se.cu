// squeeze_excite launches: se_pool, se_scale, se_bwd_reduce, se_bwd_apply.
#include "common/cuda_check.cuh"
#include "common/dispatch.h"
#include "squeeze_excite/kernels.cuh"
#include "squeeze_excite/launch.h"

namespace mnet {
namespace {

constexpr int64_t kPixelsPerWalker = 8;  // se_affine: pixels one walker handles per block

template <bool PROD>
void reduce(const SeParams& p, const void* a, const void* b, float scale, cudaStream_t s) {
  MNET_DISPATCH_DTYPE(p.dtype, __half, __nv_bfloat16, T, [&] {
    const LaneGeom g = lane_geom(p.C, tile_vec((int)sizeof(T), p.channels_last), p.channels_last, dev::kThreads);
    const unsigned blocks = (unsigned)(p.N * g.groups), threads = (unsigned)(g.lanes * g.walkers);
    MNET_DISPATCH_LAYOUT(p.channels_last, dev::full_vectors<T>(p.channels_last, p.C, {a, b}), CL, FULL, [&] {
      dev::se_reduce_kernel<T, CL, FULL, PROD><<<blocks, threads, 0, s>>>(p, static_cast<const T*>(a),
                                                                           static_cast<const T*>(b), scale, g);
    });
  });
  MNET_CUDA_CHECK_LAUNCH();
}

void affine(const SeParams& p, const void* a, const float* t, float tdiv, cudaStream_t s) {
  MNET_DISPATCH_DTYPE(p.dtype, __half, __nv_bfloat16, T, [&] {
    const LaneGeom g = lane_geom(p.C, tile_vec((int)sizeof(T), p.channels_last), p.channels_last, dev::kThreads);
    const int64_t chunk = g.walkers * kPixelsPerWalker, HW = p.H * p.W;
    const dim3 grid((unsigned)(p.N * g.groups), (unsigned)((HW + chunk - 1) / chunk));
    const unsigned threads = (unsigned)(g.lanes * g.walkers);
    MNET_DISPATCH_LAYOUT(p.channels_last, dev::full_vectors<T>(p.channels_last, p.C, {a, p.y}), CL, FULL, [&] {
      dev::se_affine_kernel<T, CL, FULL><<<grid, threads, 0, s>>>(p, static_cast<const T*>(a), t, tdiv, g, chunk);
    });
  });
  MNET_CUDA_CHECK_LAUNCH();
}

}  // namespace

void se_pool_cuda(const SeParams& p, void* stream) {
  reduce<false>(p, p.x, p.x, 1.0f / (float)(p.H * p.W), static_cast<cudaStream_t>(stream));
}

void se_bwd_reduce_cuda(const SeParams& p, void* stream) {
  reduce<true>(p, p.grad_y, p.x, 1.0f, static_cast<cudaStream_t>(stream));
}

void se_scale_cuda(const SeParams& p, void* stream) {
  affine(p, p.x, nullptr, 1.0f, static_cast<cudaStream_t>(stream));
}

void se_bwd_apply_cuda(const SeParams& p, void* stream) {
  affine(p, p.grad_y, p.dpooled, (float)(p.H * p.W), static_cast<cudaStream_t>(stream));
}

}  // namespace mnet
