// The tensor-core eval forward at stride 1 or 2 (bf16/fp16, channels_last, C % 8 == 0, dilation 1, K 3/5/7; sm_80+):
// geometry and the contraction in mma_tile.h. Per lane: the weights' B fragments (one 32-bit word per tap, nonzero
// for the two lanes whose column g holds that row pair) and the BN fold of its two output channels, once per block;
// per tile, its share of the warp's staging (cp.async, zero-filled outside the image), then per m-tile of 4 x 4
// outputs ceil(K*K / 2) ldmatrix + mma and the epilogue on its 4 accumulators (2 positions x 2 channels).
// Why tensor cores: with fp32 CUDA-core FMAs the K5 stride-2 band kernel's floor (~37.6 SASS per output element:
// 25 FFMA + conversions + memory) is over the issue budget of 36, and at stride 1 the band kernels' (K3 15.7-17.6,
// K5 32.0-35.1) leave no room for the layer's activation; here one HMMA does 16 x 8 x 16 MACs.
#pragma once

#include <stdint.h>

#include <stdexcept>

#include "common/activations.h"
#include "common/cuda_check.cuh"
#include "common/device.cuh"
#include "common/dispatch.h"
#include "common/math.h"
#include "dwconv_bn_act/kernels.cuh"
#include "dwconv_bn_act/mma_tile.h"
#include "dwconv_bn_act/params.h"

