// Fast eval forward (and the conv rows of the training passes) of the host twin for fp32 channels_last (included by
// cpu_impl.h, inside its ISA namespace; no include guard for the same reason). Register-blocked: P output pixels x
// NV vectors of channels are accumulated in registers over the conv taps (tap loop outside, channel vector
// innermost), then the BN fold and the activation (common/*.h) are applied before anything is written. Rows (n, oh)
// are independent work items, so the result does not depend on the thread count. GCC vector extensions
// (MNET_TWIN_VEC floats, set by cpu.cpp per ISA copy): a 512-bit register per vector in the AVX-512 copy, 256-bit in
// the AVX2 one, two 128-bit in the baseline.
// NOLINTBEGIN(build/include)

// Lanes of the wide vector: MNET_TWIN_VEC floats (16 in the AVX-512 copy, else 8); vf8 serves an 8-channel rest.
constexpr int kVec = MNET_TWIN_VEC;
// The widest row block (nhwc_row_blocks) the copy's registers hold, in pixels: 14 with AVX-512's 32 vector registers
// (14 accumulators + K weights + an input vector), 7 with AVX2's 16, none in the baseline copy (its 8-float vectors
// are two 128-bit registers each).
constexpr int kRowPixels = MNET_TWIN_ROW_PIXELS;
typedef float vfw __attribute__((vector_size(kVec * sizeof(float))));
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));

// p + i, or nullptr for the absent BN vectors of the z-only (FOLD = false) instantiation.
inline const float* at(const float* p, int64_t i) { return p ? p + i : p; }

