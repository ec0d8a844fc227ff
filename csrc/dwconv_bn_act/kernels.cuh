// CUDA kernels of the dwconv_bn_act primitives. Plain CUDA: no ATen/torch headers, only csrc/common, the params
// struct and the tile plan (tile.h, shared with the host twin).
//
// fwd, stats, bwd_reduce: one thread computes a strip (TW outputs of one output row, one vector of V channels;
// tile.h) with the K x K conv accumulated in fp32 registers: a runtime loop over the K kernel rows, and along the
// row a register window of input vectors, each loaded once (16 bytes of channels in channels_last) and fed to
// every output of the strip that reads it. Weights and per-channel BN values are staged once per block in shared
// memory as fp32 [tap][channel] rows, so a thread reads its V weights of a tap as vectors.
//   fwd: grid (ceil(strips / walkers), channel groups), one strip per thread, epilogue BN fold + activation.
//   stats / bwd_reduce: grid (chunks, channel groups); each block walks the strips of one fixed chunk (tile.h),
//     each thread accumulates privately in a fixed order, walkers combine by a fixed tree, one partial per
//     (chunk, channel) in a [component][chunk][C] layout (coalesced), and a final kernel combines the chunks in
//     order. Deterministic: no atomics, every order fixed by the shape.
#pragma once

#include <stdint.h>

#include <initializer_list>
#include <stdexcept>

#include "common/activations.h"
#include "common/cuda_check.cuh"
#include "common/device.cuh"
#include "common/math.h"
#include "dwconv_bn_act/params.h"
#include "dwconv_bn_act/tile.h"

