// CUDA kernels of the dwconv_bn_act primitives. Plain CUDA: no ATen/torch headers (compile time), only the
// shared headers in csrc/common and the params struct. All indexing is int64.
//
// Thread mappings
//   elementwise kernels (fwd, dx): one thread per output element, walking the output in its memory order
//     (NHWC: consecutive threads = consecutive channels; NCHW: consecutive ow) so loads/stores coalesce.
//   reduction kernels (stats, bwd_reduce, dweight): a 256-thread block = L channel lanes x (256 / L) walkers,
//     L = 32 in channels_last (a warp reads 32 consecutive channels) and L = 1 in NCHW (the whole block walks
//     consecutive positions of one channel). Block b covers channel tile b % ctiles and a fixed chunk
//     b / ctiles of the M = N*Ho*Wo output positions. Each walker accumulates privately, the block combines
//     walkers by a fixed tree in shared memory and writes one partial per (channel, chunk); a second kernel
//     combines the partials of each channel in chunk order. Deterministic: no atomics, fixed orders.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common/activations.h"
#include "common/math.h"
#include "dwconv_bn_act/params.h"

namespace mnet {
namespace dev {

constexpr int kThreads = 256;

// ---- dtype conversion --------------------------------------------------------------------------------
MNET_DEVICE float to_f(float v) { return v; }
MNET_DEVICE float to_f(__half v) { return __half2float(v); }
MNET_DEVICE float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
MNET_DEVICE T from_f(float v);
template <>
MNET_DEVICE float from_f<float>(float v) { return v; }
template <>
MNET_DEVICE __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
MNET_DEVICE __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

MNET_DEVICE int64_t off4(const Strides4& s, int64_t n, int64_t c, int64_t h, int64_t w) {
  return n * s.n + c * s.c + h * s.h + w * s.w;
}

// Decompose a linear index over [N, C, h, w] walked in memory order (channels_last: c fastest).
template <bool CL>
MNET_DEVICE void decompose(int64_t i, int64_t C, int64_t h, int64_t w, int64_t& n, int64_t& c, int64_t& y,
                           int64_t& x) {
  if (CL) {
    c = i % C;
    i /= C;
    x = i % w;
    i /= w;
    y = i % h;
    n = i / h;
  } else {
    x = i % w;
    i /= w;
    y = i % h;
    i /= h;
    c = i % C;
    n = i / C;
  }
}

// Load the K x K input window of output (n, c, oh, ow) into registers (0 outside the image = padding).
template <typename T, int K>
MNET_DEVICE void load_window(const DwParams& p, const T* __restrict__ x, int64_t n, int64_t c, int64_t oh,
                             int64_t ow, float (&xv)[K * K]) {
  const T* xb = x + n * p.xs.n + c * p.xs.c;
#pragma unroll
  for (int kh = 0; kh < K; ++kh) {
    const int64_t ih = in_coord(oh, kh, p.stride, p.dilation, p.pad);
    const bool hin = ih >= 0 && ih < p.H;
#pragma unroll
    for (int kw = 0; kw < K; ++kw) {
      const int64_t iw = in_coord(ow, kw, p.stride, p.dilation, p.pad);
      xv[kh * K + kw] = (hin && iw >= 0 && iw < p.W) ? to_f(xb[ih * p.xs.h + iw * p.xs.w]) : 0.0f;
    }
  }
}

template <typename T, int K>
MNET_DEVICE void load_weights(const DwParams& p, int64_t c, float (&wv)[K * K]) {
  const T* w = static_cast<const T*>(p.weight) + c * (K * K);
#pragma unroll
  for (int t = 0; t < K * K; ++t) wv[t] = to_f(w[t]);
}

template <int K>
MNET_DEVICE float dot_window(const float (&xv)[K * K], const float (&wv)[K * K]) {
  float z = 0.0f;
#pragma unroll
  for (int t = 0; t < K * K; ++t) z = fmaf(wv[t], xv[t], z);
  return z;
}

// Position m in [0, M) -> (n, oh, ow).
MNET_DEVICE void position(const DwParams& p, int64_t m, int64_t& n, int64_t& oh, int64_t& ow) {
  ow = m % p.Wo;
  m /= p.Wo;
  oh = m % p.Ho;
  n = m / p.Ho;
}

// Block geometry of the reduction kernels (see the header comment).
template <bool CL>
struct RedGeom {
  static constexpr int L = CL ? 32 : 1;
  static constexpr int WALK = kThreads / L;
  int64_t c, chunk, m_begin, m_end;
  int lane, walker;
  MNET_DEVICE RedGeom(const DwParams& p, int64_t nchunks) {
    const int64_t ctiles = (p.C + L - 1) / L;
    const int64_t b = blockIdx.x;
    chunk = b / ctiles;
    lane = threadIdx.x % L;
    walker = threadIdx.x / L;
    c = (b % ctiles) * L + lane;
    const int64_t M = p.M();
    const int64_t per = (M + nchunks - 1) / nchunks;
    m_begin = chunk * per;
    m_end = m_begin + per < M ? m_begin + per : M;
  }
};

// Fixed-order tree over the walkers of a block: afterwards walker 0 of each lane holds the block's value.
template <bool CL, typename V, typename F>
MNET_DEVICE V block_combine(V v, V* sh, F combine) {
  constexpr int L = RedGeom<CL>::L, WALK = RedGeom<CL>::WALK;
  const int tid = threadIdx.x, walker = tid / L;
  sh[tid] = v;
  __syncthreads();
#pragma unroll
  for (int s = WALK / 2; s >= 1; s >>= 1) {
    if (walker < s) sh[tid] = combine(sh[tid], sh[tid + s * L]);
    __syncthreads();
  }
  V out = sh[tid];
  __syncthreads();  // sh is reused by the caller
  return out;
}

// =======================================================================================================
// forward: y = act(z * scale + shift)
// =======================================================================================================
template <typename T, int K, bool CL>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const DwParams p) {
  const T* __restrict__ x = static_cast<const T*>(p.x);
  T* __restrict__ y = static_cast<T*>(p.y);
  const int64_t total = p.N * p.C * p.Ho * p.Wo;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t n, c, oh, ow;
    decompose<CL>(i, p.C, p.Ho, p.Wo, n, c, oh, ow);
    float xv[K * K], wv[K * K];
    load_window<T, K>(p, x, n, c, oh, ow, xv);
    load_weights<T, K>(p, c, wv);
    const BnFold f = bn_fold(p.mean[c], p.invstd[c], p.gamma[c], p.beta[c]);
    const float u = dot_window<K>(xv, wv) * f.scale + f.shift;
    y[off4(p.ys, n, c, oh, ow)] = from_f<T>(act_fwd(p.act, u));
  }
}

