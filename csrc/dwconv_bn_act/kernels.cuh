// CUDA kernels of the dwconv_bn_act primitives. Plain CUDA: no ATen/torch headers, only csrc/common, the params
// struct and the tile plan (tile.h, shared with the host twin).
//
// fwd, stats, bwd_reduce: one thread computes a strip (TW outputs of one output row, one vector of V channels;
// tile.h: the forward's strips are wider than the reductions') with the K x K conv accumulated in fp32 registers:
// kernel row 0 peeled (it initialises the sums), a runtime loop over the other K - 1, and along each row a
// register window of input vectors, each loaded once (16 bytes of channels in channels_last) and fed to every
// output of the strip that reads it (window_walk); padding from a per-strip column mask. Weights and per-channel
// values are staged once per block in shared memory as fp32, per lane, so a thread reads them as vectors off one
// base address (stage_params).
//   fwd: grid (strips / (walkers x 4..16), channel groups), each thread walks strips; epilogue: the BN fold
//     (staged as scale and shift) + activation.
//   stats / bwd_reduce: grid (chunks, channel groups); each block walks the strips of one fixed chunk (tile.h),
//     each thread accumulates privately in a fixed order, walkers combine by a fixed tree, one partial per
//     (chunk, channel) in a [component][chunk][C] layout (coalesced), and a final kernel combines the chunks in
//     order. Deterministic: no atomics, every order fixed by the shape.
// channels_last with 16-byte vectors (every MobileNet layer): fwd and stats run on staged band tiles instead
// (fwd_band_kernel, stats_band_kernel; tile.h: band_tile_plan): the block copies the input band of R strips into
// shared memory as fp32 once, then each thread's conv reads its window from there.
#pragma once

#include <stdint.h>

#include <initializer_list>
#include <stdexcept>
#include <type_traits>

#include "common/activations.h"
#include "common/cuda_check.cuh"
#include "common/device.cuh"
#include "common/math.h"
#include "dwconv_bn_act/params.h"
#include "dwconv_bn_act/tile.h"