namespace mnet {
namespace dev {

// Compile-time tile of one (dtype, layout, column pattern): see tile.h.
template <typename T, bool CL, int J>
struct Tile {
  static constexpr int V = tile_vec((int)sizeof(T), CL);
  static constexpr int TW = tile_width(CL, J);
};

// Shared-memory parameter rows of a block: fp32 weights [K*K][cb], then up to 4 per-channel vectors [4][cb] (the
// non-null ones of v0..v3, each [C]); channels past C read 0. Staged once per block: a block walks many strips.
template <typename T, int K>
MNET_DEVICE void stage_params(const DwParams& p, const TilePlan& t, float* sh, const float* v0 = nullptr,
                              const float* v1 = nullptr, const float* v2 = nullptr, const float* v3 = nullptr) {
  const int cb = t.cb;
  const int64_t cbase = lane_c0(t, blockIdx.y, 0);
  const T* __restrict__ w = static_cast<const T*>(p.weight);
  for (int cl = threadIdx.x; cl < cb; cl += blockDim.x) {
    const int64_t c = cbase + cl;
    const bool in = c < p.C;
#pragma unroll
    for (int r = 0; r < K * K; ++r) sh[r * cb + cl] = in ? to_f(w[c * (K * K) + r]) : 0.0f;
    const float* vecs[4] = {v0, v1, v2, v3};
#pragma unroll
    for (int r = 0; r < 4; ++r)
      if (vecs[r]) sh[(K * K + r) * cb + cl] = in ? vecs[r][c] : 0.0f;
  }
  __syncthreads();
}

MNET_HD constexpr size_t param_smem_bytes(int K, int rows, int cb) { return (size_t)(K * K + rows) * cb * 4; }

// One thread's place in the plan: its channel vector and, per strip, the strip's coordinates.
struct Lane {
  int lane, walker;
  int64_t c0;  // first channel of the vector
  int valid;   // channels of the vector inside [0, C) (<= 0: idle lane)
};

MNET_DEVICE Lane lane_of(const DwParams& p, const TilePlan& t) {
  Lane l;
  l.lane = threadIdx.x % t.lg.lanes;
  l.walker = threadIdx.x / t.lg.lanes;
  l.c0 = lane_c0(t, blockIdx.y, l.lane);
  const int64_t left = p.C - l.c0;
  l.valid = left <= 0 || l.walker >= t.lg.walkers ? 0 : (left < t.V ? (int)left : t.V);
  return l;
}

struct StripPos {
  int64_t n;
  int oh, ow0;
  int count;  // outputs of the strip inside the row (1..TW)
};

MNET_DEVICE StripPos strip_pos(const DwParams& p, const TilePlan& t, int64_t s) {
  uint32_t n, oh, ow0;
  strip_origin<uint32_t>(t, (uint32_t)p.Ho, (uint32_t)s, n, oh, ow0);
  const int rest = (int)p.Wo - (int)ow0, left = t.sg.out_step == 2 ? (rest + 1) >> 1 : rest;
  return {(int64_t)n, (int)oh, (int)ow0, left < t.TW ? left : t.TW};
}

// V consecutive fp32 from shared memory: 16-byte loads when V is a multiple of 4 (the parameter rows are
// [row][cb] with cb = lanes * V, so every lane's vector is 16-byte aligned).
template <int V>
MNET_DEVICE void load_shared(const float* src, float (&out)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int i = 0; i < V / 4; ++i) {
      const float4 q = reinterpret_cast<const float4*>(src)[i];
      out[4 * i] = q.x;
      out[4 * i + 1] = q.y;
      out[4 * i + 2] = q.z;
      out[4 * i + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = src[v];
  }
}

// z of one strip: acc[m][v] = sum over taps of w[tap][c0 + v] * x[n, c0 + v, ih, iw] (fp32, zero padding).
// `wsh`: this lane's weights in shared memory ([K*K][cb] rows, already offset by lane * V).
template <typename T, int K, int J, int TW, int V, bool FULL>
MNET_DEVICE void conv_strip(const DwParams& p, const T* __restrict__ x, const Lane& l, const StripPos& sp,
                            const float* wsh, int cb, float (&acc)[TW][V]) {
  constexpr int NCOL = strip_cols(J, TW, K);
  const int in_step = J == 2 ? 1 : p.dilation;
  const int ih0 = sp.oh * p.stride - p.pad, iw0 = sp.ow0 * p.stride - p.pad;
  const T* xn = x + sp.n * p.xs.n + l.c0 * p.xs.c;
  const int64_t col = (int64_t)in_step * p.xs.w;
#pragma unroll
  for (int m = 0; m < TW; ++m)
#pragma unroll
    for (int v = 0; v < V; ++v) acc[m][v] = 0.0f;
#pragma unroll 1
  for (int kh = 0; kh < K; ++kh) {
    const int ih = ih0 + kh * p.dilation;
    if ((unsigned)ih >= (unsigned)p.H) continue;
    float w[K][V];
#pragma unroll
    for (int kw = 0; kw < K; ++kw) load_shared<V>(wsh + (kh * K + kw) * cb, w[kw]);
    const T* row = xn + ih * p.xs.h + iw0 * p.xs.w;
#pragma unroll
    for (int j = 0; j < NCOL; ++j) {
      const bool in = (unsigned)(iw0 + j * in_step) < (unsigned)p.W;
      float xv[V];
      load_vec<T, V, FULL>(row + j * col, in, l.valid, xv);
#pragma unroll
      for (int kw = 0; kw < K; ++kw) {
        if (j < kw || (j - kw) % J != 0 || (j - kw) / J >= TW) continue;
        const int m = (j - kw) / J;
#pragma unroll
        for (int v = 0; v < V; ++v) acc[m][v] = fmaf(w[kw][v], xv[v], acc[m][v]);
      }
    }
  }
}

MNET_DEVICE int64_t out_offset(const Strides4& s, const StripPos& sp, int m, int out_step, int64_t c0) {
  return sp.n * s.n + (int64_t)sp.oh * s.h + (int64_t)(sp.ow0 + m * out_step) * s.w + c0 * s.c;
}

// =======================================================================================================
// forward: y = act(z * scale + shift)
// =======================================================================================================
template <Act A, typename T, int TW, int V, bool FULL>
MNET_DEVICE void fwd_epilogue(const DwParams& p, const TilePlan& t, const Lane& l, const StripPos& sp,
                              const float* scale, const float* shift, const float (&acc)[TW][V]) {
  T* __restrict__ y = static_cast<T*>(p.y);
#pragma unroll
  for (int m = 0; m < TW; ++m) {
    if (m >= sp.count) break;
    float out[V];
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = act_fwd<A>(fmaf(acc[m][v], scale[v], shift[v]));
    store_vec<T, V, FULL>(y + out_offset(p.ys, sp, m, t.sg.out_step, l.c0), l.valid, out);
  }
}

template <typename T, int K, int J, bool CL, bool FULL>
__global__ void __launch_bounds__(kThreads, 2) fwd_kernel(const DwParams p, const TilePlan t) {
  constexpr int V = Tile<T, CL, J>::V, TW = Tile<T, CL, J>::TW;
  extern __shared__ float sh[];
  const Lane l = lane_of(p, t);
  stage_params<T, K>(p, t, sh, p.mean, p.invstd, p.gamma, p.beta);
  if (l.valid <= 0) return;
  const float* shv = sh + K * K * t.cb + l.lane * V;
  for (int64_t s = (int64_t)blockIdx.x * t.lg.walkers + l.walker; s < t.strips;
       s += (int64_t)gridDim.x * t.lg.walkers) {
    const StripPos sp = strip_pos(p, t, s);
    float acc[TW][V];
    conv_strip<T, K, J, TW, V, FULL>(p, static_cast<const T*>(p.x), l, sp, sh + l.lane * V, t.cb, acc);
    float scale[V], shift[V], mean[V], invstd[V], gamma[V], beta[V];
    load_shared<V>(shv, mean);
    load_shared<V>(shv + t.cb, invstd);
    load_shared<V>(shv + 2 * t.cb, gamma);
    load_shared<V>(shv + 3 * t.cb, beta);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const BnFold f = bn_fold(mean[v], invstd[v], gamma[v], beta[v]);
      scale[v] = f.scale;
      shift[v] = f.shift;
    }
    MNET_DISPATCH_CONV_ACT(p.act, A, [&] { fwd_epilogue<A, T, TW, V, FULL>(p, t, l, sp, scale, shift, acc); });
  }
}

// =======================================================================================================
// statistics: per (chunk, channel) Welford partials -> work[(j * nchunks + chunk) * C + c], j = count, mean, m2
// =======================================================================================================
template <typename T, int K, int J, bool CL, bool FULL>
__global__ void __launch_bounds__(kThreads, 2) stats_partial_kernel(const DwParams p, const TilePlan t) {
  constexpr int V = Tile<T, CL, J>::V, TW = Tile<T, CL, J>::TW;
  extern __shared__ float sh[];
  __shared__ Welford tree[kThreads];
  const Lane l = lane_of(p, t);
  stage_params<T, K>(p, t, sh);
  int64_t begin, end;
  chunk_range(t.strips, t.nchunks, blockIdx.x, begin, end);
  // Running (count, mean, M2) per channel; the count is the same for the V channels of a lane (one register).
  float count = 0.0f, mean[V], m2[V];
#pragma unroll
  for (int v = 0; v < V; ++v) mean[v] = m2[v] = 0.0f;
  if (l.valid > 0) {
    for (int64_t s = begin + l.walker; s < end; s += t.lg.walkers) {
      const StripPos sp = strip_pos(p, t, s);
      float z[TW][V];
      conv_strip<T, K, J, TW, V, FULL>(p, static_cast<const T*>(p.x), l, sp, sh + l.lane * V, t.cb, z);
      // The strip's own mean and M2 in two passes over registers, then one Chan combine (welford_combine's
      // arithmetic, with the division shared by the V channels).
      const float cnt = (float)sp.count, inv = 1.0f / cnt, total = count + cnt, fb = cnt / total;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        float sum = 0.0f;
#pragma unroll
        for (int m = 0; m < TW; ++m) sum += m < sp.count ? z[m][v] : 0.0f;
        const float smean = sum * inv;
        float sm2 = 0.0f;
#pragma unroll
        for (int m = 0; m < TW; ++m) {
          const float d = z[m][v] - smean;
          sm2 = m < sp.count ? fmaf(d, d, sm2) : sm2;
        }
        const float d = smean - mean[v];
        mean[v] = count == 0.0f ? smean : mean[v] + d * fb;
        m2[v] = count == 0.0f ? sm2 : m2[v] + sm2 + d * d * count * fb;
      }
      count = total;
    }
  }
  const int64_t nc = t.nchunks * p.C;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const Welford r = block_tree(Welford{count, mean[v], m2[v]}, tree, t.lg.lanes, t.lg.walkers,
                                 [](const Welford& a, const Welford& b) { return welford_combine(a, b); });
    if (l.walker == 0 && v < l.valid) {
      float* o = p.work + blockIdx.x * p.C + l.c0 + v;
      o[0] = r.count;
      o[nc] = r.mean;
      o[2 * nc] = r.m2;
    }
  }
}