namespace mnet {
namespace dev {

// act(z * scale + shift) for this lane's two channels as the 4 bytes of a pair of T (device.cuh: act_pair).
template <Act A, typename T>
MNET_DEVICE uint32_t mma_out_pair(float z0, float z1, const float (&scale)[2], const float (&shift)[2]) {
  return act_pair<A, T>(fmaf(z0, scale[0], shift[0]), fmaf(z1, scale[1], shift[1]));
}

// Whether either 16-bit half of w is a NaN: exponent all ones and a nonzero mantissa, i.e. |h| above the Inf
// pattern (bf16 0x7f80, fp16 0x7c00); adding 0x7f / 0x3ff to |h| carries into bit 15 exactly then (no carry
// between the halves: |h| + 0x3ff < 0x10000).
template <typename T>
MNET_HD bool has_nan2(uint32_t w) {
  constexpr uint32_t below_nan = std::is_same<T, __nv_bfloat16>::value ? 0x007f007fu : 0x03ff03ffu;
  return (((w & 0x7fff7fffu) + below_nan) & 0x80008000u) != 0u;
}

// A word whose two 16-bit halves are NaN where a's or b's are (the union of their NaNs; the non-NaN values are
// not needed): on sm_80+ one max.NaN (HMNMX2), in the host emulator a select.
template <typename T>
MNET_DEVICE uint32_t nan_union2(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t r;
  if constexpr (std::is_same<T, __nv_bfloat16>::value)
    asm("max.NaN.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  else
    asm("max.NaN.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
#else
  uint32_t r = 0;
  for (int h = 0; h < 32; h += 16) {
    const uint32_t ha = (a >> h) & 0xffffu, hb = (b >> h) & 0xffffu;
    r |= (has_nan2<T>(ha) ? ha : hb) << h;
  }
  return r;
#endif
}

// The non-finite fix of the tensor-core forward, out of line (noinline: only non-finite inputs take it; the tile
// loop keeps its registers and the static report counts the finite path, bench/kernel_report.py).
// Why: the block-diagonal contraction multiplies every x of a slot by the other 7 channels' zeros too, and
// 0 * Inf = 0 * NaN = NaN, so one non-finite x turns the outputs of all 8 channels of its group NaN where the
// reference keeps it to its own channel. Every output so contaminated is NaN, and a NaN stays NaN through the BN
// fold (an FMA) and every activation (NaN-keeping max / min, x * NaN, sigmoid(NaN)) and the rounding to T, so
// testing the tile's stored outputs finds them all. This lane's output vectors (v = lane + 32 i, the kernel's
// layout) that hold a NaN are recomputed from global x (the plane holds the outputs by now) tap by tap in the
// taps' (kh, kw) order on the CUDA cores, padding read as zero as staged, then folded, activated and rounded as
// in the tile (mma_out_pair), and stored over the vector the tile stored.
// plane: the warp's plane holding the tile's outputs; n, oh0, ow0: the tile's first image, output row and column;
// c0: the warp's first channel; rows_left, cols_left, images: the tile's outputs inside y (the kernel's masks).
template <typename T, int K, int S, int TW>
MNET_DEVICE_COLD void mma_recompute_nan_outputs_cold(const DwParams& p, const float4* plane, int lane, int n,
                                                     int oh0, int ow0, int c0, int rows_left, int cols_left,
                                                     int images) {
  using G = MmaGeom<K, S, TW>;
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.weight) + (int64_t)c0 * (K * K);
#pragma unroll 1
  for (int i = 0; i < G::NV; ++i) {
    const int v = lane + 32 * i, r = G::vec_row(v), b = G::vec_image(v), c = G::vec_col(v);
    if (r >= rows_left || c >= cols_left || b >= images) continue;
    const uint4 got = reinterpret_cast<const uint4*>(plane)[r * G::OP + b * TW + c];
    if (!has_nan2<T>(got.x) && !has_nan2<T>(got.y) && !has_nan2<T>(got.z) && !has_nan2<T>(got.w)) continue;
    const int64_t img = (int64_t)(n + b) * p.xs.n;
    const int ih0 = S * (oh0 + r) - p.pad, iw0 = S * (ow0 + c) - p.pad;
    float z[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 1
    for (int t = 0; t < K * K; ++t) {
      const int ih = ih0 + t / K, iw = iw0 + t % K;
      const bool in = (unsigned)ih < (unsigned)p.H && (unsigned)iw < (unsigned)p.W;
      float xv[8];
      load_vec<T, 8, true>(x + img + (in ? ih * p.xs.h + iw * p.xs.w + c0 : c0), in, 8, xv);
#pragma unroll
      for (int e = 0; e < 8; ++e) z[e] = fmaf(xv[e], to_f(w[e * (K * K) + t]), z[e]);
    }
    uint32_t words[4];
    MNET_DISPATCH_CONV_ACT(p.act, A, [&] {
      MNET_UNROLL
      for (int j = 0; j < 4; ++j) {
        float scale[2], shift[2];
        MNET_UNROLL
        for (int h = 0; h < 2; ++h) {
          const int ch = c0 + 2 * j + h;
          const BnFold f = bn_fold(p.mean[ch], p.invstd[ch], p.gamma[ch], p.beta[ch]);
          scale[h] = f.scale;
          shift[h] = f.shift;
        }
        words[j] = mma_out_pair<A, T>(z[2 * j], z[2 * j + 1], scale, shift);
      }
    });
    T* dst = static_cast<T*>(p.y) + (int64_t)(n + b) * p.ys.n + (int64_t)(oh0 + r) * p.ys.h +
             (int64_t)(ow0 + c) * p.ys.w + c0;
    *reinterpret_cast<uint4*>(dst) = make_uint4(words[0], words[1], words[2], words[3]);
  }
}

// Grid (t.blocks, t.cblocks), t.GB warps; dynamic shared memory mma_smem_bytes(S, K, TW, t.GB): one plane per warp.
// p: x [N, H, W, C] and y [N, Ho, Wo, C] channels_last (element strides p.xs / p.ys, 16-byte aligned bases),
// weight [C, K*K], mean / invstd / gamma / beta [C] fp32; p.stride == S.
template <typename T, int K, int S, int TW>
__global__ void __launch_bounds__(128) fwd_mma_kernel(const __grid_constant__ DwParams p, const MmaTilePlan t) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using G = MmaGeom<K, S, TW>;
  constexpr int NP = K * K / 2, NU = G::NU, NM = G::MR * G::MC;
  MNET_DYNAMIC_SMEM(float4, stage);  // the type of the band kernels' (one extern declaration per name)
  const int warp = (int)threadIdx.x >> 5, lane = (int)threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int c0 = ((int)blockIdx.y * t.GB + warp) * 8;

  // B fragment words: tap w[c0 + g, tap] at row 2 tq (low half) or 2 tq + 1 (high half) of column g.
  uint32_t bw[K * K];
  const bool holds = (g >> 1) == tq;
  const uint16_t* wc = static_cast<const uint16_t*>(p.weight) + (int64_t)(c0 + g) * (K * K);
#pragma unroll
  for (int i = 0; i < K * K; ++i) bw[i] = holds ? (uint32_t)__ldg(wc + i) << ((g & 1) * 16) : 0u;
  float scale[2], shift[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int c = c0 + 2 * tq + j;
    const BnFold f = bn_fold(p.mean[c], p.invstd[c], p.gamma[c], p.beta[c]);
    scale[j] = f.scale;
    shift[j] = f.shift;
  }

  float4* plane = stage + warp * G::PLANE;
  // ldmatrix rows: lanes 0-15 give positions 0-15 under the pair's first tap, lanes 16-31 under its second.
  const int m = lane & 15, hi = lane >> 4;
  const SmemAddr a_lane = smem_addr(plane + mma_pos_row(m) * G::P + mma_pos_col(m));
  // Staging: lane stages input columns lane + 32 u (slot (lane % S) * PH + lane / S + (32 / S) u of each row).
  const SmemAddr s_lane = smem_addr(plane + (lane % S) * G::PH + lane / S);
  // This lane's D fragment positions (g / 4, g % 4) and (g / 4 + 2, g % 4) of an m-tile in the output layout.
  uint32_t* d_lane = reinterpret_cast<uint32_t*>(plane + (g >> 2) * G::OP + (g & 3)) + tq;
  // Output vectors v = lane + 32 i of a tile: row vr, image vb, column vc (vr = TH past the tile: rows_left <= TH),
  // and their offset in y from the tile's first output; the same in every tile.
  int vr[G::NV], vb[G::NV], vc[G::NV], voff[G::NV];
  const int xh = (int)p.xs.h, xw = (int)p.xs.w, yh = (int)p.ys.h, yw = (int)p.ys.w;
#pragma unroll
  for (int i = 0; i < G::NV; ++i) {
    const int v = lane + 32 * i;
    vr[i] = G::vec_row(v);
    vb[i] = G::vec_image(v);
    vc[i] = G::vec_col(v);
    voff[i] = vb[i] * (int)p.ys.n + vr[i] * yh + vc[i] * yw;
  }
  // Staged columns lane + 32 u: image ub, column uj of its window (uj = IN_COLS at S = 2: the zero column).
  int ub[NU], uj[NU];
#pragma unroll
  for (int u = 0; u < NU; ++u) {
    ub[u] = (lane + 32 * u) / G::JS;
    uj[u] = lane + 32 * u - ub[u] * G::JS;
  }
  const T* __restrict__ x = static_cast<const T*>(p.x);
  T* __restrict__ y = static_cast<T*>(p.y);

  const int64_t first = (int64_t)blockIdx.x * t.per_block;
  const int64_t last = first + t.per_block < t.tiles ? first + t.per_block : t.tiles;
#pragma unroll 1
  for (int64_t tile = first; tile < last; ++tile) {
    const uint32_t rest = div_of(t.col_div, (uint32_t)tile), tc = (uint32_t)tile - rest * t.col_tiles;
    const uint32_t ng = div_of(t.row_div, rest), tr = rest - ng * t.row_tiles, n = ng * G::IMG;
    const int images = (int)(p.N - n);  // images of the group inside the batch (>= IMG: all)
    const int oh0 = (int)tr * G::TH, ow0 = (int)tc * TW, ih0 = S * oh0 - p.pad, iw0 = S * ow0 - p.pad;

    // One pointer per column this lane stages, stepped by rows (a 64-bit add per row and column).
    const T* src[NU];
    bool col_in[NU];
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      src[u] = x + (int64_t)(n + ub[u]) * p.xs.n + mul_wide(ih0, xh) + mul_wide(iw0 + uj[u], xw) + c0;
      col_in[u] = (unsigned)(iw0 + uj[u]) < (unsigned)p.W && uj[u] < G::IN_COLS && ub[u] < G::IMG && ub[u] < images;
    }
#pragma unroll
    for (int i = 0; i < G::IN_ROWS; ++i) {
      const bool row_in = (unsigned)(ih0 + i) < (unsigned)p.H;
#pragma unroll
      for (int u = 0; u < NU; ++u) {
        if (u < NU - 1 || lane + 32 * u < G::IMG * G::JS)  // the last column of lanes: the window's end
          cp_async_16(s_lane + (SmemAddr)((G::slot(i, 0) + 32 / S * u) * 16), src[u], row_in && col_in[u]);
        src[u] += xh;
      }
    }
    cp_async_wait_all();
    syncwarp();  // the plane is the warp's own: every lane's copies landed

    float d[NM][4];
#pragma unroll
    for (int mt = 0; mt < NM; ++mt) {
      const int origin = G::origin(mt);
#pragma unroll
      for (int j = 0; j < 4; ++j) d[mt][j] = 0.0f;
#pragma unroll
      for (int pr = 0; pr < NP; ++pr) {
        const int t0 = G::tap(2 * pr), t1 = G::tap(2 * pr + 1);
        uint32_t a[4];
        ldmatrix<4>(a, a_lane + (SmemAddr)(hi * (t1 - t0) * 16) + (SmemAddr)((origin + t0) * 16));
        const uint32_t b[2] = {bw[2 * pr], bw[2 * pr + 1]};
        mma<T, 16>(d[mt], a, b);
      }
      uint32_t a[2];  // the last tap alone (K*K is odd): lanes 0-15's rows, m16n8k8
      ldmatrix<2>(a, a_lane + (SmemAddr)((origin + G::tap(K * K - 1)) * 16));
      const uint32_t b[1] = {bw[K * K - 1]};
      mma<T, 8>(d[mt], a, b);
    }
    syncwarp();  // every ldmatrix of the tile precedes the outputs' stores into the plane
    uint32_t out[NM][2];  // the switch computes only: its stores stay outside (one store path for every act)
    MNET_DISPATCH_CONV_ACT(p.act, A, [&] {
      MNET_UNROLL
      for (int mt = 0; mt < NM; ++mt) {
        out[mt][0] = mma_out_pair<A, T>(d[mt][0], d[mt][1], scale, shift);
        out[mt][1] = mma_out_pair<A, T>(d[mt][2], d[mt][3], scale, shift);
      }
    });
#pragma unroll
    for (int mt = 0; mt < NM; ++mt) {
      uint32_t* dst = d_lane + ((mt / G::MC) * 4 * G::OP + (mt % G::MC) * 4) * 4;
      dst[0] = out[mt][0];
      dst[2 * G::OP * 4] = out[mt][1];
    }
    syncwarp();  // the tile's outputs are in the plane
    T* yt = y + (int64_t)n * p.ys.n + mul_wide(oh0, yh) + mul_wide(ow0, yw) + c0;
    // rows_left <= TH: the vectors past a tile of TH * OW % 32 != 0 outputs (TW 28 at S = 2: vr = TH) are never
    // stored (else they land on the next tile's first row: a race, seen on the first GPU run).
    const int rows_left = (int)p.Ho - oh0 < G::TH ? (int)p.Ho - oh0 : G::TH, cols_left = (int)p.Wo - ow0;
    // The union of the stored outputs' NaNs (4 max.NaN per vector of 8 outputs; sm_90 SASS: 2 HMNMX2 + one
    // 3-input VHMNMX), tested once per tile: about 0.6 instructions per output instead of a test per accumulator.
    uint32_t nan_seen = 0u;
#pragma unroll
    for (int i = 0; i < G::NV; ++i)
      if (vr[i] < rows_left && vc[i] < cols_left && vb[i] < images) {
        const uint4 o = reinterpret_cast<const uint4*>(plane)[vr[i] * G::OP + vb[i] * TW + vc[i]];
        *reinterpret_cast<uint4*>(yt + voff[i]) = o;
        nan_seen = nan_union2<T>(nan_seen, nan_union2<T>(nan_union2<T>(o.x, o.y), nan_union2<T>(o.z, o.w)));
      }
    if (has_nan2<T>(nan_seen))  // rare: non-finite inputs (mma_recompute_nan_outputs_cold)
      mma_recompute_nan_outputs_cold<T, K, S, TW>(p, plane, lane, (int)n, oh0, ow0, c0, rows_left, cols_left, images);
    syncwarp();  // the plane's outputs are read before the next tile's copies land
  }
#endif
}

// Whether fwd.cu runs the tensor-core forward: its shape domain (mma_tile.h: mma_fwd_shape), 16-byte aligned x and y,
// and a device of compute capability 8.0 or newer (the kernel's body is empty below sm_80).
template <typename T>
inline bool use_mma_fwd(const DwParams& p) {
  if (!mma_fwd_shape(p) || !full_vectors<T>(p, {p.x, p.y})) return false;
  int device = 0, major = 0;
  MNET_CUDA_CHECK(cudaGetDevice(&device));
  MNET_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 8;
}

template <typename T, int K>
inline void launch_mma_fwd(const DwParams& p, cudaStream_t stream) {
  const MmaTilePlan t = mma_tile_plan(p);
  if (t.tiles >= (int64_t(1) << 31) || t.blocks >= (int64_t(1) << 31))
    throw std::runtime_error("mnet_ext: the activation is too large for the CUDA kernels (N * tiles >= 2^31); split "
                             "the batch");
  if (t.cblocks > 65535)
    throw std::runtime_error("mnet_ext: too many channels for the CUDA kernels (more than 65535 channel blocks)");
  check_strides(p, 28);  // 32-bit row and column offsets within a tile (IN_ROWS, IN_COLS < the strips' span)
  if (3 * (p.ys.n < 0 ? -p.ys.n : p.ys.n) >= (int64_t(1) << 31))  // voff: images of a tile apart, 32-bit
    throw std::runtime_error("mnet_ext: an image stride is too large for the CUDA kernels");
  const auto go = [&](auto tw) {
    constexpr int TW = decltype(tw)::value;
    MNET_DISPATCH_BOOL(p.stride == 2, S2, [&] {
      constexpr int S = S2 ? 2 : 1;
      const size_t smem = (size_t)mma_smem_bytes(S, K, TW, t.GB);
      allow_smem(fwd_mma_kernel<T, K, S, TW>, smem);
      fwd_mma_kernel<T, K, S, TW><<<dim3((unsigned)t.blocks, (unsigned)t.cblocks), (unsigned)(32 * t.GB), smem,
                                    stream>>>(p, t);
    });
  };
  if (t.TW == 8) go(std::integral_constant<int, 8>{});
  else if (t.TW == 16) go(std::integral_constant<int, 16>{});
  else go(std::integral_constant<int, 28>{});
}

}  // namespace dev
}  // namespace mnet