// =======================================================================================================
// statistics: partial Welford per (channel, chunk) -> work[(c * nchunks + chunk) * 3 + {count, mean, m2}]
// =======================================================================================================
template <typename T, int K, bool CL>
__global__ void __launch_bounds__(kThreads) stats_partial_kernel(const DwParams p, int64_t nchunks) {
  __shared__ Welford sh[kThreads];
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const RedGeom<CL> g(p, nchunks);
  Welford acc = welford_init();
  if (g.c < p.C) {
    float wv[K * K];
    load_weights<T, K>(p, g.c, wv);
    for (int64_t m = g.m_begin + g.walker; m < g.m_end; m += RedGeom<CL>::WALK) {
      int64_t n, oh, ow;
      position(p, m, n, oh, ow);
      float xv[K * K];
      load_window<T, K>(p, x, n, g.c, oh, ow, xv);
      welford_add(acc, dot_window<K>(xv, wv));
    }
  }
  acc = block_combine<CL>(acc, sh, [](const Welford& a, const Welford& b) { return welford_combine(a, b); });
  if (g.walker == 0 && g.c < p.C) {
    float* o = p.work + (g.c * nchunks + g.chunk) * 3;
    o[0] = acc.count;
    o[1] = acc.mean;
    o[2] = acc.m2;
  }
}

// =======================================================================================================
// backward reduce: partial (sum g, sum g*xhat) per (channel, chunk) -> work[(c * nchunks + chunk) * 2 + j]
// =======================================================================================================
struct Sum2 {
  float a, b;
};