// =======================================================================================================
// backward reduce: per (chunk, channel) partial (sum g, sum g*xhat) -> work[(j * nchunks + chunk) * C + c]
// =======================================================================================================
struct Sum2 {
  float a, b;
};

template <Act A, typename T, int TW, int V, bool FULL>
MNET_DEVICE void reduce_epilogue(const DwParams& p, const TilePlan& t, const Lane& l, const StripPos& sp,
                                 const float* shv, int cb, const float (&z)[TW][V], Sum2 (&acc)[V]) {
  const T* __restrict__ gy = static_cast<const T*>(p.grad_y);
#pragma unroll
  for (int m = 0; m < TW; ++m) {
    if (m >= sp.count) break;
    float g[V];
    load_vec<T, V, FULL>(gy + out_offset(p.gs, sp, m, t.sg.out_step, l.c0), true, l.valid, g);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const float xhat = (z[m][v] - shv[v]) * shv[cb + v];
      const float gv = act_bwd<A>(fmaf(xhat, shv[2 * cb + v], shv[3 * cb + v]), g[v]);
      acc[v].a += gv;
      acc[v].b = fmaf(gv, xhat, acc[v].b);
    }
  }
}

template <typename T, int K, int J, bool CL, bool FULL>
__global__ void __launch_bounds__(kThreads, 2) bwd_reduce_partial_kernel(const DwParams p, const TilePlan t) {
  constexpr int V = Tile<T, CL, J>::V, TW = Tile<T, CL, J>::TW;
  extern __shared__ float sh[];
  __shared__ Sum2 tree[kThreads];
  const Lane l = lane_of(p, t);
  stage_params<T, K>(p, t, sh, p.mean, p.invstd, p.gamma, p.beta);
  int64_t begin, end;
  chunk_range(t.strips, t.nchunks, blockIdx.x, begin, end);
  Sum2 acc[V];
#pragma unroll
  for (int v = 0; v < V; ++v) acc[v] = Sum2{0.0f, 0.0f};
  if (l.valid > 0) {
    const float* shv = sh + K * K * t.cb + l.lane * V;
    for (int64_t s = begin + l.walker; s < end; s += t.lg.walkers) {
      const StripPos sp = strip_pos(p, t, s);
      float z[TW][V];
      conv_strip<T, K, J, TW, V, FULL>(p, static_cast<const T*>(p.x), l, sp, sh + l.lane * V, t.cb, z);
      MNET_DISPATCH_CONV_ACT(p.act, A, [&] { reduce_epilogue<A, T, TW, V, FULL>(p, t, l, sp, shv, t.cb, z, acc); });
    }
  }
  const int64_t nc = t.nchunks * p.C;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const Sum2 r = block_tree(acc[v], tree, t.lg.lanes, t.lg.walkers,
                              [](const Sum2& a, const Sum2& b) { return Sum2{a.a + b.a, a.b + b.b}; });
    if (l.walker == 0 && v < l.valid) {
      float* o = p.work + blockIdx.x * p.C + l.c0 + v;
      o[0] = r.a;
      o[nc] = r.b;
    }
  }
}

