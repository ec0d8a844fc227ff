// Small shared math: BN folding, Welford/Chan statistics, conv geometry. No ATen; host and device.
#pragma once

#include <math.h>
#include <stdint.h>

#include "common/macros.h"

namespace mnet {

// ---- conv geometry -----------------------------------------------------------------------------
MNET_HD int padding_for(int k, int dilation) { return (k - 1) / 2 * dilation; }
MNET_HD int64_t out_size(int64_t in, int k, int stride, int dilation) {
  const int pad = padding_for(k, dilation);
  return (in + 2 * pad - (dilation * (k - 1) + 1)) / stride + 1;
}
// Input coordinate read by output coordinate `o` at tap `t` (may be out of range = zero padding).
MNET_HD int64_t in_coord(int64_t o, int t, int stride, int dilation, int pad) {
  return o * stride - pad + (int64_t)t * dilation;
}
// Output coordinate that reads input coordinate `i` at tap `t`, or -1 when none does.
MNET_HD int64_t out_coord(int64_t i, int t, int stride, int dilation, int pad, int64_t out_len) {
  const int64_t num = i + pad - (int64_t)t * dilation;
  if (num < 0 || num % stride != 0) return -1;
  const int64_t o = num / stride;
  return o < out_len ? o : -1;
}

// ---- BatchNorm fold ----------------------------------------------------------------------------
// u = gamma * (z - mean) * invstd + beta = z * scale + shift
struct BnFold {
  float scale, shift;
};
MNET_HD BnFold bn_fold(float mean, float invstd, float gamma, float beta) {
  const float scale = gamma * invstd;
  return {scale, beta - mean * scale};
}

// dL/dz from g = dL/du: gamma * invstd * (g - mean_g - xhat * mean_g_xhat). In eval the mean terms are exact zeros
// and native BatchNorm's eval backward has no xhat term at all, so a zero coefficient contributes exactly zero:
// a non-finite xhat (an Inf or NaN input) must not poison dz where native's gradient stays finite.
MNET_HD float bn_bwd_dz(float gamma_invstd, float g, float mean_g, float xhat, float mean_g_xhat) {
  return gamma_invstd * (g - mean_g - (mean_g_xhat == 0.0f ? 0.0f : xhat * mean_g_xhat));
}

// ---- Welford / Chan ----------------------------------------------------------------------------
// (count, mean, M2) with M2 = sum (z - mean)^2. Chan et al. combine; deterministic given the order.
struct Welford {
  float count, mean, m2;
};
MNET_HD Welford welford_init() { return {0.0f, 0.0f, 0.0f}; }
MNET_HD void welford_add(Welford& w, float v) {
  w.count += 1.0f;
  const float d = v - w.mean;
  w.mean += d / w.count;
  w.m2 += d * (v - w.mean);
}
MNET_HD Welford welford_combine(const Welford& a, const Welford& b) {
  const float n = a.count + b.count;
  if (n == 0.0f) return a;
  if (a.count == 0.0f) return b;
  if (b.count == 0.0f) return a;
  const float d = b.mean - a.mean;
  const float fb = b.count / n;
  return {n, a.mean + d * fb, a.m2 + b.m2 + d * d * a.count * fb};
}
// A thread's running (count, mean[v], M2[v]) absorbs one strip of `cnt` outputs z[m][v] (m < cnt): the strip's own
// mean and M2 in two passes, then one Chan combine (welford_combine's arithmetic, the division shared by the V
// channels). The stats kernel's step (kernels.cuh), also run by the host tile-plan check (tile_check.cpp). An empty
// strip (cnt = 0: the last strip of a dilation-2 row's shorter phase, tile.h strip_count) changes nothing: its
// weights are zero instead of 1 / 0 (a mean of 0 * inf = NaN). Selects, not a branch: the compiler may not move the
// strip's convolution under a branch the static report would then count as the cheaper path.
template <int TW, int V>
MNET_HD void welford_add_strip(float& count, float (&mean)[V], float (&m2)[V], const float (&z)[TW][V], int cnt) {
  const bool any = cnt > 0;
  const float fc = (float)cnt, inv = any ? 1.0f / fc : 0.0f, total = count + fc, fb = any ? fc / total : 0.0f;
  MNET_UNROLL
  for (int v = 0; v < V; ++v) {
    float sum = 0.0f;
    MNET_UNROLL
    for (int m = 0; m < TW; ++m) sum += m < cnt ? z[m][v] : 0.0f;
    const float smean = sum * inv;
    float sm2 = 0.0f;
    MNET_UNROLL
    for (int m = 0; m < TW; ++m) {
      const float d = z[m][v] - smean;
      sm2 = m < cnt ? fmaf(d, d, sm2) : sm2;
    }
    const float d = smean - mean[v];
    mean[v] = count == 0.0f ? smean : mean[v] + d * fb;
    m2[v] = count == 0.0f ? sm2 : m2[v] + sm2 + d * d * count * fb;
  }
  count = total;
}

// Same with double accumulators (host side combine of many partials).
struct WelfordD {
  double count, mean, m2;
};
MNET_HD WelfordD welford_combine(const WelfordD& a, double bc, double bm, double bm2) {
  const double n = a.count + bc;
  if (bc == 0.0) return a;
  if (a.count == 0.0) return {bc, bm, bm2};
  const double d = bm - a.mean;
  const double fb = bc / n;
  return {n, a.mean + d * fb, a.m2 + bm2 + d * d * a.count * fb};
}

}  // namespace mnet