template <typename T, int K, bool CL>
__global__ void __launch_bounds__(kThreads) bwd_reduce_partial_kernel(const DwParams p, int64_t nchunks) {
  __shared__ Sum2 sh[kThreads];
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ gy = static_cast<const T*>(p.grad_y);
  const RedGeom<CL> g(p, nchunks);
  Sum2 acc{0.0f, 0.0f};
  if (g.c < p.C) {
    float wv[K * K];
    load_weights<T, K>(p, g.c, wv);
    const float mean = p.mean[g.c], invstd = p.invstd[g.c], gamma = p.gamma[g.c], beta = p.beta[g.c];
    for (int64_t m = g.m_begin + g.walker; m < g.m_end; m += RedGeom<CL>::WALK) {
      int64_t n, oh, ow;
      position(p, m, n, oh, ow);
      float xv[K * K];
      load_window<T, K>(p, x, n, g.c, oh, ow, xv);
      const float xhat = (dot_window<K>(xv, wv) - mean) * invstd;
      const float gv = act_bwd(p.act, xhat * gamma + beta, to_f(gy[off4(p.gs, n, g.c, oh, ow)]));
      acc.a += gv;
      acc.b += gv * xhat;
    }
  }
  acc = block_combine<CL>(acc, sh, [](const Sum2& a, const Sum2& b) { return Sum2{a.a + b.a, a.b + b.b}; });
  if (g.walker == 0 && g.c < p.C) {
    float* o = p.work + (g.c * nchunks + g.chunk) * 2;
    o[0] = acc.a;
    o[1] = acc.b;
  }
}

// =======================================================================================================
// backward apply, stage A: dz (fp32, stored in work2 in x's layout with output dims) and per-(channel, chunk)
// dweight partials for all K*K taps at once -> work[(c * nchunks + chunk) * K*K + t]
// =======================================================================================================
MNET_DEVICE int64_t dz_index(const DwParams& p, int64_t n, int64_t c, int64_t oh, int64_t ow) {
  return p.channels_last ? ((n * p.Ho + oh) * p.Wo + ow) * p.C + c : ((n * p.C + c) * p.Ho + oh) * p.Wo + ow;
}

// Dynamic shared memory of bwd_apply_dz_kernel, in bytes (channels_last needs > 48 KB for K = 7: opt-in).
template <int K, bool CL>
constexpr size_t bwd_apply_dz_smem() {
  return (size_t)K * K * (CL ? kThreads : kThreads / 32) * sizeof(float);
}

template <typename T, int K, bool CL>
__global__ void __launch_bounds__(kThreads) bwd_apply_dz_kernel(const DwParams p, int64_t nchunks) {
  extern __shared__ float dsh[];
  constexpr int KK = K * K, L = RedGeom<CL>::L, WALK = RedGeom<CL>::WALK;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ gy = static_cast<const T*>(p.grad_y);
  const RedGeom<CL> g(p, nchunks);
  float dw[KK];
#pragma unroll
  for (int t = 0; t < KK; ++t) dw[t] = 0.0f;
  if (g.c < p.C) {
    float wv[KK];
    load_weights<T, K>(p, g.c, wv);
    const float mean = p.mean[g.c], invstd = p.invstd[g.c], gamma = p.gamma[g.c], beta = p.beta[g.c];
    const float mg = p.mean_g[g.c], mgx = p.mean_g_xhat[g.c], gi = gamma * invstd;
    for (int64_t m = g.m_begin + g.walker; m < g.m_end; m += WALK) {
      int64_t n, oh, ow;
      position(p, m, n, oh, ow);
      float xv[KK];
      load_window<T, K>(p, x, n, g.c, oh, ow, xv);
      const float xhat = (dot_window<K>(xv, wv) - mean) * invstd;
      const float gv = act_bwd(p.act, xhat * gamma + beta, to_f(gy[off4(p.gs, n, g.c, oh, ow)]));
      const float dz = bn_bwd_dz(gi, gv, mg, xhat, mgx);
      p.work2[dz_index(p, n, g.c, oh, ow)] = dz;
#pragma unroll
      for (int t = 0; t < KK; ++t) dw[t] = fmaf(dz, xv[t], dw[t]);
    }
  }
  // Block reduction of the KK per-thread sums, fixed order (deterministic).
  const int64_t c0 = g.c - g.lane;  // first channel of this block's tile
  if constexpr (CL) {
    // lanes = channels, walkers = warps: stage all [t][walker][lane] in shared memory, then one thread per
    // (tap, lane) sums its WALK values in walker order.
#pragma unroll
    for (int t = 0; t < KK; ++t) dsh[t * kThreads + threadIdx.x] = dw[t];
    __syncthreads();
    for (int i = threadIdx.x; i < KK * L; i += kThreads) {
      const int t = i / L, lane = i % L;
      float v = 0.0f;
      for (int w = 0; w < WALK; ++w) v += dsh[t * kThreads + w * L + lane];
      if (c0 + lane < p.C) p.work[((c0 + lane) * nchunks + g.chunk) * KK + t] = v;
    }
  } else {
    // one channel per block: butterfly-free shuffle-down tree inside each warp, then warp sums in order
    constexpr int WARPS = kThreads / 32;
    const int wid = threadIdx.x / 32, wl = threadIdx.x % 32;
#pragma unroll
    for (int t = 0; t < KK; ++t) {
      float v = dw[t];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
      if (wl == 0) dsh[t * WARPS + wid] = v;
    }
    __syncthreads();
    for (int t = threadIdx.x; t < KK; t += kThreads) {
      float v = 0.0f;
      for (int w = 0; w < WARPS; ++w) v += dsh[t * WARPS + w];
      if (c0 < p.C) p.work[(c0 * nchunks + g.chunk) * KK + t] = v;
    }
  }
}