// =======================================================================================================
// final combines: block = 32 channels x 8 walkers over the chunks (walker w takes chunks w, w + 8, ... in
// order, in double), then a fixed tree over the walkers. part[(j * nchunks + chunk) * C + c].
// =======================================================================================================
constexpr int kFinalLanes = 32, kFinalWalkers = 8;

// (stats_final_kernel: stats.cu; sum2_final_kernel: bwd_reduce.cu; non-template kernels live in one .cu each.)

// =======================================================================================================
// backward apply: dz on chip, then dx and the dweight partials from it (tile.h: band plan)
// =======================================================================================================
// Grid (chunks, channel groups), 256 threads = lanes x walkers. Each block walks (image, band) items b, b + chunks,
// ... and per item:
//   1. dz of output rows [r0, r1) (owned rows + the halo its dx rows read) from x and grad_y, recomputing z strip
//      by strip as the forward does, into shared memory as fp32 [row][Wo][cb];
//   2. dweight: thread (lane, kernel row kh, walker) accumulates sum dz * x over the owned output rows for the K
//      taps of its kernel row (x re-read through L1), into its own shared-memory slots (registers stay free for
//      the conv of step 1);
//   3. dx of input rows [ib0, ib1): one pixel x V channels per thread, gathered from the dz tile.
// At the end the walkers' dweight sums combine in a fixed order in shared memory: one partial per (block, tap,
// channel) in part[(chunk * K*K + tap) * C + c]; dweight_final_kernel sums the chunks in order. No fp32 dz in
// DRAM: the pass reads x and grad_y once (plus the halo rows) and writes dx.
MNET_HD constexpr int ilog2(int v) { return v <= 1 ? 0 : 1 + ilog2(v >> 1); }

