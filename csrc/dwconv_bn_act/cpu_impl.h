// Body of the dwconv_bn_act host twin (see cpu.cpp). Deliberately without include guard: cpu.cpp includes it
// twice, into namespaces compiled for the baseline ISA and for AVX2+FMA, and picks one at runtime. It relies on
// the includes of cpu.cpp and lives inside an anonymous namespace there.
// NOLINTBEGIN(build/include)

#include "dwconv_bn_act/cpu_nhwc_fwd.h"

// Valid output range [lo, hi) for which iw = ow * s + off lies in [0, W).
inline void valid_range(int64_t off, int s, int64_t W, int64_t Wo, int64_t& lo, int64_t& hi) {
  lo = off >= 0 ? 0 : (-off + s - 1) / s;
  const int64_t top = W - 1 - off;
  hi = top < 0 ? 0 : std::min<int64_t>(Wo, top / s + 1);
  if (hi < lo) hi = lo;
}

template <typename T>
inline float ld(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

// Weights as fp32: w[c * kk + t] (NCHW loops) and wt[t * C + c] (NHWC loops).
template <typename T>
void weights_f32(const DwParams& p, std::vector<float>& w, std::vector<float>& wt) {
  const int kk = p.k * p.k;
  const T* src = static_cast<const T*>(p.weight);
  w.resize(p.C * kk);
  wt.resize(p.C * kk);
  for (int64_t c = 0; c < p.C; ++c) {
    for (int t = 0; t < kk; ++t) {
      const float v = static_cast<float>(src[c * kk + t]);
      w[c * kk + t] = v;
      wt[t * p.C + c] = v;
    }
  }
}

// z for a whole NCHW plane (contiguous H x W) -> out[Ho * Wo]. The plane is copied once into a zero-padded
// fp32 buffer so the tap loops need no bounds checks; with stride 1 each tap is one long contiguous loop over
// the flattened padded plane (the columns that fall into the padding are computed and dropped), which keeps
// small maps (7x7, 14x14) vectorised.
struct PlaneConv {
  std::vector<float> xpad, acc, phase;
  template <typename T>
  void run(const DwParams& p, const T* xp, const float* w, float* out) {
    const int k = p.k, s = p.stride, d = p.dilation, pad = p.pad;
    const int64_t Hp = p.H + 2 * pad, Wp = p.W + 2 * pad, Ho = p.Ho, Wo = p.Wo;
    xpad.assign(Hp * Wp, 0.0f);
    for (int64_t ih = 0; ih < p.H; ++ih) {
      float* dst = xpad.data() + (ih + pad) * Wp + pad;
      const T* src = xp + ih * p.W;
      for (int64_t iw = 0; iw < p.W; ++iw) dst[iw] = static_cast<float>(src[iw]);
    }
    if (s == 1) {
      const int64_t len = (Ho - 1) * Wp + Wo;
      acc.assign(len, 0.0f);
      float* a = acc.data();
      for (int kh = 0; kh < k; ++kh)
        for (int kw = 0; kw < k; ++kw) {
          const float wv = w[kh * k + kw];
          const float* src = xpad.data() + (int64_t)kh * d * Wp + (int64_t)kw * d;
          for (int64_t i = 0; i < len; ++i) a[i] += wv * src[i];
        }
      for (int64_t oh = 0; oh < Ho; ++oh) std::memcpy(out + oh * Wo, a + oh * Wp, Wo * sizeof(float));
    } else {
      // stride 2: polyphase split of the padded plane into 4 images phase[rq][cq][r][j] = xpad[2r + rq][2j + cq],
      // so output (oh, ow) at tap (th, tw) reads phase[th & 1][tw & 1][oh + (th >> 1)][ow + (tw >> 1)]: the same
      // flattened contiguous loop as stride 1, with row pitch Wh.
      const int64_t Hh = (Hp + 1) / 2, Wh = (Wp + 1) / 2, img = Hh * Wh;
      phase.assign(4 * img, 0.0f);
      for (int64_t r = 0; r < Hp; ++r) {
        const float* src = xpad.data() + r * Wp;
        float* ev = phase.data() + ((r & 1) * 2) * img + (r >> 1) * Wh;
        float* od = ev + img;
        for (int64_t j = 0; j < Wp / 2; ++j) ev[j] = src[2 * j], od[j] = src[2 * j + 1];
        if (Wp % 2) ev[Wp / 2] = src[Wp - 1];
      }
      const int64_t len = (Ho - 1) * Wh + Wo;
      acc.assign(len, 0.0f);
      float* a = acc.data();
      for (int kh = 0; kh < k; ++kh)
        for (int kw = 0; kw < k; ++kw) {
          const int64_t th = (int64_t)kh * d, tw = (int64_t)kw * d;
          const float wv = w[kh * k + kw];
          const float* src = phase.data() + ((th & 1) * 2 + (tw & 1)) * img + (th >> 1) * Wh + (tw >> 1);
          for (int64_t i = 0; i < len; ++i) a[i] += wv * src[i];
        }
      for (int64_t oh = 0; oh < Ho; ++oh) std::memcpy(out + oh * Wo, a + oh * Wh, Wo * sizeof(float));
    }
  }
};

// z for output row `oh` of image n in NHWC -> out[ow * C + c].
template <typename T>
void conv_row_nhwc(const DwParams& p, const T* xi, const float* wt, int64_t oh, float* out) {
  if constexpr (std::is_same_v<T, float>) {
    nhwc_fwd_row<Act::None, false>(p, xi, wt, nullptr, nullptr, oh, out);
    return;
  }
  const int k = p.k, s = p.stride, d = p.dilation, pad = p.pad;
  const int64_t H = p.H, W = p.W, Wo = p.Wo, C = p.C;
  std::fill(out, out + Wo * C, 0.0f);
  for (int kh = 0; kh < k; ++kh) {
    const int64_t ih = in_coord(oh, kh, s, d, pad);
    if (ih < 0 || ih >= H) continue;
    const T* xr = xi + ih * W * C;
    for (int kw = 0; kw < k; ++kw) {
      const float* wtt = wt + (int64_t)(kh * k + kw) * C;
      const int64_t off = (int64_t)kw * d - pad;
      int64_t lo, hi;
      valid_range(off, s, W, Wo, lo, hi);
      for (int64_t ow = lo; ow < hi; ++ow) {
        const T* xv = xr + (ow * s + off) * C;
        float* o = out + ow * C;
        for (int64_t c = 0; c < C; ++c) o[c] += wtt[c] * ld(xv, c);
      }
    }
  }
}

// pt[c] += sum over ow in [lo, hi) of dz[ow, c] * x[ow * s + off, c] (NHWC rows xr, dzr), for every c in a fixed
// order: U interleaved partial sums (pixel i into sum i % U, so U independent FMA chains hide the latency; the rest
// into sum 0), added pairwise. fp32: blocks of channels accumulated in registers; the rest, and other dtypes, scalar.
template <int NV, typename V>
inline void corr_block(float* pt, const float* x0, const float* d0, int64_t n, int64_t xs, int64_t C) {
  constexpr int L = sizeof(V) / sizeof(float), U = 4;
  V a[U][NV] = {};
  int64_t i = 0;
  for (; i + U <= n; i += U, x0 += U * xs, d0 += U * C)
    for (int u = 0; u < U; ++u)
      for (int j = 0; j < NV; ++j) a[u][j] += vload<V>(d0 + u * C + j * L) * vload<V>(x0 + u * xs + j * L);
  for (; i < n; ++i, x0 += xs, d0 += C)
    for (int j = 0; j < NV; ++j) a[0][j] += vload<V>(d0 + j * L) * vload<V>(x0 + j * L);
  for (int j = 0; j < NV; ++j) {
    const V sum = vload<V>(pt + j * L) + ((a[0][j] + a[1][j]) + (a[2][j] + a[3][j]));
    std::memcpy(pt + j * L, &sum, sizeof sum);
  }
}

template <typename T>
inline void corr_accum(float* pt, const T* xr, const float* dzr, int64_t lo, int64_t hi, int s, int64_t off,
                       int64_t C) {
  int64_t c0 = 0;
  if constexpr (std::is_same_v<T, float>) {
    const float* x0 = xr + (lo * s + off) * C;
    const float* d0 = dzr + lo * C;
    const int64_t n = hi - lo, xs = s * C;
    for (; c0 + 2 * kVec <= C; c0 += 2 * kVec) corr_block<2, vfw>(pt + c0, x0 + c0, d0 + c0, n, xs, C);
    for (; c0 + kVec <= C; c0 += kVec) corr_block<1, vfw>(pt + c0, x0 + c0, d0 + c0, n, xs, C);
    if constexpr (kVec > 8)
      for (; c0 + 8 <= C; c0 += 8) corr_block<1, vf8>(pt + c0, x0 + c0, d0 + c0, n, xs, C);
  }
  for (int64_t ow = lo; ow < hi; ++ow) {
    const T* xv = xr + (ow * s + off) * C;
    const float* dv = dzr + ow * C;
    for (int64_t c = c0; c < C; ++c) pt[c] += dv[c] * ld(xv, c);
  }
}

// out[i] = sum over the n taps t of src[t][i] * wts[t][i] for the NV * L channels of one vector block, accumulated
// in registers (even and odd taps apart, each in order, then added).
template <int NV, typename V>
inline void gather_block(const float* const* src, const float* const* wts, int n, int64_t c0, float* out) {
  constexpr int L = sizeof(V) / sizeof(float);
  V a[2][NV] = {};  // even and odd taps: two independent FMA chains
  int t = 0;
  for (; t + 2 <= n; t += 2)
    for (int u = 0; u < 2; ++u)
      for (int j = 0; j < NV; ++j) a[u][j] += vload<V>(src[t + u] + c0 + j * L) * vload<V>(wts[t + u] + c0 + j * L);
  if (t < n)
    for (int j = 0; j < NV; ++j) a[0][j] += vload<V>(src[t] + c0 + j * L) * vload<V>(wts[t] + c0 + j * L);
  for (int j = 0; j < NV; ++j) {
    const V sum = a[0][j] + a[1][j];
    std::memcpy(out + c0 + j * L, &sum, sizeof sum);
  }
}

// dx row ih of one NHWC image in gather form (any stride): input pixel iw sums dz[oh, ow] * w[kh, kw] over the taps
// with ih = oh * s - pad + kh * d and iw = ow * s - pad + kw * d, (kh, kw) increasing. dz_img: dz row oh at
// dz_img + oh * Wo * C (only the rows this ih reads are touched); ow_of[iw * k + kw]: ow, or -1 when no output
// reaches iw through kw (the caller's table, so no division here); out: fp32 [W * C].
inline void dx_row_gather(const DwParams& p, const float* dz_img, const float* wt, const int64_t* ow_of, int64_t ih,
                          float* out) {
  const int k = p.k;
  const int64_t C = p.C;
  const float* dzr[7];
  const float* wr[7];
  int nr = 0;
  for (int kh = 0; kh < k; ++kh) {
    const int64_t oh = out_coord(ih, kh, p.stride, p.dilation, p.pad, p.Ho);
    if (oh < 0) continue;
    dzr[nr] = dz_img + oh * p.Wo * C;
    wr[nr] = wt + (int64_t)kh * k * C;
    ++nr;
  }
  const float* src[49];
  const float* wts[49];
  for (int64_t iw = 0; iw < p.W; ++iw) {
    int n = 0;
    for (int r = 0; r < nr; ++r)
      for (int kw = 0; kw < k; ++kw) {
        const int64_t ow = ow_of[iw * k + kw];
        if (ow < 0) continue;
        src[n] = dzr[r] + ow * C;
        wts[n] = wr[r] + (int64_t)kw * C;
        ++n;
      }
    float* o = out + iw * C;
    int64_t c0 = 0;
    for (; c0 + 2 * kVec <= C; c0 += 2 * kVec) gather_block<2, vfw>(src, wts, n, c0, o);
    for (; c0 + kVec <= C; c0 += kVec) gather_block<1, vfw>(src, wts, n, c0, o);
    if constexpr (kVec > 8)
      for (; c0 + 8 <= C; c0 += 8) gather_block<1, vf8>(src, wts, n, c0, o);
    for (int64_t c = c0; c < C; ++c) {
      float a = 0.0f;
      for (int t = 0; t < n; ++t) a += src[t][c] * wts[t][c];
      o[c] = a;
    }
  }
}

inline int64_t off4(const Strides4& st, int64_t n, int64_t c, int64_t h, int64_t w) {
  return n * st.n + c * st.c + h * st.h + w * st.w;
}

// Fixed partition of NHWC rows (n, oh) into blocks: independent of the thread count (determinism).
inline int64_t num_row_blocks(int64_t rows) { return std::min<int64_t>(rows, 64); }

// ------------------------------------------------------------------------------------------------
// Activation and dtype passes over fp32 row buffers. Only these small loops depend on the activation, and
// only load_row/store_row on the dtype, so the heavy conv loops are instantiated once per dtype (build time).
// ------------------------------------------------------------------------------------------------
using ActFwdFn = void (*)(float* u, int64_t n);                // u <- act(u)
using ActBwdFn = void (*)(const float* u, float* g, int64_t n);  // g <- act'(u) * g

template <Act A>
void act_fwd_row(float* u, int64_t n) {
  for (int64_t i = 0; i < n; ++i) u[i] = act_fwd<A>(u[i]);
}
template <Act A>
void act_bwd_row(const float* u, float* g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] = act_bwd<A>(u[i], g[i]);
}
ActFwdFn act_fwd_fn(Act a) {
  return MNET_DISPATCH_CONV_ACT(a, A, [&]() -> ActFwdFn { return &act_fwd_row<A>; });
}
ActBwdFn act_bwd_fn(Act a) {
  return MNET_DISPATCH_CONV_ACT(a, A, [&]() -> ActBwdFn { return &act_bwd_row<A>; });
}

