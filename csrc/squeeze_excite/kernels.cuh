// CUDA kernels of the squeeze_excite primitives (plain CUDA, no ATen).
//
// A block is lanes x walkers (dwconv_bn_act/tile.h: lane_geom): a lane is a vector of V channels (16 bytes in
// channels_last, FULL when C % V == 0 and the bases are aligned; one channel in NCHW), walkers step over the H*W
// pixels of one image. grid.x = N * channel groups; grid.y = pixel chunks (se_affine) or 1 (se_reduce: a block
// walks every pixel, walkers combine by the fixed tree: deterministic, one pass, no atomics). Tensors are dense in
// the layout (op.cpp), so pixel i of (n, c) sits at n*HW*C + i*C + c (channels_last) or (n*C + c)*HW + i (NCHW): a
// walker advances a pointer, no division per element; per-(n, c) values are loaded once per thread.
#pragma once

#include <stdint.h>

#include "common/device.cuh"
#include "dwconv_bn_act/tile.h"
#include "squeeze_excite/params.h"

namespace mnet {
namespace dev {

struct SeLane {
  int64_t n, c0, base, step;  // image, first channel, element offset of pixel `walker`, pointer step
  int valid, walker;
};

template <bool CL>
MNET_DEVICE SeLane se_lane(const SeParams& p, const LaneGeom& g, int V) {
  SeLane l;
  const int lane = threadIdx.x % g.lanes;
  l.walker = threadIdx.x / g.lanes;
  l.n = blockIdx.x / g.groups;
  const int64_t group = blockIdx.x - l.n * g.groups;
  l.c0 = (group * g.lanes + lane) * V;
  const int64_t left = p.C - l.c0, HW = p.H * p.W;
  l.valid = left <= 0 || l.walker >= g.walkers ? 0 : (left < V ? (int)left : V);
  l.base = CL ? (l.n * HW + l.walker) * p.C + l.c0 : (l.n * p.C + l.c0) * HW + l.walker;
  l.step = CL ? (int64_t)g.walkers * p.C : g.walkers;
  return l;
}

// out[n, c] = scale * sum_hw a (* b), a and b in the same layout.
template <typename T, bool CL, bool FULL, bool PROD>
__global__ void __launch_bounds__(kThreads) se_reduce_kernel(const SeParams p, const T* __restrict__ a,
                                                             const T* __restrict__ b, float scale, LaneGeom g) {
  constexpr int V = tile_vec((int)sizeof(T), CL);
  __shared__ float tree[kThreads];
  const SeLane l = se_lane<CL>(p, g, V);
  float acc[V];
#pragma unroll
  for (int v = 0; v < V; ++v) acc[v] = 0.0f;
  if (l.valid > 0) {
    const int64_t HW = p.H * p.W;
    int64_t off = l.base;
    for (int64_t i = l.walker; i < HW; i += g.walkers, off += l.step) {
      float va[V], vb[V];
      load_vec<T, V, FULL>(a + off, true, l.valid, va);
      if constexpr (PROD) load_vec<T, V, FULL>(b + off, true, l.valid, vb);
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] = PROD ? fmaf(va[v], vb[v], acc[v]) : acc[v] + va[v];
    }
  }
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const float r = block_tree(acc[v], tree, g.lanes, g.walkers, [](float x, float y) { return x + y; });
    if (l.walker == 0 && v < l.valid) p.out[l.n * p.C + l.c0 + v] = r * scale;
  }
}

// y = a * s[n, c] + (t ? t[n, c] / tdiv : 0) over the pixels [blockIdx.y * chunk, + chunk); y in a's layout.
template <typename T, bool CL, bool FULL>
__global__ void __launch_bounds__(kThreads) se_affine_kernel(const SeParams p, const T* __restrict__ a,
                                                             const float* __restrict__ t, float tdiv, LaneGeom g,
                                                             int64_t chunk) {
  constexpr int V = tile_vec((int)sizeof(T), CL);
  const SeLane l = se_lane<CL>(p, g, V);
  if (l.valid <= 0) return;
  float sv[V], tv[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int64_t nc = l.n * p.C + l.c0 + v;
    sv[v] = v < l.valid ? p.s[nc] : 0.0f;
    tv[v] = v < l.valid && t ? t[nc] / tdiv : 0.0f;
  }
  T* __restrict__ y = static_cast<T*>(p.y);
  const int64_t HW = p.H * p.W, begin = (int64_t)blockIdx.y * chunk, end = begin + chunk < HW ? begin + chunk : HW;
  int64_t off = l.base + begin * (CL ? p.C : 1);
  for (int64_t i = begin + l.walker; i < end; i += g.walkers, off += l.step) {
    float va[V];
    load_vec<T, V, FULL>(a + off, true, l.valid, va);
#pragma unroll
    for (int v = 0; v < V; ++v) va[v] = fmaf(va[v], sv[v], tv[v]);
    store_vec<T, V, FULL>(y + off, l.valid, va);
  }
}

}  // namespace dev
}  // namespace mnet
