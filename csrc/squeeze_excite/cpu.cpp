// Host twin of the squeeze_excite primitives. NCHW: one (n, c) plane per work item; NHWC: one image per work
// item with the channel loop innermost. Per-(n, c) sums are formed in a fixed order (deterministic).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <vector>

#include "common/dispatch.h"
#include "squeeze_excite/launch.h"

namespace mnet {
namespace {

inline int64_t off4(const Strides4& st, int64_t n, int64_t c, int64_t h, int64_t w) {
  return n * st.n + c * st.c + h * st.h + w * st.w;
}

// out[n, c] = scale * sum_hw a * (b or 1). `a`'s layout picks the loop order; b is read through its strides.
template <typename T, bool PROD>
void reduce_impl(const SeParams& p, const T* a, const Strides4& as, const T* b, const Strides4& bs, float scale) {
  const int64_t C = p.C, HW = p.H * p.W;
  if (!p.channels_last) {
    at::parallel_for(0, p.N * C, 1, [&](int64_t beg, int64_t end) {
      for (int64_t nc = beg; nc < end; ++nc) {
        const int64_t n = nc / C, c = nc % C;
        const T* ap = a + off4(as, n, c, 0, 0);
        double acc = 0.0;
        for (int64_t h = 0; h < p.H; ++h) {
          float r = 0.0f;
          for (int64_t w = 0; w < p.W; ++w) {
            const float v = static_cast<float>(ap[h * p.W + w]);
            r += PROD ? v * static_cast<float>(b[off4(bs, n, c, h, w)]) : v;
          }
          acc += r;
        }
        p.out[nc] = (float)(acc * scale);
      }
    });
  } else {
    at::parallel_for(0, p.N, 1, [&](int64_t beg, int64_t end) {
      std::vector<float> r(C);
      std::vector<double> acc(C);
      for (int64_t n = beg; n < end; ++n) {
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t h = 0; h < p.H; ++h) {
          std::fill(r.begin(), r.end(), 0.0f);
          for (int64_t w = 0; w < p.W; ++w) {
            const T* av = a + off4(as, n, 0, h, w);
            if (PROD) {
              const T* bv = b + off4(bs, n, 0, h, w);
              for (int64_t c = 0; c < C; ++c) r[c] += static_cast<float>(av[c]) * static_cast<float>(bv[c * bs.c]);
            } else {
              for (int64_t c = 0; c < C; ++c) r[c] += static_cast<float>(av[c]);
            }
          }
          for (int64_t c = 0; c < C; ++c) acc[c] += r[c];
        }
        for (int64_t c = 0; c < C; ++c) p.out[n * C + c] = (float)(acc[c] * scale);
      }
    });
  }
  (void)HW;
}

// y[n, c, h, w] = a * s[n, c] + t[n, c] (t optional), y in `ys` layout; a read through `as`.
template <typename T>
void affine_impl(const SeParams& p, const T* a, const Strides4& as, const float* s, const float* t, float tdiv) {
  T* y = static_cast<T*>(p.y);
  const int64_t C = p.C;
  if (!p.channels_last) {
    at::parallel_for(0, p.N * C, 1, [&](int64_t beg, int64_t end) {
      for (int64_t nc = beg; nc < end; ++nc) {
        const int64_t n = nc / C, c = nc % C;
        const float sv = s[nc], tv = t ? t[nc] / tdiv : 0.0f;
        const T* ap = a + off4(as, n, c, 0, 0);
        T* yp = y + off4(p.ys, n, c, 0, 0);
        const int64_t HW = p.H * p.W;
        for (int64_t i = 0; i < HW; ++i) yp[i] = T(static_cast<float>(ap[i]) * sv + tv);
      }
    });
  } else {
    at::parallel_for(0, p.N * p.H, 1, [&](int64_t beg, int64_t end) {
      std::vector<float> tv(C, 0.0f);
      for (int64_t r = beg; r < end; ++r) {
        const int64_t n = r / p.H, h = r % p.H;
        const float* sv = s + n * C;
        if (t)
          for (int64_t c = 0; c < C; ++c) tv[c] = t[n * C + c] / tdiv;
        for (int64_t w = 0; w < p.W; ++w) {
          const T* av = a + off4(as, n, 0, h, w);
          T* yv = y + off4(p.ys, n, 0, h, w);
          for (int64_t c = 0; c < C; ++c) yv[c] = T(static_cast<float>(av[c]) * sv[c] + tv[c]);
        }
      }
    });
  }
}

}  // namespace

void se_pool_cpu(const SeParams& p) {
  MNET_DISPATCH_DTYPE(p.dtype, c10::Half, c10::BFloat16, T, [&] {
    const T* x = static_cast<const T*>(p.x);
    reduce_impl<T, false>(p, x, p.xs, x, p.xs, 1.0f / (float)(p.H * p.W));
  });
}

void se_bwd_reduce_cpu(const SeParams& p) {
  // channels_last here is grad_y's layout (op.cpp): grad_y drives the loop, x is read through its strides
  MNET_DISPATCH_DTYPE(p.dtype, c10::Half, c10::BFloat16, T, [&] {
    reduce_impl<T, true>(p, static_cast<const T*>(p.grad_y), p.gs, static_cast<const T*>(p.x), p.xs, 1.0f);
  });
}

void se_scale_cpu(const SeParams& p) {
  MNET_DISPATCH_DTYPE(p.dtype, c10::Half, c10::BFloat16, T,
                      [&] { affine_impl<T>(p, static_cast<const T*>(p.x), p.xs, p.s, nullptr, 1.0f); });
}

void se_bwd_apply_cpu(const SeParams& p) {
  MNET_DISPATCH_DTYPE(p.dtype, c10::Half, c10::BFloat16, T, [&] {
    affine_impl<T>(p, static_cast<const T*>(p.grad_y), p.gs, p.s, p.dpooled, (float)(p.H * p.W));
  });
}

}  // namespace mnet