// Shared memory of bwd_apply_kernel in floats: the dz tile, each thread's dweight sums, the parameters.
MNET_HD int64_t bwd_apply_tile_floats(const DwParams& p, const BandPlan& b) { return (int64_t)b.dz_rows * p.Wo * b.cb; }
MNET_HD int64_t bwd_apply_smem_floats(const DwParams& p, const BandPlan& b) {
  return bwd_apply_tile_floats(p, b) + (int64_t)kThreads * p.k * b.V + (int64_t)(p.k * p.k + 6) * b.cb;
}

template <Act A, typename T, int TW, int V, bool FULL>
MNET_DEVICE void dz_epilogue(const DwParams& p, const StripGeom& sg, const Lane& l, const StripPos& sp,
                             const float* shv, int cb, const float (&z)[TW][V], float* dzrow) {
  const T* __restrict__ gy = static_cast<const T*>(p.grad_y);
#pragma unroll
  for (int m = 0; m < TW; ++m) {
    if (m >= sp.count) break;
    float g[V], dz[V];
    load_vec<T, V, FULL>(gy + out_offset(p.gs, sp, m, sg.out_step, l.c0), true, l.valid, g);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const float invstd = shv[cb + v], gamma = shv[2 * cb + v];
      const float xhat = (z[m][v] - shv[v]) * invstd;
      const float gv = act_bwd<A>(fmaf(xhat, gamma, shv[3 * cb + v]), g[v]);
      dz[v] = bn_bwd_dz(gamma * invstd, gv, shv[4 * cb + v], xhat, shv[5 * cb + v]);
    }
    float* d = dzrow + (int64_t)(sp.ow0 + m * sg.out_step) * cb;
    if constexpr (V % 4 == 0) {
#pragma unroll
      for (int i = 0; i < V / 4; ++i)
        reinterpret_cast<float4*>(d)[i] = make_float4(dz[4 * i], dz[4 * i + 1], dz[4 * i + 2], dz[4 * i + 3]);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) d[v] = dz[v];
    }
  }
}