template <typename T>
void store_row(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = T(src[i]);
}

// grad_y row (n, c, oh, :) of an NCHW grad_y as fp32 [Wo].
template <typename T>
void load_grad_row(const DwParams& p, const T* gy, int64_t n, int64_t c, int64_t oh, float* g) {
  const T* src = gy + off4(p.gs, n, c, oh, 0);
  for (int64_t ow = 0; ow < p.Wo; ++ow) g[ow] = static_cast<float>(src[ow * p.gs.w]);
}

// Per-channel BN parameters as fp32 arrays (NHWC rows use them as vectors).
struct BnVecs {
  std::vector<float> mean, invstd, gamma, beta, scale, shift;
  explicit BnVecs(const DwParams& p)
      : mean(p.mean, p.mean + p.C), invstd(p.invstd, p.invstd + p.C), gamma(p.gamma, p.gamma + p.C),
        beta(p.beta, p.beta + p.C), scale(p.C), shift(p.C) {
    for (int64_t c = 0; c < p.C; ++c) {
      const BnFold f = bn_fold(mean[c], invstd[c], gamma[c], beta[c]);
      scale[c] = f.scale, shift[c] = f.shift;
    }
  }
};

// For an NCHW row of channel c: z (overwritten with xhat) and the incoming grad (overwritten with
// g = act'(u) * grad); u is scratch.
inline void grad_u_row(const DwParams& p, const BnVecs& bn, ActBwdFn actb, int64_t c, float* z, float* g, float* u) {
  const float mean = bn.mean[c], invstd = bn.invstd[c], gamma = bn.gamma[c], beta = bn.beta[c];
  for (int64_t ow = 0; ow < p.Wo; ++ow) {
    z[ow] = (z[ow] - mean) * invstd;
    u[ow] = z[ow] * gamma + beta;
  }
  actb(u, g, p.Wo);
}

