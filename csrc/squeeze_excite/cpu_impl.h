// Body of the squeeze_excite host twin (see cpu.cpp). Deliberately without include guard: cpu.cpp includes it
// once per ISA copy, inside an anonymous namespace, and picks one at runtime; it relies on cpu.cpp's includes.
// NOLINTBEGIN(build/include)

inline int64_t off4(const Strides4& st, int64_t n, int64_t c, int64_t h, int64_t w) {
  return n * st.n + c * st.c + h * st.h + w * st.w;
}

// NHWC channel block of one work item: its fp32 row sums stay in L1.
constexpr int64_t kChanBlock = 256;
// NCHW: lanes of independent fp32 partial sums over a flattened plane, flushed to double every kChunk elements.
constexpr int kLanes = 16;
constexpr int64_t kChunk = 1024;

// out[n, c] = scale * sum_hw a * (b or 1). `a` and `b` are dense in the same layout (op.cpp makes them so).
// NHWC: per (image, channel block), a fp32 sum per image row (pixels in order) added into double per channel.
// NCHW: per plane, kLanes fp32 partial sums (element i into lane i % kLanes) per chunk, added into double.
template <typename T, bool PROD>
void reduce_impl(const SeParams& p, const T* a, const Strides4& as, const T* b, const Strides4& bs, float scale) {
  const int64_t C = p.C, H = p.H, W = p.W, HW = H * W;
  if (!p.channels_last) {
    at::parallel_for(0, p.N * C, 1, [&](int64_t beg, int64_t end) {
      for (int64_t nc = beg; nc < end; ++nc) {
        const int64_t n = nc / C, c = nc % C;
        const T* __restrict ap = a + off4(as, n, c, 0, 0);
        const T* __restrict bp = b + off4(bs, n, c, 0, 0);
        double acc = 0.0;
        for (int64_t i0 = 0; i0 < HW; i0 += kChunk) {
          const int64_t len = std::min(kChunk, HW - i0), full = len / kLanes * kLanes;
          float lane[kLanes] = {};
          for (int64_t i = i0; i < i0 + full; i += kLanes)
            for (int j = 0; j < kLanes; ++j) {
              const float v = static_cast<float>(ap[i + j]);
              lane[j] += PROD ? v * static_cast<float>(bp[i + j]) : v;
            }
          for (int64_t i = i0 + full; i < i0 + len; ++i) {
            const float v = static_cast<float>(ap[i]);
            lane[i % kLanes] += PROD ? v * static_cast<float>(bp[i]) : v;
          }
          for (int j = 0; j < kLanes; ++j) acc += lane[j];
        }
        p.out[nc] = (float)(acc * scale);
      }
    });
  } else {
    const int64_t nb = (C + kChanBlock - 1) / kChanBlock;
    at::parallel_for(0, p.N * nb, 1, [&](int64_t beg, int64_t end) {
      float r[kChanBlock];
      double acc[kChanBlock];
      for (int64_t item = beg; item < end; ++item) {
        const int64_t n = item / nb, c0 = item % nb * kChanBlock, cn = std::min(kChanBlock, C - c0);
        std::fill(acc, acc + cn, 0.0);
        for (int64_t h = 0; h < H; ++h) {
          std::fill(r, r + cn, 0.0f);
          const T* __restrict av = a + off4(as, n, c0, h, 0);
          const T* __restrict bv = b + off4(bs, n, c0, h, 0);
          for (int64_t w = 0; w < W; ++w, av += C, bv += C)
            for (int64_t c = 0; c < cn; ++c) {
              const float v = static_cast<float>(av[c]);
              r[c] += PROD ? v * static_cast<float>(bv[c]) : v;
            }
          for (int64_t c = 0; c < cn; ++c) acc[c] += r[c];
        }
        for (int64_t c = 0; c < cn; ++c) p.out[n * C + c0 + c] = (float)(acc[c] * scale);
      }
    });
  }
}

// y[n, c, h, w] = a * s[n, c] + t[n, c] / tdiv (t optional); a dense in y's layout.
template <typename T>
void affine_impl(const SeParams& p, const T* a, const Strides4& as, const float* s, const float* t, float tdiv) {
  T* y = static_cast<T*>(p.y);
  const int64_t C = p.C, HW = p.H * p.W;
  if (!p.channels_last) {
    // ~16k elements per task at least: small planes do not pay a thread wake-up each
    const int64_t grain = std::max<int64_t>(1, 16384 / HW);
    at::parallel_for(0, p.N * C, grain, [&](int64_t beg, int64_t end) {
      for (int64_t nc = beg; nc < end; ++nc) {
        const int64_t n = nc / C, c = nc % C;
        const float sv = s[nc], tv = t ? t[nc] / tdiv : 0.0f;
        const T* __restrict ap = a + off4(as, n, c, 0, 0);
        T* __restrict yp = y + off4(p.ys, n, c, 0, 0);
        for (int64_t i = 0; i < HW; ++i) yp[i] = T(static_cast<float>(ap[i]) * sv + tv);
      }
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, 16384 / (p.W * C));
    at::parallel_for(0, p.N * p.H, grain, [&](int64_t beg, int64_t end) {
      std::vector<float> tv(C, 0.0f);
      int64_t n_tv = -1;  // the image whose t / tdiv tv holds
      for (int64_t r = beg; r < end; ++r) {
        const int64_t n = r / p.H, h = r % p.H;
        const float* __restrict sv = s + n * C;
        if (t && n != n_tv) {
          for (int64_t c = 0; c < C; ++c) tv[c] = t[n * C + c] / tdiv;
          n_tv = n;
        }
        const float* __restrict tp = tv.data();
        const T* __restrict av = a + off4(as, n, 0, h, 0);
        T* __restrict yv = y + off4(p.ys, n, 0, h, 0);
        for (int64_t w = 0; w < p.W; ++w, av += C, yv += C)
          for (int64_t c = 0; c < C; ++c) yv[c] = T(static_cast<float>(av[c]) * sv[c] + tp[c]);
      }
    });
  }
}

// NOLINTEND(build/include)