template <typename T, int K, int J, bool CL, bool FULL>
__global__ void __launch_bounds__(kThreads, 2) bwd_apply_kernel(const DwParams p, const TilePlan t, const BandPlan b) {
  constexpr int V = Tile<T, CL, J>::V, TW = Tile<T, CL, J>::TW, KK = K * K, NCOL = strip_cols(J, TW, K);
  extern __shared__ float sh[];
  const int cb = b.cb, lanes = b.lanes, lshift = ilog2(b.lanes);
  float* dzt = sh;                               // [dz_rows][Wo][cb]
  float* dws = sh + bwd_apply_tile_floats(p, b);  // [walker][kh][kw][cb] dweight sums, one slot per thread
  float* wsh = dws + kThreads * K * V;            // [KK][cb] weights, then [6][cb]
  const float* shv0 = wsh + KK * cb;
  {
    const int64_t cbase = (int64_t)blockIdx.y * cb;
    const T* __restrict__ w = static_cast<const T*>(p.weight);
    const float* vecs[6] = {p.mean, p.invstd, p.gamma, p.beta, p.mean_g, p.mean_g_xhat};
    for (int cl = threadIdx.x; cl < cb; cl += blockDim.x) {
      const int64_t c = cbase + cl;
      const bool in = c < p.C;
#pragma unroll
      for (int r = 0; r < KK; ++r) wsh[r * cb + cl] = in ? to_f(w[c * KK + r]) : 0.0f;
#pragma unroll
      for (int r = 0; r < 6; ++r) wsh[(KK + r) * cb + cl] = in ? vecs[r][c] : 0.0f;
    }
  }
  // Phase-2 role of this thread (dweight): lane, kernel row, walker.
  const int lane3 = threadIdx.x & (lanes - 1), kh3 = (threadIdx.x >> lshift) % K, w3 = (threadIdx.x >> lshift) / K;
  const int walkers3 = (kThreads / lanes) / K;
  Lane l3;
  l3.lane = lane3;
  l3.walker = w3;
  l3.c0 = ((int64_t)blockIdx.y * lanes + lane3) * V;
  l3.valid = (int)(p.C - l3.c0 < V ? p.C - l3.c0 : V);
  float* myslot = dws + (int64_t)(w3 * K + kh3) * K * cb + lane3 * V;  // [kw][cb] of this thread
  if (w3 < walkers3)
#pragma unroll
    for (int kw = 0; kw < K; ++kw)
#pragma unroll
      for (int v = 0; v < V; ++v) myslot[kw * cb + v] = 0.0f;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const int64_t Wo = p.Wo, per_row = t.sg.per_row;
  __syncthreads();

  for (int64_t item = blockIdx.x; item < p.N * b.bands; item += gridDim.x) {
    const int64_t n = item / b.bands;
    const BandRows br = band_rows(p, item - n * b.bands, b.rows);
    // 1. dz of rows [r0, r1)
    const int64_t items1 = ((br.r1 - br.r0) * per_row) << lshift;
    for (int64_t it = threadIdx.x; it < items1; it += blockDim.x) {
      Lane l;
      l.lane = (int)(it & (lanes - 1));
      l.walker = 0;
      l.c0 = ((int64_t)blockIdx.y * lanes + l.lane) * V;
      l.valid = (int)(p.C - l.c0 < V ? p.C - l.c0 : V);
      const int64_t q = it >> lshift, r = q / per_row;
      StripPos sp;
      sp.n = n;
      sp.oh = (int)(br.r0 + r);
      sp.ow0 = (int)strip_ow0(t.sg, q - r * per_row, TW);
      const int rest = (int)Wo - sp.ow0, left = t.sg.out_step == 2 ? (rest + 1) >> 1 : rest;
      sp.count = left < TW ? left : TW;
      float* dzrow = dzt + r * Wo * cb + l.lane * V;
      if (l.valid <= 0 || sp.count <= 0) continue;
      float z[TW][V];
      conv_strip<T, K, J, TW, V, FULL>(p, x, l, sp, wsh + l.lane * V, cb, z);
      MNET_DISPATCH_CONV_ACT(p.act, A, [&] {
        dz_epilogue<A, T, TW, V, FULL>(p, t.sg, l, sp, shv0 + l.lane * V, cb, z, dzrow);
      });
    }
    __syncthreads();
    // 2. dweight over the owned rows [ob0, ob1): dwacc[kw][v] += dz[oh][ow] * x[ih][iw] for kernel row kh3
    if (w3 < walkers3 && l3.valid > 0) {
      float dwacc[K][V];
#pragma unroll
      for (int kw = 0; kw < K; ++kw)
#pragma unroll
        for (int v = 0; v < V; ++v) dwacc[kw][v] = 0.0f;
      const int64_t strips3 = (br.ob1 - br.ob0) * per_row;
      for (int64_t st = w3; st < strips3; st += walkers3) {
        const int64_t r = st / per_row;
        const int oh = (int)(br.ob0 + r);
        const int ih = oh * p.stride - p.pad + kh3 * p.dilation;
        if ((unsigned)ih >= (unsigned)p.H) continue;
        const int ow0 = (int)strip_ow0(t.sg, st - r * per_row, TW);
        const int rest = (int)Wo - ow0, left = t.sg.out_step == 2 ? (rest + 1) >> 1 : rest;
        const int count = left < TW ? left : TW;
        const float* dzr = dzt + (oh - br.r0) * Wo * cb + lane3 * V;
        float dz[TW][V];
#pragma unroll
        for (int m = 0; m < TW; ++m) {
          load_shared<V>(dzr + (int64_t)(ow0 + m * t.sg.out_step) * cb, dz[m]);
#pragma unroll
          for (int v = 0; v < V; ++v) dz[m][v] = m < count ? dz[m][v] : 0.0f;  // past Wo: another row's dz
        }
        const int in_step = J == 2 ? 1 : p.dilation, iw0 = ow0 * p.stride - p.pad;
        const T* row = x + n * p.xs.n + (int64_t)ih * p.xs.h + (int64_t)iw0 * p.xs.w + l3.c0 * p.xs.c;
        const int64_t col = (int64_t)in_step * p.xs.w;
#pragma unroll
        for (int j = 0; j < NCOL; ++j) {
          const bool in = (unsigned)(iw0 + j * in_step) < (unsigned)p.W;
          float xv[V];
          load_vec<T, V, FULL>(row + j * col, in, l3.valid, xv);
#pragma unroll
          for (int kw = 0; kw < K; ++kw) {
            if (j < kw || (j - kw) % J != 0 || (j - kw) / J >= TW) continue;
            const int m = (j - kw) / J;
#pragma unroll
            for (int v = 0; v < V; ++v) dwacc[kw][v] = fmaf(dz[m][v], xv[v], dwacc[kw][v]);
          }
        }
      }
#pragma unroll
      for (int kw = 0; kw < K; ++kw)
#pragma unroll
        for (int v = 0; v < V; ++v) myslot[kw * cb + v] += dwacc[kw][v];
    }
    // 3. dx of input rows [ib0, ib1): gather dz over the taps that read each pixel
    const int64_t items2 = ((br.ib1 - br.ib0) * p.W) << lshift;
    for (int64_t it = threadIdx.x; it < items2; it += blockDim.x) {
      const int lane = (int)(it & (lanes - 1));
      const int64_t c0 = ((int64_t)blockIdx.y * lanes + lane) * V;
      const int valid = (int)(p.C - c0 < V ? p.C - c0 : V);
      if (valid <= 0) continue;
      const int64_t q = it >> lshift, rr = q / p.W;
      const int ih = (int)(br.ib0 + rr), iw = (int)(q - rr * p.W);
      float acc[V];
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] = 0.0f;
#pragma unroll
      for (int kh = 0; kh < K; ++kh) {
        const int ohn = ih + p.pad - kh * p.dilation;
        if (ohn < 0 || (p.stride == 2 && (ohn & 1))) continue;
        const int oh = p.stride == 2 ? ohn >> 1 : ohn;
        if (oh >= p.Ho) continue;
        const float* dzr = dzt + (oh - br.r0) * Wo * cb + lane * V;
#pragma unroll
        for (int kw = 0; kw < K; ++kw) {
          const int own = iw + p.pad - kw * p.dilation;
          if (own < 0 || (p.stride == 2 && (own & 1))) continue;
          const int ow = p.stride == 2 ? own >> 1 : own;
          if (ow >= Wo) continue;
          float d[V], w[V];
          load_shared<V>(dzr + (int64_t)ow * cb, d);
          load_shared<V>(wsh + (kh * K + kw) * cb + lane * V, w);
#pragma unroll
          for (int v = 0; v < V; ++v) acc[v] = fmaf(w[v], d[v], acc[v]);
        }
      }
      T* dx = static_cast<T*>(p.y) + n * p.ys.n + (int64_t)ih * p.ys.h + (int64_t)iw * p.ys.w + c0 * p.ys.c;
      store_vec<T, V, FULL>(dx, valid, acc);
    }
    __syncthreads();  // the next item overwrites the dz tile
  }
  // dweight: one thread per (tap, channel) sums the walkers' slots in walker order.
  for (int i = threadIdx.x; i < KK * cb; i += blockDim.x) {
    const int tap = i / cb, cl = i - tap * cb;
    const int64_t c = (int64_t)blockIdx.y * cb + cl;
    float s = 0.0f;
    for (int w = 0; w < walkers3; ++w) s += dws[((int64_t)w * KK + tap) * cb + cl];
    if (c < p.C) p.work[((int64_t)blockIdx.x * KK + tap) * p.C + c] = s;
  }
}