// Stage B: dx by gathering dz (one thread per input element, fixed tap order).
template <typename T, int K, bool CL>
__global__ void __launch_bounds__(kThreads) bwd_apply_dx_kernel(const DwParams p) {
  T* __restrict__ dx = static_cast<T*>(p.y);
  const int64_t total = p.N * p.C * p.H * p.W;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t n, c, ih, iw;
    decompose<CL>(i, p.C, p.H, p.W, n, c, ih, iw);
    const T* w = static_cast<const T*>(p.weight) + c * (K * K);
    float acc = 0.0f;
#pragma unroll
    for (int kh = 0; kh < K; ++kh) {
      const int64_t oh = out_coord(ih, kh, p.stride, p.dilation, p.pad, p.Ho);
      if (oh < 0) continue;
#pragma unroll
      for (int kw = 0; kw < K; ++kw) {
        const int64_t ow = out_coord(iw, kw, p.stride, p.dilation, p.pad, p.Wo);
        if (ow < 0) continue;
        acc = fmaf(p.work2[dz_index(p, n, c, oh, ow)], to_f(w[kh * K + kw]), acc);
      }
    }
    dx[off4(p.ys, n, c, ih, iw)] = from_f<T>(acc);
  }
}

// Stage C: one thread per (channel, tap): sum the chunk partials in chunk order, write dweight in T.
template <typename T>
__global__ void bwd_apply_dw_final_kernel(const DwParams p, int64_t nchunks) {
  const int kk = p.k * p.k;
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.C * kk) return;
  const int64_t c = i / kk, t = i % kk;
  double acc = 0.0;
  for (int64_t j = 0; j < nchunks; ++j) acc += p.work[(c * nchunks + j) * kk + t];
  static_cast<T*>(p.dweight)[i] = from_f<T>((float)acc);
}

// =======================================================================================================
// host-side launch helpers (shared by the .cu files of this directory)
// =======================================================================================================
// Number of position chunks of the reduction kernels: ~16 positions per walker, at most 1024 chunks.
template <bool CL>
inline int64_t num_chunks(const DwParams& p) {
  const int64_t per_chunk = (int64_t)RedGeom<CL>::WALK * 16;
  int64_t n = (p.M() + per_chunk - 1) / per_chunk;
  return n < 1 ? 1 : (n > 1024 ? 1024 : n);
}
inline int64_t num_chunks(const DwParams& p) { return p.channels_last ? num_chunks<true>(p) : num_chunks<false>(p); }

inline int64_t reduction_blocks(const DwParams& p, int64_t nchunks) {
  const int64_t L = p.channels_last ? RedGeom<true>::L : RedGeom<false>::L;
  return (p.C + L - 1) / L * nchunks;
}

inline unsigned elementwise_blocks(int64_t total) {
  int64_t b = (total + kThreads - 1) / kThreads;
  return (unsigned)(b < 1 ? 1 : (b > (1 << 20) ? (1 << 20) : b));
}

}  // namespace dev
}  // namespace mnet