// One NHWC row of Wo pixels x C channels in a single pass: from z (the conv output, fp32) and grad_y (dense, the
// row's first element at gy) form xhat = (z - mean) * invstd and g = act'(xhat * gamma + beta) * grad_y; then
// SUMS: r0[c] += g and r1[c] += g * xhat (backward reduce), else z <- dz = bn_bwd_dz(...) (backward apply).
// The per-element math is that of common/*.h; the channel loop is vectorised (omp simd, as in block_store).
template <Act A, bool SUMS, typename T>
void grad_row_nhwc(const BnVecs& bn, const float* gis, const float* mg, const float* mgx, const T* gy, int64_t Wo,
                   int64_t C, float* z, float* r0, float* r1) {
  const float* __restrict mean = bn.mean.data();
  const float* __restrict invstd = bn.invstd.data();
  const float* __restrict gamma = bn.gamma.data();
  const float* __restrict beta = bn.beta.data();
  for (int64_t ow = 0; ow < Wo; ++ow, z += C, gy += C) {
    float* __restrict zr = z;
    const T* __restrict gr = gy;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float xh = (zr[c] - mean[c]) * invstd[c];
      const float g = act_bwd<A>(xh * gamma[c] + beta[c], static_cast<float>(gr[c]));
      if constexpr (SUMS) {
        r0[c] += g;
        r1[c] += g * xh;
      } else {
        zr[c] = bn_bwd_dz(gis[c], g, mg[c], xh, mgx[c]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// forward
// ------------------------------------------------------------------------------------------------
template <typename T>
void fwd_impl(const DwParams& p) {
  std::vector<float> w, wt;
  weights_f32<T>(p, w, wt);
  const BnVecs bn(p);
  const ActFwdFn actf = act_fwd_fn(p.act);
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  if (!p.channels_last) {
    at::parallel_for(0, p.N * p.C, 1, [&](int64_t b, int64_t e) {
      std::vector<float> plane(p.Ho * p.Wo);
      PlaneConv pc;
      const int64_t HWo = p.Ho * p.Wo;
      for (int64_t nc = b; nc < e; ++nc) {
        const int64_t n = nc / p.C, c = nc % p.C;
        const float sc = bn.scale[c], sh = bn.shift[c];
        float* z = plane.data();
        pc.run(p, x + off4(p.xs, n, c, 0, 0), w.data() + c * p.k * p.k, z);
        for (int64_t i = 0; i < HWo; ++i) z[i] = z[i] * sc + sh;
        actf(z, HWo);
        store_row(z, y + off4(p.ys, n, c, 0, 0), HWo);
      }
    });
  } else if constexpr (std::is_same_v<T, float>) {
    MNET_DISPATCH_CONV_ACT(p.act, A, [&] { nhwc_fwd_f32<A>(p, wt.data(), bn.scale.data(), bn.shift.data()); });
  } else {
    const float* sc = bn.scale.data();
    const float* sh = bn.shift.data();
    at::parallel_for(0, p.N * p.Ho, 1, [&](int64_t b, int64_t e) {
      std::vector<float> row(p.Wo * p.C);
      for (int64_t r = b; r < e; ++r) {
        const int64_t n = r / p.Ho, oh = r % p.Ho;
        float* z = row.data();
        conv_row_nhwc(p, x + off4(p.xs, n, 0, 0, 0), wt.data(), oh, z);
        for (int64_t ow = 0; ow < p.Wo; ++ow) {
          float* zr = z + ow * p.C;
          for (int64_t c = 0; c < p.C; ++c) zr[c] = zr[c] * sc[c] + sh[c];
        }
        actf(z, p.Wo * p.C);
        store_row(z, y + off4(p.ys, n, 0, oh, 0), p.Wo * p.C);
      }
    });
  }
}

// ------------------------------------------------------------------------------------------------
// statistics: per-channel mean and biased variance of z
// ------------------------------------------------------------------------------------------------
template <typename T>
void stats_impl(const DwParams& p) {
  std::vector<float> w, wt;
  weights_f32<T>(p, w, wt);
  const T* x = static_cast<const T*>(p.x);
  const int64_t C = p.C;
  std::vector<WelfordD> acc(C, WelfordD{0.0, 0.0, 0.0});
  if (!p.channels_last) {
    // one exact two-pass (mean, M2) per (n, c) plane, then Chan over n
    std::vector<double> pm(p.N * C), pm2(p.N * C);
    const double cnt = (double)p.Ho * p.Wo;
    at::parallel_for(0, p.N * C, 1, [&](int64_t b, int64_t e) {
      std::vector<float> plane(p.Ho * p.Wo);
      PlaneConv pc;
      for (int64_t nc = b; nc < e; ++nc) {
        const int64_t n = nc / C, c = nc % C;
        pc.run(p, x + off4(p.xs, n, c, 0, 0), w.data() + c * p.k * p.k, plane.data());
        double s = 0.0;
        for (int64_t oh = 0; oh < p.Ho; ++oh) {
          float* z = plane.data() + oh * p.Wo;
          float rs = 0.0f;
          for (int64_t ow = 0; ow < p.Wo; ++ow) rs += z[ow];
          s += rs;
        }
        const double m = s / cnt;
        double m2 = 0.0;
        for (int64_t oh = 0; oh < p.Ho; ++oh) {
          const float* z = plane.data() + oh * p.Wo;
          const float mf = (float)m;
          float r2 = 0.0f;
          for (int64_t ow = 0; ow < p.Wo; ++ow) {
            const float dv = z[ow] - mf;
            r2 += dv * dv;
          }
          m2 += r2;
        }
        pm[nc] = m, pm2[nc] = m2;
      }
    });
    for (int64_t n = 0; n < p.N; ++n)
      for (int64_t c = 0; c < C; ++c) acc[c] = welford_combine(acc[c], cnt, pm[n * C + c], pm2[n * C + c]);
  } else {
    // Per block, each row's exact (mean, M2) merged into the block's as welford_combine (common/math.h) does; every
    // channel has the same counts, so the factors are computed once per row (no division in the channel loop).
    const int64_t rows = p.N * p.Ho, nb = num_row_blocks(rows), per = (rows + nb - 1) / nb;
    std::vector<double> pmean(nb * C, 0.0), pm2(nb * C, 0.0), pcount(nb, 0.0);
    at::parallel_for(0, nb, 1, [&](int64_t b, int64_t e) {
      std::vector<float> row(p.Wo * C), rm(C), rm2(C);
      for (int64_t blk = b; blk < e; ++blk) {
        double* __restrict bm = pmean.data() + blk * C;
        double* __restrict bm2 = pm2.data() + blk * C;
        double count = 0.0;
        for (int64_t r = blk * per; r < std::min(rows, (blk + 1) * per); ++r) {
          const int64_t n = r / p.Ho, oh = r % p.Ho;
          conv_row_nhwc(p, x + off4(p.xs, n, 0, 0, 0), wt.data(), oh, row.data());
          std::fill(rm.begin(), rm.end(), 0.0f);
          std::fill(rm2.begin(), rm2.end(), 0.0f);
          for (int64_t ow = 0; ow < p.Wo; ++ow) {
            const float* z = row.data() + ow * C;
            for (int64_t c = 0; c < C; ++c) rm[c] += z[c];
          }
          const float inv = 1.0f / (float)p.Wo;
          for (int64_t c = 0; c < C; ++c) rm[c] *= inv;
          for (int64_t ow = 0; ow < p.Wo; ++ow) {
            const float* z = row.data() + ow * C;
            for (int64_t c = 0; c < C; ++c) {
              const float dv = z[c] - rm[c];
              rm2[c] += dv * dv;
            }
          }
          const double n_ab = count + (double)p.Wo, fb = (double)p.Wo / n_ab, fab = count * fb;
          for (int64_t c = 0; c < C; ++c) {
            const double dm = (double)rm[c] - bm[c];
            bm[c] += dm * fb;
            bm2[c] += (double)rm2[c] + dm * dm * fab;
          }
          count = n_ab;
        }
        pcount[blk] = count;
      }
    });
    for (int64_t blk = 0; blk < nb; ++blk)
      for (int64_t c = 0; c < C; ++c)
        acc[c] = welford_combine(acc[c], pcount[blk], pmean[blk * C + c], pm2[blk * C + c]);
  }
  for (int64_t c = 0; c < C; ++c) {
    p.out0[c] = (float)acc[c].mean;
    p.out1[c] = acc[c].count > 0 ? (float)(acc[c].m2 / acc[c].count) : 0.0f;
  }
}

// ------------------------------------------------------------------------------------------------
// backward reduce: sum g, sum g * xhat per channel (g = grad_y * act'(u), recomputed from x)
// ------------------------------------------------------------------------------------------------
template <typename T>
void bwd_reduce_impl(const DwParams& p) {
  std::vector<float> w, wt;
  weights_f32<T>(p, w, wt);
  const BnVecs bn(p);
  const ActBwdFn actb = act_bwd_fn(p.act);
  const T* x = static_cast<const T*>(p.x);
  const T* gy = static_cast<const T*>(p.grad_y);  // dense in x's layout (op.cpp)
  const int64_t C = p.C;
  std::vector<double> s0(C, 0.0), s1(C, 0.0);
  if (!p.channels_last) {
    std::vector<double> p0(p.N * C), p1(p.N * C);
    at::parallel_for(0, p.N * C, 1, [&](int64_t b, int64_t e) {
      std::vector<float> plane(p.Ho * p.Wo), g(p.Wo), u(p.Wo);
      PlaneConv pc;
      for (int64_t nc = b; nc < e; ++nc) {
        const int64_t n = nc / C, c = nc % C;
        pc.run(p, x + off4(p.xs, n, c, 0, 0), w.data() + c * p.k * p.k, plane.data());
        double a0 = 0.0, a1 = 0.0;
        for (int64_t oh = 0; oh < p.Ho; ++oh) {
          float* z = plane.data() + oh * p.Wo;
          load_grad_row(p, gy, n, c, oh, g.data());
          grad_u_row(p, bn, actb, c, z, g.data(), u.data());
          float r0 = 0.0f, r1 = 0.0f;
          for (int64_t ow = 0; ow < p.Wo; ++ow) {
            r0 += g[ow];
            r1 += g[ow] * z[ow];
          }
          a0 += r0, a1 += r1;
        }
        p0[nc] = a0, p1[nc] = a1;
      }
    });
    for (int64_t n = 0; n < p.N; ++n)
      for (int64_t c = 0; c < C; ++c) s0[c] += p0[n * C + c], s1[c] += p1[n * C + c];
  } else {
    const int64_t rows = p.N * p.Ho, nb = num_row_blocks(rows), per = (rows + nb - 1) / nb;
    std::vector<double> p0(nb * C, 0.0), p1(nb * C, 0.0);
    at::parallel_for(0, nb, 1, [&](int64_t b, int64_t e) {
      std::vector<float> z(p.Wo * C), r0(C), r1(C);
      for (int64_t blk = b; blk < e; ++blk) {
        for (int64_t r = blk * per; r < std::min(rows, (blk + 1) * per); ++r) {
          const int64_t n = r / p.Ho, oh = r % p.Ho;
          conv_row_nhwc(p, x + off4(p.xs, n, 0, 0, 0), wt.data(), oh, z.data());
          std::fill(r0.begin(), r0.end(), 0.0f);
          std::fill(r1.begin(), r1.end(), 0.0f);
          MNET_DISPATCH_CONV_ACT(p.act, A, [&] {
            grad_row_nhwc<A, true>(bn, nullptr, nullptr, nullptr, gy + off4(p.gs, n, 0, oh, 0), p.Wo, C, z.data(),
                                   r0.data(), r1.data());
          });
          for (int64_t c = 0; c < C; ++c) p0[blk * C + c] += r0[c], p1[blk * C + c] += r1[c];
        }
      }
    });
    for (int64_t blk = 0; blk < nb; ++blk)
      for (int64_t c = 0; c < C; ++c) s0[c] += p0[blk * C + c], s1[c] += p1[blk * C + c];
  }
  for (int64_t c = 0; c < C; ++c) p.out0[c] = (float)s0[c], p.out1[c] = (float)s1[c];
}

// ------------------------------------------------------------------------------------------------
// backward apply: dz = gamma*invstd*(g - mean_g - xhat*mean_g_xhat); dx = conv^T(dz); dweight = corr(dz, x)
// ------------------------------------------------------------------------------------------------
template <typename T>
void bwd_apply_impl(const DwParams& p) {
  std::vector<float> w, wt;
  weights_f32<T>(p, w, wt);
  const BnVecs bn(p);
  const ActBwdFn actb = act_bwd_fn(p.act);
  const T* x = static_cast<const T*>(p.x);
  const T* gy = static_cast<const T*>(p.grad_y);
  T* dx = static_cast<T*>(p.y);
  const int64_t C = p.C, kk = p.k * p.k;
  const int k = p.k, s = p.stride, d = p.dilation, pad = p.pad;
  std::vector<float> gis(C), mg(p.mean_g, p.mean_g + C), mgx(p.mean_g_xhat, p.mean_g_xhat + C);
  for (int64_t c = 0; c < C; ++c) gis[c] = bn.gamma[c] * bn.invstd[c];
  std::vector<double> dw(C * kk, 0.0);
  if (!p.channels_last) {
    std::vector<float> pdw(p.N * C * kk);
    at::parallel_for(0, p.N * C, 1, [&](int64_t b, int64_t e) {
      std::vector<float> dz(p.Ho * p.Wo), g(p.Wo), u(p.Wo), dxp(p.H * p.W);
      PlaneConv pc;
      for (int64_t nc = b; nc < e; ++nc) {
        const int64_t n = nc / C, c = nc % C;
        const T* xp = x + off4(p.xs, n, c, 0, 0);
        const float* wc = w.data() + c * kk;
        pc.run(p, xp, wc, dz.data());
        for (int64_t oh = 0; oh < p.Ho; ++oh) {
          float* z = dz.data() + oh * p.Wo;
          load_grad_row(p, gy, n, c, oh, g.data());
          grad_u_row(p, bn, actb, c, z, g.data(), u.data());
          const float gi = gis[c], m0 = mg[c], m1 = mgx[c];
          for (int64_t ow = 0; ow < p.Wo; ++ow) z[ow] = bn_bwd_dz(gi, g[ow], m0, z[ow], m1);
        }
        // dweight partial and dx (scatter into an fp32 plane), sharing the valid-range walk
        std::fill(dxp.begin(), dxp.end(), 0.0f);
        float* pd = pdw.data() + nc * kk;
        for (int64_t t = 0; t < kk; ++t) pd[t] = 0.0f;
        for (int64_t oh = 0; oh < p.Ho; ++oh) {
          const float* dzr = dz.data() + oh * p.Wo;
          for (int kh = 0; kh < k; ++kh) {
            const int64_t ih = in_coord(oh, kh, s, d, pad);
            if (ih < 0 || ih >= p.H) continue;
            const T* xr = xp + ih * p.W;
            float* dxr = dxp.data() + ih * p.W;
            for (int kw = 0; kw < k; ++kw) {
              const int64_t off = (int64_t)kw * d - pad;
              int64_t lo, hi;
              valid_range(off, s, p.W, p.Wo, lo, hi);
              const float wv = wc[kh * k + kw];
              float acc = 0.0f;
              for (int64_t ow = lo; ow < hi; ++ow) {
                acc += dzr[ow] * ld(xr, ow * s + off);
                dxr[ow * s + off] += dzr[ow] * wv;
              }
              pd[kh * k + kw] += acc;
            }
          }
        }
        for (int64_t ih = 0; ih < p.H; ++ih) store_row(dxp.data() + ih * p.W, dx + off4(p.ys, n, c, ih, 0), p.W);
      }
    });
    for (int64_t n = 0; n < p.N; ++n)
      for (int64_t i = 0; i < C * kk; ++i) dw[i] += pdw[n * C * kk + i];
  } else {
    // Work items: (image, band of dx rows [i0, i1)), a fixed partition (the result does not depend on the thread
    // count). An item computes dz for the rows [lo, hi) its dx rows read (fp32, kept in the item's buffer), adds
    // the dweight terms of the dz rows it owns (each dz row owned by exactly one band of its image:
    // [ceil(i0 / s), ceil(i1 / s)), the last band up to Ho) into its partial, then gathers its dx rows. Bands
    // overlap by the halo of k - 1 dilated taps, whose dz rows are computed twice; ~512 KB of dz per band.
    const int64_t row = p.Wo * C;
    const int64_t band = std::min<int64_t>(p.H, std::max<int64_t>(4, 131072 / std::max<int64_t>(1, row)));
    const int64_t nbands = (p.H + band - 1) / band, items = p.N * nbands;
    std::vector<float> pdw(items * kk * C, 0.0f);
    std::vector<float> wf;  // stride 1: the taps flipped, dx = forward conv of dz (pad = (k - 1) / 2 * d both sides)
    DwParams q = p;
    q.H = p.Ho, q.W = p.Wo, q.Ho = p.H, q.Wo = p.W;
    if (std::is_same_v<T, float> && s == 1) {
      wf.resize(kk * C);
      for (int64_t t = 0; t < kk; ++t) std::memcpy(&wf[t * C], &wt[(kk - 1 - t) * C], C * sizeof(float));
    }
    std::vector<int64_t> ow_of(p.W * k);  // gather form: the output column iw reads through tap kw, or -1
    for (int64_t iw = 0; iw < p.W; ++iw)
      for (int kw = 0; kw < k; ++kw) ow_of[iw * k + kw] = out_coord(iw, kw, s, d, pad, p.Wo);
    auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
    at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) {
      std::vector<float> dzb, acc(p.W * C);
      for (int64_t item = b; item < e; ++item) {
        const int64_t n = item / nbands, bi = item % nbands, i0 = bi * band, i1 = std::min(p.H, i0 + band);
        const int64_t own_lo = std::min(p.Ho, ceil_div(i0, s));
        const int64_t own_hi = bi == nbands - 1 ? p.Ho : std::min(p.Ho, ceil_div(i1, s));
        const int64_t need_lo = ceil_div(std::max<int64_t>(0, i0 + pad - (int64_t)(k - 1) * d), s);
        const int64_t need_hi = std::min(p.Ho, (i1 - 1 + pad) / s + 1);
        const int64_t lo = std::min(own_lo, need_lo), hi = std::max(own_hi, need_hi);
        const T* xi = x + off4(p.xs, n, 0, 0, 0);
        float* pd = pdw.data() + item * kk * C;
        dzb.resize((hi - lo) * row);
        for (int64_t oh = lo; oh < hi; ++oh) {
          float* dzr = dzb.data() + (oh - lo) * row;
          conv_row_nhwc(p, xi, wt.data(), oh, dzr);
          MNET_DISPATCH_CONV_ACT(p.act, A, [&] {
            grad_row_nhwc<A, false>(bn, gis.data(), mg.data(), mgx.data(), gy + off4(p.gs, n, 0, oh, 0), p.Wo, C,
                                    dzr, nullptr, nullptr);
          });
          if (oh < own_lo || oh >= own_hi) continue;
          for (int kh = 0; kh < k; ++kh) {
            const int64_t ih = in_coord(oh, kh, s, d, pad);
            if (ih < 0 || ih >= p.H) continue;
            const T* xr = xi + ih * p.W * C;
            for (int kw = 0; kw < k; ++kw) {
              const int64_t off = (int64_t)kw * d - pad;
              int64_t wlo, whi;
              valid_range(off, s, p.W, p.Wo, wlo, whi);
              corr_accum(pd + (int64_t)(kh * k + kw) * C, xr, dzr, wlo, whi, s, off, C);
            }
          }
        }
        // dz row oh of this image is dzb[(oh - lo) * row]: only rows in [lo, hi) are read
        const float* dz_img = dzb.data() - lo * row;
        for (int64_t ih = i0; ih < i1; ++ih) {
          T* dxr = dx + off4(p.ys, n, 0, ih, 0);
          if constexpr (std::is_same_v<T, float>) {
            if (s == 1)  // the register-blocked forward kernel, taps flipped
              nhwc_fwd_row<Act::None, false>(q, dz_img, wf.data(), nullptr, nullptr, ih, dxr);
            else
              dx_row_gather(p, dz_img, wt.data(), ow_of.data(), ih, dxr);
          } else {
            dx_row_gather(p, dz_img, wt.data(), ow_of.data(), ih, acc.data());
            store_row(acc.data(), dxr, p.W * C);
          }
        }
      }
    });
    for (int64_t item = 0; item < items; ++item)
      for (int64_t t = 0; t < kk; ++t)
        for (int64_t c = 0; c < C; ++c) dw[c * kk + t] += pdw[(item * kk + t) * C + c];
  }
  T* dwo = static_cast<T*>(p.dweight);
  for (int64_t i = 0; i < C * kk; ++i) dwo[i] = T((float)dw[i]);
}

// NOLINTEND(build/include)