template <typename V>
inline V vload(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// y[q * C + i] = act(acc[q] * scale + shift) (FOLD), or acc itself (the training passes' z).
template <Act A, bool FOLD, int P, int NV, typename V>
inline void block_store(const V (&acc)[P][NV], const float* sc, const float* sh, int64_t C, float* y) {
  constexpr int L = sizeof(V) / sizeof(float);
  if constexpr (!FOLD) {  // z itself (training passes)
    for (int q = 0; q < P; ++q) std::memcpy(y + q * C, acc[q], sizeof acc[q]);
  } else {
    V vs[NV], vh[NV];
    for (int j = 0; j < NV; ++j) vs[j] = vload<V>(sc + j * L), vh[j] = vload<V>(sh + j * L);
    // The act loop runs over whole wide vectors, and `omp simd` keeps GCC from unrolling it into scalar branches
    // first (it did for AVX2 and baseline, 4-6x slower with hardswish; the build has -fopenmp).
    constexpr int LB = (NV * L + kVec - 1) / kVec * kVec;
    for (int q = 0; q < P; ++q) {
      alignas(64) float t[LB];
      for (int i = NV * L; i < LB; ++i) t[i] = 0.0f;
      for (int j = 0; j < NV; ++j) {
        const V u = acc[q][j] * vs[j] + vh[j];
        std::memcpy(t + j * L, &u, sizeof u);
      }
#pragma omp simd
      for (int i = 0; i < LB; ++i) t[i] = act_fwd<A>(t[i]);
      std::memcpy(y + q * C, t, NV * L * sizeof(float));
    }
  }
}

// P pixels (input pixel pitch xp floats, output pitch C floats) x NV vectors V of channels, taps kh in the rows
// given by xr (x at (ih, iw of kw = 0, c0)) / wr (weights at (kh, kw = 0, c0)), kw in [kw0, kw1). The BN fold is
// applied to the accumulators, the activation (the header's scalar function, vectorised over a fixed-length
// local buffer) on the way out.
template <Act A, bool FOLD, int P, int NV, typename V>
inline void nhwc_block(const float* const* xr, const float* const* wr, int nr, int kw0, int kw1, int64_t dC,
                       int64_t xp, int64_t C, const float* sc, const float* sh, float* y) {
  constexpr int L = sizeof(V) / sizeof(float);
  V acc[P][NV];
  for (int q = 0; q < P; ++q)
    for (int j = 0; j < NV; ++j) acc[q][j] = V{};
  for (int r = 0; r < nr; ++r) {
    const float* xrow = xr[r] + kw0 * dC;
    const float* wrow = wr[r] + (int64_t)kw0 * C;
    for (int kw = kw0; kw < kw1; ++kw, xrow += dC, wrow += C) {
      V w[NV];
      for (int j = 0; j < NV; ++j) w[j] = vload<V>(wrow + j * L);
      for (int q = 0; q < P; ++q)
        for (int j = 0; j < NV; ++j) acc[q][j] += w[j] * vload<V>(xrow + q * xp + j * L);
    }
  }
  block_store<A, FOLD, P, NV, V>(acc, sc, sh, C, y);
}

// P pixels x NV vectors V of channels in one block, each input column loaded once and fed to every (pixel, tap)
// pair that reads it (instead of once per tap as in nhwc_block; the AVX-512 copy's 32 registers hold the K x NV
// weights of a row and the P x NV accumulators). Input column col (from xr[r], x at the block's first column) feeds
// pixel q with tap kw where S * q = col + SHIFT - kw; NCOL columns. Two uses:
// - slide blocks (S = 1, SHIFT = 0, NCOL = P + K - 1) of a stride-1 row, xr[r] at iw0 = ow0 - pad (may lie outside
//   [0, W)): with EDGE, columns outside [0, W) are the zero padding and skipped at run time, so the row's edge
//   pixels take this block too (at 7x7 every pixel is within pad of an edge); without, all columns must lie inside;
// - row blocks (nhwc_row_blocks: 7 or 14 pixels, stride 1 or 2; the first block of a row has SHIFT = pad and xr[r]
//   at iw = 0, the others SHIFT = 0 and xr[r] at S * ow0 - pad; NCOL from the block's place in the row): which
//   columns are padding is known at compile time, so no tap is tested at run time, and 7-14 pixels give the FMAs
//   enough independent chains (a 7-wide row in slide blocks is 4 + 3 pixels, both with edge tests; stride 2 had no
//   shared loads at all).
// Per output the taps add in the same order (row, then kw increasing) as in nhwc_block.
template <Act A, bool FOLD, int K, int S, int P, int SHIFT, int NCOL, int NV, bool EDGE, typename V>
inline void nhwc_block_cols(const float* const* xr, const float* const* wr, int nr, int64_t iw0, int64_t W,
                            int64_t C, const float* sc, const float* sh, float* y) {
  constexpr int L = sizeof(V) / sizeof(float);
  V acc[P][NV];
  for (int q = 0; q < P; ++q)
    for (int j = 0; j < NV; ++j) acc[q][j] = V{};
  for (int r = 0; r < nr; ++r) {
    V w[K][NV];
#pragma GCC unroll 8
    for (int kw = 0; kw < K; ++kw)
      for (int j = 0; j < NV; ++j) w[kw][j] = vload<V>(wr[r] + kw * C + j * L);
    const float* xrow = xr[r];
#pragma GCC unroll 32
    for (int col = 0; col < NCOL; ++col) {
      if (EDGE && (iw0 + col < 0 || iw0 + col >= W)) continue;
      V xv[NV];
      for (int j = 0; j < NV; ++j) xv[j] = vload<V>(xrow + col * C + j * L);
#pragma GCC unroll 8
      for (int kw = 0; kw < K; ++kw) {
        const int t = col + SHIFT - kw;  // S * (the pixel reading this column with tap kw)
        if (t >= 0 && t % S == 0 && t / S < P)
          for (int j = 0; j < NV; ++j) acc[t / S][j] += w[kw][j] * xv[j];
      }
    }
  }
  block_store<A, FOLD, P, NV, V>(acc, sc, sh, C, y);
}

// Channels [c0, C) (fewer than 8) of one pixel, scalar.
template <Act A, bool FOLD>
inline void nhwc_tail(const float* const* xr, const float* const* wr, int nr, int kw0, int kw1, int64_t dC,
                      int64_t C, int64_t c0, const float* sc, const float* sh, float* y) {
  for (int64_t c = c0; c < C; ++c) {
    float acc = 0.0f;
    for (int r = 0; r < nr; ++r)
      for (int kw = kw0; kw < kw1; ++kw) acc += wr[r][kw * C + c] * xr[r][kw * dC + c];
    if constexpr (FOLD) {
      y[c] = act_fwd<A>(acc * sc[c] + sh[c]);
    } else {
      y[c] = acc;
    }
  }
}

// Pixels [0, n_px * P) from xr0 (x at the first pixel's kw = 0 tap, c = 0), sharing the tap window [kw0, kw1),
// all channels. Pixel groups outside, channel blocks inside: x and y are walked contiguously.
template <Act A, bool FOLD, int P>
inline void nhwc_pixels(const float* const* xr0, const float* const* wr0, int nr, int kw0, int kw1, int64_t dC,
                        int64_t xp, int64_t C, const float* sc, const float* sh, float* y, int64_t n_px) {
  const float* xr[16];
  const float* wr[16];
  for (int64_t q = 0; q < n_px; ++q) {
    const int64_t px = q * P;
    auto at_c = [&](int64_t c) {
      for (int r = 0; r < nr; ++r) xr[r] = xr0[r] + px * xp + c, wr[r] = wr0[r] + c;
    };
    float* yq = y + px * C;
    int64_t c0 = 0;
    for (; c0 + 2 * kVec <= C; c0 += 2 * kVec) {
      at_c(c0);
      nhwc_block<A, FOLD, P, 2, vfw>(xr, wr, nr, kw0, kw1, dC, xp, C, at(sc, c0), at(sh, c0), yq + c0);
    }
    for (; c0 + kVec <= C; c0 += kVec) {
      at_c(c0);
      nhwc_block<A, FOLD, P, 1, vfw>(xr, wr, nr, kw0, kw1, dC, xp, C, at(sc, c0), at(sh, c0), yq + c0);
    }
    if constexpr (kVec > 8) {
      for (; c0 + 8 <= C; c0 += 8) {
        at_c(c0);
        nhwc_block<A, FOLD, P, 1, vf8>(xr, wr, nr, kw0, kw1, dC, xp, C, at(sc, c0), at(sh, c0), yq + c0);
      }
    }
    if (c0 < C) {
      at_c(0);
      for (int i = 0; i < P; ++i) {
        nhwc_tail<A, FOLD>(xr, wr, nr, kw0, kw1, dC, C, c0, sc, sh, yq + i * C);
        for (int r = 0; r < nr; ++r) xr[r] += xp;
      }
    }
  }
}

// One block of P pixels of a row in blocks (nhwc_row_blocks), all channels in vector blocks (xo[r]: x at the block's
// first column, y at its first pixel): the 8-channel blocks serve channel counts that are not multiples of 16.
// Returns the channels covered (the caller runs the scalar rest of fewer than 8).
template <Act A, bool FOLD, int K, int S, int P, int SHIFT, int NCOL>
inline int64_t nhwc_block_channels(const float* const* xo, const float* const* wr, int nr, int64_t C, const float* sc,
                                   const float* sh, float* y) {
  const float* xb[16];
  const float* wb[16];
  auto at_c = [&](int64_t c) {
    for (int r = 0; r < nr; ++r) xb[r] = xo[r] + c, wb[r] = wr[r] + c;
  };
  int64_t c0 = 0;
  if constexpr (P <= 7 && kVec == 16) {  // 2 x 7 accumulators + 2 x K weights fit AVX-512's 32 registers
    for (; c0 + 2 * kVec <= C; c0 += 2 * kVec) {
      at_c(c0);
      nhwc_block_cols<A, FOLD, K, S, P, SHIFT, NCOL, 2, false, vfw>(xb, wb, nr, 0, 0, C, at(sc, c0), at(sh, c0),
                                                                   y + c0);
    }
  }
  for (; c0 + kVec <= C; c0 += kVec) {
    at_c(c0);
    nhwc_block_cols<A, FOLD, K, S, P, SHIFT, NCOL, 1, false, vfw>(xb, wb, nr, 0, 0, C, at(sc, c0), at(sh, c0), y + c0);
  }
  if constexpr (kVec > 8) {
    for (; c0 + 8 <= C; c0 += 8) {
      at_c(c0);
      nhwc_block_cols<A, FOLD, K, S, P, SHIFT, NCOL, 1, false, vf8>(xb, wb, nr, 0, 0, C, at(sc, c0), at(sh, c0),
                                                                   y + c0);
    }
  }
  return c0;
}

// A row of Wo = m x P output pixels (W == S * Wo, dilation 1, pad (K - 1) / 2) in blocks of P: which columns a block
// reads, padding included, depends only on whether it is the first, the last, both or neither, so each of the four
// is an instantiation whose columns are known at compile time (no tap tested at run time). xr[r]: x at (ih, 0, 0).
template <Act A, bool FOLD, int K, int S, int P>
inline void nhwc_row_blocks(const float* const* xr, const float* const* wr, int nr, int64_t Wo, int64_t C,
                            const float* sc, const float* sh, float* y_row) {
  constexpr int PAD = (K - 1) / 2;
  // Columns each kind of block reads: from column 0 (the only and the first block) or from S * ow0 - PAD (the
  // others), up to the last pixel's last tap or column W - 1, whichever comes first.
  constexpr int ONLY = S * P;
  constexpr int FIRST = S * (P - 1) + K - PAD;
  constexpr int MID = S * (P - 1) + K;
  constexpr int LAST = std::min(S * (P - 1) + K, S * P + PAD);
  const float* xo[16];
  auto at_col = [&](int64_t iw) {
    for (int r = 0; r < nr; ++r) xo[r] = xr[r] + iw * C;
  };
  int64_t c_end;
  at_col(0);
  if (Wo == P) {
    c_end = nhwc_block_channels<A, FOLD, K, S, P, PAD, ONLY>(xo, wr, nr, C, sc, sh, y_row);
  } else {
    c_end = nhwc_block_channels<A, FOLD, K, S, P, PAD, FIRST>(xo, wr, nr, C, sc, sh, y_row);
    int64_t ow0 = P;
    for (; ow0 + P < Wo; ow0 += P) {
      at_col(S * ow0 - PAD);
      nhwc_block_channels<A, FOLD, K, S, P, 0, MID>(xo, wr, nr, C, sc, sh, y_row + ow0 * C);
    }
    at_col(S * ow0 - PAD);
    nhwc_block_channels<A, FOLD, K, S, P, 0, LAST>(xo, wr, nr, C, sc, sh, y_row + ow0 * C);
  }
  if (c_end < C) {
    const int64_t W = S * Wo;
    for (int64_t i = 0; i < Wo; ++i) {
      const int64_t iw = S * i - PAD;  // column of tap kw = 0
      const int kw0 = (int)std::clamp<int64_t>(-iw, 0, K), kw1 = (int)std::clamp<int64_t>(W - iw, kw0, K);
      at_col(iw);
      nhwc_tail<A, FOLD>(xo, wr, nr, kw0, kw1, C, C, c_end, sc, sh, y_row + i * C);
    }
  }
}

// nhwc_row_blocks for the rows it serves (dilation 1, K 3 or 5, stride 1 or 2, Wo a multiple of 7, W == S * Wo:
// every depthwise row of the MobileNets at 224 x 224), in blocks of 14 pixels where Wo and the registers allow,
// else 7: false when the row is not one of them (or the copy has no row blocks). K3 stride-2 rows of 28 or more
// outputs keep the generic 4-pixel blocks: they are memory-bound, and the row blocks measured 5-20 % slower there
// (op alone, batch 8: c64 112x112 1.40 -> 1.65 ms with AVX2, c128 56x56 0.73 -> 0.78 ms with AVX-512).
template <Act A, bool FOLD>
inline bool nhwc_row_blocks_dispatch(const DwParams& p, const float* const* xr, const float* const* wr, int nr,
                                     const float* sc, const float* sh, float* y_row) {
  if (kRowPixels == 0 || p.dilation != 1 || (p.k != 3 && p.k != 5) || (p.stride != 1 && p.stride != 2) ||
      p.Wo % 7 != 0 || p.W != p.stride * p.Wo || (p.k == 3 && p.stride == 2 && p.Wo >= 28))
    return false;
  auto run = [&](auto k, auto s, auto P) {
    nhwc_row_blocks<A, FOLD, decltype(k)::value, decltype(s)::value, decltype(P)::value>(xr, wr, nr, p.Wo, p.C, sc,
                                                                                          sh, y_row);
  };
  auto by_p = [&](auto k, auto s) {
    if constexpr (kRowPixels >= 14) {
      if (p.Wo % 14 == 0) return run(k, s, std::integral_constant<int, 14>{});
    }
    return run(k, s, std::integral_constant<int, 7>{});
  };
  auto by_s = [&](auto k) {
    if (p.stride == 1) return by_p(k, std::integral_constant<int, 1>{});
    return by_p(k, std::integral_constant<int, 2>{});
  };
  if (p.k == 3)
    by_s(std::integral_constant<int, 3>{});
  else
    by_s(std::integral_constant<int, 5>{});
  return true;
}

// Pixels [ow0, ow0 + P) of a stride-1, dilation-1 row (xr[r]: x at (ih, iw = 0, c = 0)), edges included: channels
// in slide blocks, a rest of fewer than 8 channels per pixel over its tap window.
template <Act A, bool FOLD, int K, int P>
inline void nhwc_pixels_slide(const float* const* xr, const float* const* wr, int nr, int64_t ow0, int pad,
                              int64_t W, int64_t C, const float* sc, const float* sh, float* y_row) {
  const float* xb[16];
  const float* wb[16];
  const int64_t iw0 = ow0 - pad;
  float* yq = y_row + ow0 * C;
  auto at_c = [&](int64_t c) {
    for (int r = 0; r < nr; ++r) xb[r] = xr[r] + iw0 * C + c, wb[r] = wr[r] + c;
  };
  int64_t c0 = 0;
  auto channels = [&](auto edge) {
    constexpr bool E = decltype(edge)::value;
    for (; c0 + 2 * kVec <= C; c0 += 2 * kVec) {
      at_c(c0);
      nhwc_block_cols<A, FOLD, K, 1, P, 0, P + K - 1, 2, E, vfw>(xb, wb, nr, iw0, W, C, at(sc, c0), at(sh, c0),
                                                                 yq + c0);
    }
    for (; c0 + kVec <= C; c0 += kVec) {
      at_c(c0);
      nhwc_block_cols<A, FOLD, K, 1, P, 0, P + K - 1, 1, E, vfw>(xb, wb, nr, iw0, W, C, at(sc, c0), at(sh, c0),
                                                                 yq + c0);
    }
    for (; c0 + 8 <= C; c0 += 8) {
      at_c(c0);
      nhwc_block_cols<A, FOLD, K, 1, P, 0, P + K - 1, 1, E, vf8>(xb, wb, nr, iw0, W, C, at(sc, c0), at(sh, c0),
                                                                 yq + c0);
    }
  };
  if (iw0 < 0 || iw0 + P + K - 1 > W)
    channels(std::true_type{});
  else
    channels(std::false_type{});
  if (c0 < C) {
    for (int i = 0; i < P; ++i) {
      const int64_t iw = iw0 + i;  // column of tap kw = 0
      const int kw0 = (int)std::clamp<int64_t>(-iw, 0, K), kw1 = (int)std::clamp<int64_t>(W - iw, kw0, K);
      for (int r = 0; r < nr; ++r) xb[r] = xr[r] + iw * C;
      nhwc_tail<A, FOLD>(xb, wr, nr, kw0, kw1, C, C, c0, sc, sh, yq + i * C);
    }
  }
}

// Output row (n, oh): x_img = x at image n (NHWC dense), y_row = y at (n, oh, 0, 0). FOLD = false writes z (the
// conv alone; sc, sh unused and may be null) for the training passes.
template <Act A, bool FOLD>
void nhwc_fwd_row(const DwParams& p, const float* x_img, const float* wt, const float* sc, const float* sh,
                  int64_t oh, float* y_row) {
  const int k = p.k, s = p.stride, d = p.dilation, pad = p.pad;
  const int64_t C = p.C, W = p.W, Wo = p.Wo, dC = (int64_t)d * C, xp = (int64_t)s * C;
  const float* xr[16];
  const float* wr[16];
  int nr = 0;
  for (int kh = 0; kh < k; ++kh) {
    const int64_t ih = in_coord(oh, kh, s, d, pad);
    if (ih < 0 || ih >= p.H) continue;
    xr[nr] = x_img + ih * W * C;
    wr[nr] = wt + (int64_t)kh * k * C;
    ++nr;
  }
  if constexpr (kRowPixels > 0) {
    if (nhwc_row_blocks_dispatch<A, FOLD>(p, xr, wr, nr, sc, sh, y_row)) return;
  }
  if constexpr (kVec == 16) {
    if (s == 1 && d == 1) {  // the whole row, edges included, in slide blocks of 4 pixels
      MNET_DISPATCH_KSIZE(k, K, [&] {
        int64_t ow = 0;
        for (; ow + 4 <= Wo; ow += 4) nhwc_pixels_slide<A, FOLD, K, 4>(xr, wr, nr, ow, pad, W, C, sc, sh, y_row);
        switch (Wo - ow) {
          case 3: return nhwc_pixels_slide<A, FOLD, K, 3>(xr, wr, nr, ow, pad, W, C, sc, sh, y_row);
          case 2: return nhwc_pixels_slide<A, FOLD, K, 2>(xr, wr, nr, ow, pad, W, C, sc, sh, y_row);
          case 1: return nhwc_pixels_slide<A, FOLD, K, 1>(xr, wr, nr, ow, pad, W, C, sc, sh, y_row);
          default: return;
        }
      });
      return;
    }
  }
  // Pixels [lo, hi) with the full tap window; pixel ow's kw = 0 column is xr[r] + (ow * s + shift) * C.
  auto full = [&](int64_t lo, int64_t hi, int64_t shift) {
    const float* xo[16];
    auto at_px = [&](int64_t ow) {
      for (int r = 0; r < nr; ++r) xo[r] = xr[r] + (ow * s + shift) * C;
    };
    const int64_t nq = (hi - lo) / 4;
    if (nq > 0) {
      at_px(lo);
      nhwc_pixels<A, FOLD, 4>(xo, wr, nr, 0, k, dC, xp, C, sc, sh, y_row + lo * C, nq);
    }
    int64_t ow = lo + nq * 4;
    if (hi - ow >= 2) {
      at_px(ow);
      nhwc_pixels<A, FOLD, 2>(xo, wr, nr, 0, k, dC, xp, C, sc, sh, y_row + ow * C, 1);
      ow += 2;
    }
    if (ow < hi) {
      at_px(ow);
      nhwc_pixels<A, FOLD, 1>(xo, wr, nr, 0, k, dC, xp, C, sc, sh, y_row + ow * C, 1);
    }
  };
  // interior [a, b): every kw in range; iw(ow, kw) = ow * s - pad + kw * d
  int64_t a = (pad + s - 1) / s;
  const int64_t top = W - 1 + pad - (int64_t)(k - 1) * d;
  int64_t b = top < 0 ? 0 : top / s + 1;
  a = std::min(a, Wo), b = std::min(b, Wo);
  if (b < a) b = a;
  auto edge = [&](int64_t ow) {
    int kw0 = 0, kw1 = k;
    while (kw0 < k && ow * s - pad + (int64_t)kw0 * d < 0) ++kw0;
    while (kw1 > kw0 && ow * s - pad + (int64_t)(kw1 - 1) * d >= W) --kw1;
    const float* xo[16];
    const int64_t iw0 = ow * s - pad;  // may be negative: only kw >= kw0 is read
    for (int r = 0; r < nr; ++r) xo[r] = xr[r] + iw0 * C;
    nhwc_pixels<A, FOLD, 1>(xo, wr, nr, kw0, kw1, dC, xp, C, sc, sh, y_row + ow * C, 1);
  };
  for (int64_t ow = 0; ow < a; ++ow) edge(ow);
  full(a, b, -pad);
  for (int64_t ow = std::max(a, b); ow < Wo; ++ow) edge(ow);
}

template <Act A>
void nhwc_fwd_f32(const DwParams& p, const float* wt, const float* sc, const float* sh) {
  const float* x = static_cast<const float*>(p.x);
  float* y = static_cast<float*>(p.y);
  const int64_t rows = p.N * p.Ho;
  // ~64k multiply-adds per task at least: small maps do not pay a thread wake-up per row
  const int64_t per_row = std::max<int64_t>(1, p.Wo * p.C * p.k * p.k);
  const int64_t grain = std::max<int64_t>(1, 65536 / per_row);
  at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
    int64_t n = b / p.Ho, oh = b % p.Ho;
    for (int64_t r = b; r < e; ++r) {
      nhwc_fwd_row<A, true>(p, x + n * p.xs.n, wt, sc, sh, oh, y + n * p.ys.n + oh * p.ys.h);
      if (++oh == p.Ho) oh = 0, ++n;
    }
  });
}

// NOLINTEND(build/include)