// dweight[c, tap] = sum over chunks of part[(chunk * KK + tap) * C + c] (in chunk order; 32 lanes over the
// flattened (tap, c) index x 8 walkers over the chunks, in double, then a fixed tree).
template <typename T>
__global__ void __launch_bounds__(kFinalLanes* kFinalWalkers)
    dweight_final_kernel(const float* __restrict__ part, int64_t nchunks, int64_t C, int kk, T* dweight) {
  __shared__ double tree[kFinalLanes * kFinalWalkers];
  const int lane = threadIdx.x % kFinalLanes, walker = threadIdx.x / kFinalLanes;
  const int64_t q = (int64_t)blockIdx.x * kFinalLanes + lane, total = C * kk;
  double acc = 0.0;
  if (q < total)
    for (int64_t j = walker; j < nchunks; j += kFinalWalkers) acc += part[j * total + q];
  acc = block_tree(acc, tree, kFinalLanes, kFinalWalkers, [](double a, double b) { return a + b; });
  if (walker == 0 && q < total) {
    const int64_t tap = q / C, c = q - tap * C;
    dweight[c * kk + tap] = from_f<T>((float)acc);
  }
}

// =======================================================================================================
// host-side launch helpers (shared by the .cu files of this directory)
// =======================================================================================================
template <typename T>
inline bool full_vectors(const DwParams& p, std::initializer_list<const void*> ptrs) {
  return full_vectors<T>(p.channels_last, p.C, ptrs);
}