namespace mnet {
namespace dev {


// Weights in shared memory: weight_lane_floats (tile.h) per lane.

// Shared-memory parameters of a block: the weights [lane][weight_lane_floats] (taps past C read 0), then the
// per-channel vectors v0..v3 (each [C], or all null: none) as [lane][4][V], read off one base address too.
// FOLD: v0..v3 are mean, invstd, gamma, beta and the block stages their BN fold instead, scale and shift as
// [lane][2][V] (once per channel, not once per strip). Staged once per block: a block walks many strips.
// `lanes`: channel vectors of the block, `cbase`: its first channel.
template <typename T, int K, int V, bool FOLD = false>
MNET_DEVICE void stage_params(const DwParams& p, int lanes, int64_t cbase, float* sh, const float* v0 = nullptr,
                              const float* v1 = nullptr, const float* v2 = nullptr, const float* v3 = nullptr) {
  constexpr int WL = weight_lane_floats(K, V);
  const int cb = lanes * V;
  float* vsh = sh + lanes * WL;
  const T* __restrict__ w = static_cast<const T*>(p.weight);
  for (int cl = threadIdx.x; cl < cb; cl += blockDim.x) {
    const int64_t c = cbase + cl;
    const bool in = c < p.C;
    const int lane = cl / V, v = cl - lane * V;
#pragma unroll
    for (int r = 0; r < K * K; ++r) sh[lane * WL + r * V + v] = in ? to_f(w[c * (K * K) + r]) : 0.0f;
    if constexpr (FOLD) {
      const BnFold f = in ? bn_fold(v0[c], v1[c], v2[c], v3[c]) : BnFold{0.0f, 0.0f};
      vsh[(lane * 2) * V + v] = f.scale;
      vsh[(lane * 2 + 1) * V + v] = f.shift;
    } else if (v0) {
      const float* vecs[4] = {v0, v1, v2, v3};
#pragma unroll
      for (int r = 0; r < 4; ++r) vsh[(lane * 4 + r) * V + v] = in ? vecs[r][c] : 0.0f;
    }
  }
  __syncthreads();
}

MNET_HD constexpr size_t param_smem_bytes(int K, int V, int rows, int lanes) {
  return (size_t)(weight_lane_floats(K, V) + rows * V) * lanes * 4;
}

// One thread's place in the plan: its channel vector and, per strip, the strip's coordinates.
struct Lane {
  int lane, walker;
  int c0;      // first channel of the vector (< 2^25: launch_plan checks the channel groups)
  int valid;   // channels of the vector inside [0, C) (<= 0: idle lane)
};

MNET_DEVICE Lane lane_of(const DwParams& p, const TilePlan& t) {
  Lane l;
  l.lane = threadIdx.x % t.lg.lanes;
  l.walker = threadIdx.x / t.lg.lanes;
  l.c0 = (int)lane_c0(t, blockIdx.y, l.lane);
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
  strip_origin(t, (uint32_t)s, n, oh, ow0);
  return {(int64_t)n, (int)oh, (int)ow0, strip_count(t.sg, (int)p.Wo, (int)ow0, t.TW)};
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

// a * b for 32-bit a, b as one widening multiply (nvcc emits a full 64 x 64 product for int64 * int).
MNET_DEVICE int64_t mul_wide(int a, int b) {
  int64_t r;
#ifdef __CUDA_ARCH__
  asm("mul.wide.s32 %0, %1, %2;" : "=l"(r) : "r"(a), "r"(b));
#else  // host compilers (the emulator, tests/cuda_emu) have no PTX
  r = (int64_t)a * b;
#endif
  return r;
}

// The register window of one input row: load(j, xv) fetches window column j (V fp32) once, then f(m, kw, xv) runs
// for every output m of the strip that reads column j through kernel column kw (j = J * m + kw). m and kw are
// compile-time after unrolling, so the callers' register arrays stay in registers. Shared by the conv (conv_row:
// global loads; band_conv_strip: the staged band). Only columns [JLO, JHI) are walked: the others are padding
// known at compile time (whole-row strips, tile.h: BandTilePlan::whole), whose products are zero.
template <int K, int J, int TW, int V, int JLO = 0, int JHI = strip_cols(J, TW, K), typename L, typename F>
MNET_DEVICE void window_walk(L&& load, F&& f) {
  constexpr int NCOL = strip_cols(J, TW, K);
#pragma unroll
  for (int j = 0; j < NCOL; ++j) {
    if (j < JLO || j >= JHI) continue;
    float xv[V];
    load(j, xv);
#pragma unroll
    for (int kw = 0; kw < K; ++kw) {
      if (j < kw || (j - kw) % J != 0 || (j - kw) / J >= TW) continue;
      f((j - kw) / J, kw, xv);
    }
  }
}

// acc (+)= the products of one kernel row (weights wr: [K][V] of this lane; load: window_walk's loader, columns
// [JLO, JHI)). FIRST: the row initialises the sums (output m's first product is the first tap the window walk
// reaches: kw = 0, or the first at column JLO), so no zero fill.
template <int K, int J, int TW, int V, bool FIRST, int JLO = 0, int JHI = strip_cols(J, TW, K), typename L>
MNET_DEVICE void conv_row_with(L&& load, const float* wr, float (&acc)[TW][V]) {
  float w[K][V];
#pragma unroll
  for (int kw = 0; kw < K; ++kw) load_shared<V>(wr + kw * V, w[kw]);
  window_walk<K, J, TW, V, JLO, JHI>(load, [&](int m, int kw, const float(&xv)[V]) {
    const bool first = FIRST && kw == (JLO > J * m ? JLO - J * m : 0);
#pragma unroll
    for (int v = 0; v < V; ++v) acc[m][v] = first ? w[kw][v] * xv[v] : fmaf(w[kw][v], xv[v], acc[m][v]);
  });
}

template <typename T, int K, int J, int TW, int V, bool FULL, bool FIRST>
MNET_DEVICE void conv_row(const T* row, int col, uint32_t cols, int valid, const float* wr, float (&acc)[TW][V]) {
  conv_row_with<K, J, TW, V, FIRST>(
      [&](int j, float(&xv)[V]) { load_vec<T, V, FULL>(row + j * col, (cols >> j) & 1u, valid, xv); }, wr, acc);
}

// z of one strip: acc[m][v] = sum over taps of w[tap][c0 + v] * x[n, c0 + v, ih, iw] (fp32, zero padding).
// `xl`: x at this lane's first channel (x + c0 * xs.c); `wl`: this lane's weights in shared memory ([K*K][V]). Kernel row 0 is peeled (it initialises the sums; zeros above the image), the
// other K - 1 rows run as a runtime loop. Addresses: a row pointer stepped by kernel rows, 32-bit row and column
// strides (launch_plan checks them).
template <typename T, int K, int J, int TW, int V, bool FULL>
MNET_DEVICE void conv_strip(const DwParams& p, const T* __restrict__ xl, const Lane& l, const StripPos& sp,
                            const float* wl, float (&acc)[TW][V]) {
  constexpr int NCOL = strip_cols(J, TW, K);
  const int in_step = J == 2 ? 1 : p.dilation;
  const int ih0 = sp.oh * p.stride - p.pad, iw0 = sp.ow0 * p.stride - p.pad;
  const uint32_t cols = column_mask(iw0, in_step, (int)p.W, NCOL);
  const int col = in_step * (int)p.xs.w, rstep = p.dilation * (int)p.xs.h;
  const T* row = xl + sp.n * p.xs.n + mul_wide(ih0, (int)p.xs.h) + mul_wide(iw0, (int)p.xs.w);
  if ((unsigned)ih0 < (unsigned)p.H) {
    conv_row<T, K, J, TW, V, FULL, true>(row, col, cols, l.valid, wl, acc);
  } else {
#pragma unroll
    for (int m = 0; m < TW; ++m)
#pragma unroll
      for (int v = 0; v < V; ++v) acc[m][v] = 0.0f;
  }
#pragma unroll 1
  for (int kh = 1, ih = ih0 + p.dilation; kh < K; ++kh, ih += p.dilation) {
    row += rstep;
    wl += K * V;
    if ((unsigned)ih < (unsigned)p.H) conv_row<T, K, J, TW, V, FULL, false>(row, col, cols, l.valid, wl, acc);
  }
}

// Element offset of output m of a strip (32-bit row and column strides: launch_plan checks them).
MNET_DEVICE int64_t out_offset(const Strides4& s, const StripPos& sp, int m, int out_step, int c0) {
  return sp.n * s.n + mul_wide(sp.oh, (int)s.h) + mul_wide(sp.ow0 + m * out_step, (int)s.w) + mul_wide(c0, (int)s.c);
}

// =======================================================================================================
// forward: y = act(z * scale + shift)
// =======================================================================================================
// y: the strip's first output (out_offset), step: between its outputs; count: outputs inside the row.
template <Act A, typename T, int TW, int V, bool FULL>
MNET_DEVICE void fwd_epilogue(T* __restrict__ y, int step, int count, int valid, const float* scale,
                              const float* shift, const float (&acc)[TW][V]) {
#pragma unroll
  for (int m = 0; m < TW; ++m) {
    if (m >= count) break;
    float out[V];
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = act_fwd<A>(fmaf(acc[m][v], scale[v], shift[v]));
    store_vec<T, V, FULL>(y + m * step, valid, out);
  }
}

// The strip kernels' template parameter TW: the plan's strip width (tile.h: strip_tile_width, t.TW; launch_strips
// picks it); wide strips (strip_wide) run in blocks of half the threads.
template <typename T, int K, int J, bool CL, bool FULL, int TW>
__global__ void __launch_bounds__(plan_threads(kThreads, strip_wide(CL)), 2)
    fwd_kernel(const DwParams p, const TilePlan t) {
  constexpr int V = tile_vec((int)sizeof(T), CL);
  MNET_DYNAMIC_SMEM(float, sh);
  const Lane l = lane_of(p, t);
  stage_params<T, K, V, true>(p, t.lg.lanes, lane_c0(t, blockIdx.y, 0), sh, p.mean, p.invstd, p.gamma, p.beta);
  if (l.valid <= 0) return;
  constexpr int WL = weight_lane_floats(K, V);
  const float* shv = sh + t.lg.lanes * WL + l.lane * 2 * V;  // scale, shift
  const T* xl = static_cast<const T*>(p.x) + mul_wide(l.c0, (int)p.xs.c);
  const int ystep = t.sg.out_step * (int)p.ys.w;
  // 32-bit strip index: launch_plan checks strips < 2^31, and index + step stays below 2^32.
  const uint32_t strips = (uint32_t)t.strips, step = gridDim.x * (uint32_t)t.lg.walkers;
  for (uint32_t s = blockIdx.x * (uint32_t)t.lg.walkers + l.walker; s < strips; s += step) {
    const StripPos sp = strip_pos(p, t, s);
    T* y = static_cast<T*>(p.y) + out_offset(p.ys, sp, 0, t.sg.out_step, l.c0);  // before the conv: fewer live values
    const int count = sp.count;
    float acc[TW][V];
    conv_strip<T, K, J, TW, V, FULL>(p, xl, l, sp, sh + l.lane * weight_lane_floats(K, V), acc);
    float scale[V], shift[V];
    load_shared<V>(shv, scale);
    load_shared<V>(shv + V, shift);
    MNET_DISPATCH_CONV_ACT(p.act, A, [&] {
      fwd_epilogue<A, T, TW, V, FULL>(y, ystep, count, l.valid, scale, shift, acc);
    });
  }
}

// =======================================================================================================
// staged band tiles (tile.h: band_tile_plan): channels_last, 16-byte vectors (FULL), fwd and stats
// =======================================================================================================
// Thread = walker * lanes + lane: walker k computes the strip of the tile's output row oh0 + k, lane l the channel
// vector c0 = (blockIdx.y * lanes + l) * V (active: c0 < C).
struct BandThread {
  int lane, walker, c0;
  bool active;
};

MNET_DEVICE BandThread band_thread(const DwParams& p, const BandTilePlan& b, int V) {
  BandThread th;
  th.walker = (int)div_of(b.lanes_div, threadIdx.x);
  th.lane = (int)threadIdx.x - th.walker * b.lanes;
  th.c0 = ((int)blockIdx.y * b.lanes + th.lane) * V;
  th.active = th.c0 < p.C;
  return th;
}

// Shared memory of a staged kernel: the band (stage_floats) first, 16-byte aligned, then the parameter rows.
MNET_HD size_t band_smem_bytes(const BandTilePlan& b, int K, int param_rows) {
  return (size_t)b.stage_floats() * 4 + param_smem_bytes(K, b.V, param_rows, b.lanes);
}
// The largest block (K = 7, 2-byte vectors, 8 lanes, the stats' static tree) within the 99 KB a block may opt into
// on sm_86 / sm_89 (cudaFuncSetAttribute fails above it; tile.h: kBandStageBytes).
constexpr size_t kSmemOptinSm86 = 99 * 1024;
static_assert(kBandStageBytes + param_smem_bytes(7, 8, 2, kBandLaneSlots) +
                      sizeof(Welford) * kBandLaneSlots * kBandRowsMax <= kSmemOptinSm86,
              "the staged band kernels' shared memory exceeds sm_86/sm_89's per-block opt-in limit");

// The tile's input band -> stage (this thread's lane slot of staged row 0; tile.h: staged row r = input row
// ih_base + r * row_step, column j = iw0 + j * in_step): the staged rows inside the image (band_rows_inside) one
// per walker in turn from the first, one 16-byte load of the lane's V channels per column (zero outside the image's
// columns) and V / 4 16-byte stores; then the rows above and below the image as zeros only. WHOLE (whole-row
// strips, tile.h: BandTilePlan::whole): the columns inside are [P, NCOL - P) in every tile, loaded without a test;
// the padding columns are neither loaded nor stored (the conv skips them).
template <typename T, int V, int NCOL, bool WHOLE, int P>
MNET_DEVICE void stage_band(const DwParams& p, const BandTilePlan& b, const T* xn, int ih_base, int iw0, int in_step,
                            int walker, float4* stage) {
  constexpr int NQ = V / 4, JLO = WHOLE ? P : 0, JHI = WHOLE ? NCOL - P : NCOL;
  const uint32_t cols = WHOLE ? ~0u : column_mask(iw0, in_step, (int)p.W, NCOL);
  const uint32_t col = (uint32_t)(in_step * (int)p.xs.w);  // unsigned: no sign extension per column offset
  int lo, hi;
  band_rows_inside(b, (int)p.H, ih_base, lo, hi);
#pragma unroll 1
  for (int r = lo + walker; r < hi; r += b.R) {
    const T* src = xn + mul_wide(ih_base + r * b.row_step, (int)p.xs.h) + mul_wide(iw0, (int)p.xs.w);
    float4* dst = stage + r * b.pitch;
#pragma unroll
    for (int j = JLO; j < JHI; ++j) {
      float xv[V];
      load_vec<T, V, true>(src + (uint32_t)j * col, (cols >> j) & 1u, V, xv);
#pragma unroll
      for (int q = 0; q < NQ; ++q)
        dst[(j * NQ + q) * kBandLaneSlots] = make_float4(xv[4 * q], xv[4 * q + 1], xv[4 * q + 2], xv[4 * q + 3]);
    }
  }
  const int zeros = b.rows_in - (hi - lo);  // rows [0, lo) and [hi, rows_in)
#pragma unroll 1
  for (int z = walker; z < zeros; z += b.R) {
    float4* dst = stage + (z < lo ? z : z - lo + hi) * b.pitch;
#pragma unroll
    for (int j = JLO * NQ; j < JHI * NQ; ++j) dst[j * kBandLaneSlots] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
}

// z of one strip from the staged band: srow = this thread's lane slot of its staged row for kernel row 0
// (walker * row_a), kernel rows row_b staged rows apart; wl: this lane's weights ([K*K][V] in shared memory). Each
// window column is V / 4 LDS.128 at compile-time offsets (bank pattern: tile.h). Row 0 peeled, as in conv_strip.
// WHOLE: the window's first and last (K - 1) / 2 columns are padding in every tile and are skipped.
template <int K, int J, int TW, int V, bool WHOLE>
MNET_DEVICE void band_conv_strip(const BandTilePlan& b, const float4* srow, const float* wl, float (&acc)[TW][V]) {
  constexpr int NQ = V / 4;
  const auto load = [&](int j, float(&xv)[V]) {
#pragma unroll
    for (int q = 0; q < NQ; ++q) {
      const float4 f = srow[(j * NQ + q) * kBandLaneSlots];
      xv[4 * q] = f.x;
      xv[4 * q + 1] = f.y;
      xv[4 * q + 2] = f.z;
      xv[4 * q + 3] = f.w;
    }
  };
  constexpr int NCOL = strip_cols(J, TW, K), P = WHOLE ? (K - 1) / 2 : 0;
  conv_row_with<K, J, TW, V, true, P, NCOL - P>(load, wl, acc);
  const int rstep = b.row_b * b.pitch;
#pragma unroll 1
  for (int kh = 1; kh < K; ++kh) {
    srow += rstep;
    wl += K * V;
    conv_row_with<K, J, TW, V, false, P, NCOL - P>(load, wl, acc);
  }
}

// The block's tiles (chunk blockIdx.x of the plan's tiles, in order): stage the band, one strip per walker, then
// f(sp, acc) with sp.count = 0 for a walker past Ho or an inactive lane (every thread of the block must call this:
// it synchronises). stage: the dynamic shared memory (the band), wl: this lane's weights. WHOLE = b.whole.
template <typename T, int K, int J, int TW, bool WHOLE, typename F>
MNET_DEVICE void band_tiles(const DwParams& p, const BandTilePlan& b, const BandThread& th, float4* stage,
                            const float* wl, F&& f) {
  constexpr int V = tile_vec((int)sizeof(T), true), NCOL = strip_cols(J, TW, K);
  const int in_step = J == 2 ? 1 : p.dilation;
  const T* xl = static_cast<const T*>(p.x) + mul_wide(th.c0, (int)p.xs.c);
  const float4* srow = stage + th.walker * b.row_a * b.pitch + th.lane;
  uint32_t begin, end;
  band_chunk_tiles(b, blockIdx.x, begin, end);  // tiles < 2^31: band_launch_plan
#pragma unroll 1
  for (uint32_t tile = begin; tile < end; ++tile) {
    uint32_t n, oh0, ow0;
    band_tile_origin(b, tile, n, oh0, ow0);
    const int iw0 = (int)ow0 * p.stride - p.pad;
    if (th.active)
      stage_band<T, V, NCOL, WHOLE, (K - 1) / 2>(p, b, xl + (int64_t)n * p.xs.n, (int)oh0 * p.stride - p.pad, iw0,
                                                 in_step, th.walker, stage + th.lane);
    __syncthreads();  // the band is staged
    StripPos sp;
    sp.n = n;
    sp.oh = (int)oh0 + th.walker;
    sp.ow0 = (int)ow0;
    sp.count = th.active && sp.oh < p.Ho ? strip_count(b.sg, (int)p.Wo, (int)ow0, TW) : 0;
    float acc[TW][V];
    band_conv_strip<K, J, TW, V, WHOLE>(b, srow, wl, acc);
    f(sp, acc);
    __syncthreads();  // every walker is done with the band before the next tile overwrites it
  }
}

template <typename T, int K, int J, int TW, bool WHOLE>
__global__ void __launch_bounds__(kBandLaneSlots* kBandRowsMax, 2)
    fwd_band_kernel(const DwParams p, const BandTilePlan b) {
  constexpr int V = tile_vec((int)sizeof(T), true), WL = weight_lane_floats(K, V);
  MNET_DYNAMIC_SMEM(float4, stage);
  float* sh = reinterpret_cast<float*>(stage) + b.stage_floats();
  const BandThread th = band_thread(p, b, V);
  stage_params<T, K, V, true>(p, b.lanes, (int64_t)blockIdx.y * b.lanes * V, sh, p.mean, p.invstd, p.gamma, p.beta);
  const float* shv = sh + b.lanes * WL + th.lane * 2 * V;  // scale, shift
  const int ystep = b.sg.out_step * (int)p.ys.w;
  band_tiles<T, K, J, TW, WHOLE>(p, b, th, stage, sh + th.lane * WL, [&](const StripPos& sp, const float(&acc)[TW][V]) {
    T* y = static_cast<T*>(p.y) + out_offset(p.ys, sp, 0, b.sg.out_step, th.c0);
    float scale[V], shift[V];
    load_shared<V>(shv, scale);
    load_shared<V>(shv + V, shift);
    MNET_DISPATCH_CONV_ACT(p.act, A, [&] {
      fwd_epilogue<A, T, TW, V, true>(y, ystep, sp.count, V, scale, shift, acc);
    });
  });
}

// Welford partials per (chunk, channel) as stats_partial_kernel's, over the chunk's tiles.
template <typename T, int K, int J, int TW, bool WHOLE>
__global__ void __launch_bounds__(kBandLaneSlots* kBandRowsMax, 2)
    stats_band_kernel(const DwParams p, const BandTilePlan b) {
  constexpr int V = tile_vec((int)sizeof(T), true), WL = weight_lane_floats(K, V);
  static_assert(sizeof(Welford) * kBandLaneSlots * kBandRowsMax <= kBandTreeBytes, "tile.h: band_stage_budget");
  MNET_DYNAMIC_SMEM(float4, stage);
  MNET_SHARED_ARRAY(Welford, tree, kBandLaneSlots * kBandRowsMax);
  float* sh = reinterpret_cast<float*>(stage) + b.stage_floats();
  const BandThread th = band_thread(p, b, V);
  stage_params<T, K, V>(p, b.lanes, (int64_t)blockIdx.y * b.lanes * V, sh);
  float count = 0.0f, mean[V], m2[V];
#pragma unroll
  for (int v = 0; v < V; ++v) mean[v] = m2[v] = 0.0f;
  band_tiles<T, K, J, TW, WHOLE>(p, b, th, stage, sh + th.lane * WL, [&](const StripPos& sp, const float(&z)[TW][V]) {
    welford_add_strip<TW, V>(count, mean, m2, z, sp.count);
  });
  const int64_t nc = b.nchunks * p.C;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const Welford r = block_tree(Welford{count, mean[v], m2[v]}, tree, b.lanes, b.R,
                                 [](const Welford& a, const Welford& c) { return welford_combine(a, c); });
    if (th.walker == 0 && th.active) {
      float* o = p.work + blockIdx.x * p.C + th.c0 + v;
      o[0] = r.count;
      o[nc] = r.mean;
      o[2 * nc] = r.m2;
    }
  }
}

// =======================================================================================================
// statistics: per (chunk, channel) Welford partials -> work[(j * nchunks + chunk) * C + c], j = count, mean, m2
// =======================================================================================================
template <typename T, int K, int J, bool CL, bool FULL, int TW>
__global__ void __launch_bounds__(plan_threads(kThreads, strip_wide(CL)), 2)
    stats_partial_kernel(const DwParams p, const TilePlan t) {
  constexpr int V = tile_vec((int)sizeof(T), CL);
  MNET_DYNAMIC_SMEM(float, sh);
  MNET_SHARED_ARRAY(Welford, tree, kThreads);
  const Lane l = lane_of(p, t);
  stage_params<T, K, V>(p, t.lg.lanes, lane_c0(t, blockIdx.y, 0), sh);
  int64_t begin, end;
  chunk_range(t.strips, t.nchunks, blockIdx.x, begin, end);
  // Running (count, mean, M2) per channel; the count is the same for the V channels of a lane (one register).
  float count = 0.0f, mean[V], m2[V];
#pragma unroll
  for (int v = 0; v < V; ++v) mean[v] = m2[v] = 0.0f;
  if (l.valid > 0) {
    const T* xl = static_cast<const T*>(p.x) + mul_wide(l.c0, (int)p.xs.c);
    for (uint32_t s = (uint32_t)begin + l.walker; s < (uint32_t)end; s += t.lg.walkers) {  // < 2^31: launch_plan
      const StripPos sp = strip_pos(p, t, s);
      float z[TW][V];
      conv_strip<T, K, J, TW, V, FULL>(p, xl, l, sp, sh + l.lane * weight_lane_floats(K, V), z);
      welford_add_strip<TW, V>(count, mean, m2, z, sp.count);
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
                                 const float* shv, const float (&z)[TW][V], Sum2 (&acc)[V]) {
  const T* __restrict__ gy = static_cast<const T*>(p.grad_y);
#pragma unroll
  for (int m = 0; m < TW; ++m) {
    if (m >= sp.count) break;
    float g[V];
    load_vec<T, V, FULL>(gy + out_offset(p.gs, sp, m, t.sg.out_step, l.c0), true, l.valid, g);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const float xhat = (z[m][v] - shv[v]) * shv[V + v];  // shv: mean, invstd, gamma, beta of this lane
      const float gv = act_bwd<A>(fmaf(xhat, shv[2 * V + v], shv[3 * V + v]), g[v]);
      acc[v].a += gv;
      acc[v].b = fmaf(gv, xhat, acc[v].b);
    }
  }
}

template <typename T, int K, int J, bool CL, bool FULL, int TW>
__global__ void __launch_bounds__(plan_threads(kThreads, strip_wide(CL)), 2)
    bwd_reduce_partial_kernel(const DwParams p, const TilePlan t) {
  constexpr int V = tile_vec((int)sizeof(T), CL);
  MNET_DYNAMIC_SMEM(float, sh);
  MNET_SHARED_ARRAY(Sum2, tree, kThreads);
  const Lane l = lane_of(p, t);
  stage_params<T, K, V>(p, t.lg.lanes, lane_c0(t, blockIdx.y, 0), sh, p.mean, p.invstd, p.gamma, p.beta);
  int64_t begin, end;
  chunk_range(t.strips, t.nchunks, blockIdx.x, begin, end);
  Sum2 acc[V];
#pragma unroll
  for (int v = 0; v < V; ++v) acc[v] = Sum2{0.0f, 0.0f};
  if (l.valid > 0) {
    const float* shv = sh + t.lg.lanes * weight_lane_floats(K, V) + l.lane * 4 * V;
    const T* xl = static_cast<const T*>(p.x) + mul_wide(l.c0, (int)p.xs.c);
    for (uint32_t s = (uint32_t)begin + l.walker; s < (uint32_t)end; s += t.lg.walkers) {  // < 2^31: launch_plan
      const StripPos sp = strip_pos(p, t, s);
      float z[TW][V];
      conv_strip<T, K, J, TW, V, FULL>(p, xl, l, sp, sh + l.lane * weight_lane_floats(K, V), z);
      MNET_DISPATCH_CONV_ACT(p.act, A, [&] { reduce_epilogue<A, T, TW, V, FULL>(p, t, l, sp, shv, z, acc); });
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
//      by strip as the forward does, into the shared tile as fp32 [row][Wo][cb];
//   2. dx of input rows [ib0, ib1): one pixel x V channels per thread, gathered from the dz tile;
//   3. dweight: thread (lane, kernel row kh, walker) accumulates sum dz * x over the owned output rows for the K
//      taps of its kernel row (x re-read through L1) in registers, then, once every thread is done with the dz
//      tile, stores its sums into the tile's space ([walker][kh][kw][cb]);
//   4. the block's dweight sums ([K*K][cb] in shared memory) add the item's walker sums, in walker order.
// One partial per (block, tap, channel) in part[(chunk * K*K + tap) * C + c]; dweight_final_kernel sums the chunks
// in order: every sum's order is fixed by the shape. (The walkers' sums live in the dz tile's space, not in slots of
// their own across items: that keeps a block within tile.h's kSmemTwoBlocks, 2 blocks per SM on sm_80.) No fp32 dz
// in DRAM: the pass reads x and grad_y once (plus the halo rows) and writes dx.
MNET_HD constexpr int ilog2(int v) { return v <= 1 ? 0 : 1 + ilog2(v >> 1); }

static_assert(kApplyThreads == kThreads, "the backward apply's plan (tile.h) assumes its block size");

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
__global__ void __launch_bounds__(kThreads, 2) bwd_apply_kernel(const DwParams p, const BandPlan b) {
  constexpr int V = tile_vec((int)sizeof(T), CL), TW = narrow_tile_width(CL, J), KK = K * K;
  constexpr int NCOL = strip_cols(J, TW, K);
  MNET_DYNAMIC_SMEM(float, sh);
  const int cb = b.cb, lanes = b.lanes, lshift = ilog2(b.lanes);
  float* dzt = sh;                      // [dz_rows][Wo][cb], then the walkers' dweight sums (tile.h: BandPlan)
  float* dwb = sh + b.tile_floats;      // [K*K][cb] the block's dweight sums
  constexpr int WL = weight_lane_floats(K, V);
  float* wsh = dwb + KK * cb;           // [lane][WL] weights (stage_params' layout), then [6][cb]
  float* shv0 = wsh + lanes * WL;
  {
    const int64_t cbase = (int64_t)blockIdx.y * cb;
    const T* __restrict__ w = static_cast<const T*>(p.weight);
    const float* vecs[6] = {p.mean, p.invstd, p.gamma, p.beta, p.mean_g, p.mean_g_xhat};
    for (int cl = threadIdx.x; cl < cb; cl += blockDim.x) {
      const int64_t c = cbase + cl;
      const bool in = c < p.C;
      const int lane = cl / V, v = cl - lane * V;
#pragma unroll
      for (int r = 0; r < KK; ++r) wsh[lane * WL + r * V + v] = in ? to_f(w[c * KK + r]) : 0.0f;
#pragma unroll
      for (int r = 0; r < 6; ++r) shv0[r * cb + cl] = in ? vecs[r][c] : 0.0f;
    }
    for (int i = threadIdx.x; i < KK * cb; i += blockDim.x) dwb[i] = 0.0f;
  }
  // Dweight role of this thread (step 3): lane, kernel row, walker.
  const int lane3 = threadIdx.x & (lanes - 1), kh3 = (threadIdx.x >> lshift) % K, w3 = (threadIdx.x >> lshift) / K;
  const int walkers3 = b.dw_walkers;
  Lane l3;
  l3.lane = lane3;
  l3.walker = w3;
  l3.c0 = ((int)blockIdx.y * lanes + lane3) * V;
  l3.valid = (int)(p.C - l3.c0 < V ? p.C - l3.c0 : V);
  float* myslot = dzt + (int64_t)(w3 * K + kh3) * K * cb + lane3 * V;  // [kw][cb] of this thread in the tile
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const StripGeom& sg = b.sg;
  const int64_t Wo = p.Wo, per_row = sg.per_row;
  __syncthreads();

  for (int64_t item = blockIdx.x; item < p.N * b.bands; item += gridDim.x) {
    const int64_t n = item / b.bands;
    const BandRows br = band_rows(p, item - n * b.bands, b.rows);
    // 1. dz of rows [r0, r1)
    // Item counts per band stay below 2^31 (a band's rows x its row's strips or pixels x 8 lanes; check_bands):
    // 32-bit items, rows by the band plan's multiply-high divisors (tile.h; check_bands runs them on the host). The
    // dweight loop keeps its int64 division: 32-bit there left ptxas spilling 112 B at K = 7 in fp16.
    const uint32_t items1 = (uint32_t)(((br.r1 - br.r0) * per_row) << lshift);
    for (uint32_t it = threadIdx.x; it < items1; it += blockDim.x) {
      Lane l;
      l.lane = (int)(it & (lanes - 1));
      l.walker = 0;
      l.c0 = ((int)blockIdx.y * lanes + l.lane) * V;
      l.valid = (int)(p.C - l.c0 < V ? p.C - l.c0 : V);
      const uint32_t q = it >> lshift, r = div_of(b.per_row, q);
      StripPos sp;
      sp.n = n;
      sp.oh = (int)(br.r0 + r);
      sp.ow0 = (int)strip_ow0(sg, q - r * b.per_row.d, TW);
      const int rest = (int)Wo - sp.ow0, left = sg.out_step == 2 ? (rest + 1) >> 1 : rest;
      sp.count = left < TW ? left : TW;
      float* dzrow = dzt + r * Wo * cb + l.lane * V;
      if (l.valid <= 0 || sp.count <= 0) continue;
      float z[TW][V];
      conv_strip<T, K, J, TW, V, FULL>(p, x + mul_wide(l.c0, (int)p.xs.c), l, sp, wsh + l.lane * WL, z);
      MNET_DISPATCH_CONV_ACT(p.act, A, [&] {
        dz_epilogue<A, T, TW, V, FULL>(p, sg, l, sp, shv0 + l.lane * V, cb, z, dzrow);
      });
    }
    __syncthreads();
    // 2. dx of input rows [ib0, ib1): gather dz over the taps that read each pixel
    const uint32_t items2 = (uint32_t)(((br.ib1 - br.ib0) * p.W) << lshift);
    for (uint32_t it = threadIdx.x; it < items2; it += blockDim.x) {
      const int lane = (int)(it & (lanes - 1));
      const int64_t c0 = ((int64_t)blockIdx.y * lanes + lane) * V;
      const int valid = (int)(p.C - c0 < V ? p.C - c0 : V);
      if (valid <= 0) continue;
      const uint32_t q = it >> lshift, rr = div_of(b.w, q);
      const int ih = (int)(br.ib0 + rr), iw = (int)(q - rr * b.w.d);
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
          load_shared<V>(wsh + lane * WL + (kh * K + kw) * V, w);
#pragma unroll
          for (int v = 0; v < V; ++v) acc[v] = fmaf(w[v], d[v], acc[v]);
        }
      }
      T* dx = static_cast<T*>(p.y) + n * p.ys.n + (int64_t)ih * p.ys.h + (int64_t)iw * p.ys.w + c0 * p.ys.c;
      store_vec<T, V, FULL>(dx, valid, acc);
    }
    // 3. dweight over the owned rows [ob0, ob1): dwacc[kw][v] += dz[oh][ow] * x[ih][iw] for kernel row kh3
    float dwacc[K][V];
#pragma unroll
    for (int kw = 0; kw < K; ++kw)
#pragma unroll
      for (int v = 0; v < V; ++v) dwacc[kw][v] = 0.0f;
    if (w3 < walkers3 && l3.valid > 0) {
      const int64_t strips3 = (br.ob1 - br.ob0) * per_row;
      for (int64_t st = w3; st < strips3; st += walkers3) {
        const int64_t r = st / per_row;
        const int oh = (int)(br.ob0 + r);
        const int ih = oh * p.stride - p.pad + kh3 * p.dilation;
        if ((unsigned)ih >= (unsigned)p.H) continue;
        const int ow0 = (int)strip_ow0(sg, st - r * per_row, TW);
        const int rest = (int)Wo - ow0, left = sg.out_step == 2 ? (rest + 1) >> 1 : rest;
        const int count = left < TW ? left : TW;
        const float* dzr = dzt + (oh - br.r0) * Wo * cb + lane3 * V;
        float dz[TW][V];
#pragma unroll
        for (int m = 0; m < TW; ++m) {
          if (m < count) {
            load_shared<V>(dzr + (int64_t)(ow0 + m * sg.out_step) * cb, dz[m]);
          } else {  // past Wo: not read (another row's dz, or past the dz rows)
#pragma unroll
            for (int v = 0; v < V; ++v) dz[m][v] = 0.0f;
          }
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
    }
    __syncthreads();  // every thread is done with the dz tile: its space takes the walkers' sums
    if (w3 < walkers3)
#pragma unroll
      for (int kw = 0; kw < K; ++kw)
#pragma unroll
        for (int v = 0; v < V; ++v) myslot[kw * cb + v] = dwacc[kw][v];
    __syncthreads();
    // 4. the block's sums += the item's walker sums, in walker order (thread i keeps entries i, i + 256, ...)
#pragma unroll 1
    for (int i = threadIdx.x; i < KK * cb; i += blockDim.x) {
      float s = 0.0f;
      int w = 0;
      // One loop, no unrolled copy, and a do-while (walkers3 >= 1: check_bands) so that nvcc adds no zero-trip
      // version of the outer loop: the report's plan mirrors a single loop.
#pragma unroll 1
      do s += dzt[(int64_t)w * KK * cb + i];
      while (++w < walkers3);
      dwb[i] += s;
    }
    __syncthreads();  // the next item overwrites the tile
  }
  // The block's partial (each thread stores the entries it summed in step 4).
  for (int i = threadIdx.x; i < KK * cb; i += blockDim.x) {
    const int tap = i / cb, cl = i - tap * cb;
    const int64_t c = (int64_t)blockIdx.y * cb + cl;
    if (c < p.C) p.work[((int64_t)blockIdx.x * KK + tap) * p.C + c] = dwb[i];
  }
}

// dweight[c, tap] = sum over chunks of part[(chunk * KK + tap) * C + c] (in chunk order; 32 lanes over the
// flattened (tap, c) index x 8 walkers over the chunks, in double, then a fixed tree).
template <typename T>
__global__ void __launch_bounds__(kFinalLanes* kFinalWalkers)
    dweight_final_kernel(const float* __restrict__ part, int64_t nchunks, int64_t C, int kk, T* dweight) {
  MNET_SHARED_ARRAY(double, tree, kFinalLanes * kFinalWalkers);
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

// conv_strip and out_offset step rows, columns and channels by 32-bit element strides (a window's span included).
// Channel indices are ints (c0 * channel stride too).
inline void check_strides(const DwParams& p, int TW) {
  const int64_t span = (int64_t)strip_cols(2, TW, p.k) * 2 + 2 * (int64_t)p.k;
  for (const int64_t st : {p.xs.h, p.xs.w, p.gs.h, p.gs.w, p.ys.h, p.ys.w})
    if ((st < 0 ? -st : st) * span >= (int64_t(1) << 31))
      throw std::runtime_error("mnet_ext: a row or column stride is too large for the CUDA kernels");
  for (const int64_t st : {p.xs.c, p.gs.c, p.ys.c})
    if ((st < 0 ? -st : st) * (p.C + 16) >= (int64_t(1) << 31))
      throw std::runtime_error("mnet_ext: a channel stride is too large for the CUDA kernels");
}

inline TilePlan launch_plan(const DwParams& p, int elem_size) {
  const TilePlan t = tile_plan(p, elem_size, kThreads);
  if (t.strips >= (int64_t(1) << 31))
    throw std::runtime_error("mnet_ext: the activation is too large for the CUDA kernels (N * Ho * strips per row "
                             ">= 2^31); split the batch");
  if (t.lg.groups > 65535)
    throw std::runtime_error("mnet_ext: too many channels for the CUDA kernels (more than 65535 channel groups)");
  check_strides(p, t.TW);
  return t;
}

// The staged kernels' plan (channels_last, FULL), checked for the kernels' 32-bit indices.
inline BandTilePlan band_launch_plan(const DwParams& p, int elem_size, bool reduction) {
  const BandTilePlan b = band_tile_plan(p, elem_size, reduction);
  if (b.tiles >= (int64_t(1) << 31))
    throw std::runtime_error("mnet_ext: the activation is too large for the CUDA kernels (N * bands * strips per row "
                             ">= 2^31); split the batch");
  if (b.groups > 65535)
    throw std::runtime_error("mnet_ext: too many channels for the CUDA kernels (more than 65535 channel groups)");
  if (p.H >= (int64_t(1) << 30))  // band_rows_inside's 32-bit row arithmetic
    throw std::runtime_error("mnet_ext: the input is too tall for the CUDA kernels (H >= 2^30)");
  check_strides(p, b.TW);
  return b;
}

// Calls launch(std::integral_constant<int, TW>{}) with the strip width TW of plan t (a TilePlan or BandTilePlan;
// tile.h: strip_tile_width),
// instantiating only the widths this (layout, column pattern) can take.
template <bool CL, int J, int K, typename P, typename F>
inline void launch_strips(const P& t, F&& launch) {
  const auto go = [&](auto tw) {
    if (t.TW != decltype(tw)::value) throw std::logic_error("mnet_ext: strip width differs from the tile plan's");
    launch(tw);
  };
  if constexpr (!strip_wide(CL)) {
    go(std::integral_constant<int, narrow_tile_width(CL, J)>{});
  } else if constexpr (long_strips(J, K)) {
    if (t.TW == kLongTW) go(std::integral_constant<int, kLongTW>{});
    else go(std::integral_constant<int, kWideTW>{});
  } else {
    go(std::integral_constant<int, kWideTW>{});
  }
}

// The staged kernels' launch: launch(tw, whole) with the plan's strip width (launch_strips) and whole-row flag
// (std::true_type / std::false_type; tile.h: BandTilePlan::whole, instantiated only at J = 1, where it can hold).
template <int J, int K, typename F>
inline void launch_band(const BandTilePlan& b, F&& launch) {
  launch_strips<true, J, K>(b, [&](auto tw) {
    if constexpr (J == 1) {
      if (b.whole) launch(tw, std::true_type{});
      else launch(tw, std::false_type{});
    } else {
      if (b.whole) throw std::logic_error("mnet_ext: whole-row band tiles need the column pattern J = 1");
      launch(tw, std::false_type{});
    }
  });
}

// Dynamic shared memory above the 48 KB default needs an opt-in per kernel.
template <typename F>
inline void allow_smem(F kernel, size_t bytes) {
  if (bytes > 48 * 1024) MNET_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                              (int)bytes));
}

// The staged kernels' launch preamble, shared by fwd.cu and stats.cu: plan (band_launch_plan; `reduction`: the
// stats' chunks), shared memory (the band and `param_rows` per-channel rows besides the weights), the opt-in, and a
// launch of kernel_of(tw, whole) (the instantiation for launch_band's strip width and whole-row flag) on grid
// (chunks, channel groups). Returns the plan (stats sizes its final combine by its chunks).
template <typename T, int J, int K, typename KernelOf>
inline BandTilePlan launch_band_kernel(const DwParams& p, bool reduction, int param_rows, cudaStream_t stream,
                                       KernelOf&& kernel_of) {
  const BandTilePlan b = band_launch_plan(p, (int)sizeof(T), reduction);
  const size_t smem = band_smem_bytes(b, K, param_rows);
  launch_band<J, K>(b, [&](auto tw, auto whole) {
    const auto kernel = kernel_of(tw, whole);
    allow_smem(kernel, smem);
    kernel<<<dim3((unsigned)b.nchunks, (unsigned)b.groups), (unsigned)b.threads(), smem, stream>>>(p, b);
  });
  return b;
}

// fwd: blocks along the strips so that each thread walks 16, 8 or 4 strips: the most that leaves at least
// kFwdMinBlocks blocks (a few waves of 2 blocks per SM), else 4 (amortises the parameter staging and prologue).
constexpr int64_t kFwdMinBlocks = 1024;
inline unsigned fwd_blocks(const TilePlan& t) {
  int64_t blocks = 0;
  for (int64_t per = 16; per >= 4; per >>= 1) {
    blocks = (t.strips + t.lg.walkers * per - 1) / (t.lg.walkers * per);
    if (blocks * t.lg.groups >= kFwdMinBlocks) break;
  }
  return (unsigned)blocks;
}

inline unsigned final_blocks(int64_t C) { return (unsigned)((C + kFinalLanes - 1) / kFinalLanes); }

}  // namespace dev
}  // namespace mnet