inline TilePlan launch_plan(const DwParams& p, int elem_size) {
  const TilePlan t = tile_plan(p, elem_size, kThreads);
  if (t.strips >= (int64_t(1) << 31))
    throw std::runtime_error("mnet_ext: the activation is too large for the CUDA kernels (N * Ho * strips per row "
                             ">= 2^31); split the batch");
  if (t.lg.groups > 65535)
    throw std::runtime_error("mnet_ext: too many channels for the CUDA kernels (more than 65535 channel groups)");
  return t;
}

// Dynamic shared memory above the 48 KB default needs an opt-in per kernel.
template <typename F>
inline void allow_smem(F kernel, size_t bytes) {
  if (bytes > 48 * 1024) MNET_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                              (int)bytes));
}

// fwd: blocks along the strips so that each thread walks about 4 strips (amortises the parameter staging).
constexpr int64_t kStripsPerThread = 4;
inline unsigned fwd_blocks(const TilePlan& t) {
  const int64_t per_block = t.lg.walkers * kStripsPerThread;
  return (unsigned)((t.strips + per_block - 1) / per_block);
}

inline unsigned final_blocks(int64_t C) { return (unsigned)((C + kFinalLanes - 1) / kFinalLanes); }

}  // namespace dev
}  // namespace mnet
