// Host twin of the dwconv_bn_act primitives: the CPU implementation, sharing activations/BN fold/Welford with
// the CUDA kernels (common/*.h). Also the fast CPU path: native NCHW and NHWC loops whose innermost loop runs
// over contiguous memory (W in NCHW, C in NHWC) so the compiler vectorises it; fp32 accumulation. fp32
// channels_last (the layout a fused model runs in) has register-blocked kernels (cpu_nhwc_fwd.h): the eval
// forward, the conv rows the statistics and backward passes recompute, and the stride-1 dx.
//
// ISA: the body (cpu_impl.h) is compiled three times, for the baseline ISA and (x86-64 with GCC) for AVX2+FMA and
// AVX-512, and the entry points pick the widest copy the CPU supports at runtime (like ATen's CPU_CAPABILITY).
//
// Parallelism: at::parallel_for over independent work items (NCHW: (n, c) planes; NHWC: (n, oh) rows or fixed
// row blocks). Reductions write one partial per work item / fixed block and are combined afterwards in a
// fixed order (double precision), so results do not depend on the number of threads.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/activations.h"
#include "common/dispatch.h"
#include "common/math.h"
#include "dwconv_bn_act/launch.h"

namespace mnet {

// The baseline copy passes 256/512-bit GCC vectors between inlined helpers only: no ABI concern.
#pragma GCC diagnostic ignored "-Wpsabi"

// The NHWC kernels' vector width in floats and the widest row block in pixels (cpu_nhwc_fwd.h: 0 = no row
// blocks), per ISA copy.
#define MNET_TWIN_VEC 8
#define MNET_TWIN_ROW_PIXELS 0
namespace twin_base {
namespace {
#include "dwconv_bn_act/cpu_impl.h"
}  // namespace
}  // namespace twin_base

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MNET_AVX2_TWIN 1
#undef MNET_TWIN_ROW_PIXELS
#define MNET_TWIN_ROW_PIXELS 7
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace twin_avx2 {
namespace {
#include "dwconv_bn_act/cpu_impl.h"
}  // namespace
}  // namespace twin_avx2
#pragma GCC pop_options

#undef MNET_TWIN_VEC
#define MNET_TWIN_VEC 16
#undef MNET_TWIN_ROW_PIXELS
#define MNET_TWIN_ROW_PIXELS 14
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
namespace twin_avx512 {
namespace {
#include "dwconv_bn_act/cpu_impl.h"
}  // namespace
}  // namespace twin_avx512
#pragma GCC pop_options

// MNET_EXT_CPU_ISA=avx2 or baseline caps the copy picked (tests and benchmarks of the narrower copies on a
// machine with AVX-512); unset or anything else: the widest the CPU supports.
static int isa_cap() {
  static const int cap = [] {
    const char* v = std::getenv("MNET_EXT_CPU_ISA");
    if (v && std::strcmp(v, "baseline") == 0) return 0;
    if (v && std::strcmp(v, "avx2") == 0) return 1;
    return 2;
  }();
  return cap;
}
static bool cpu_has_avx2() {
  static const bool ok = isa_cap() >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
static bool cpu_has_avx512() {
  static const bool ok = isa_cap() >= 2 && cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq");
  return ok;
}
#endif

// Runs FN<T>(p) from the AVX2+FMA copy when the CPU has it, else from the baseline copy.
#ifdef MNET_AVX2_TWIN
#define MNET_TWIN_CALL(FN, p)                                                         \
  MNET_DISPATCH_DTYPE((p).dtype, c10::Half, c10::BFloat16, T, [&] {                  \
    if (cpu_has_avx512()) return twin_avx512::FN<T>(p);                               \
    if (cpu_has_avx2()) return twin_avx2::FN<T>(p);                                   \
    return twin_base::FN<T>(p);                                                       \
  })
#else
#define MNET_TWIN_CALL(FN, p) \
  MNET_DISPATCH_DTYPE((p).dtype, c10::Half, c10::BFloat16, T, [&] { return twin_base::FN<T>(p); })
#endif

#ifdef MNET_AVX2_TWIN
int host_isa() { return cpu_has_avx512() ? 2 : cpu_has_avx2() ? 1 : 0; }
#else
int host_isa() { return 0; }
#endif

void dw_fwd_cpu(const DwParams& p) { MNET_TWIN_CALL(fwd_impl, p); }
void dw_stats_cpu(const DwParams& p) { MNET_TWIN_CALL(stats_impl, p); }
void dw_bwd_reduce_cpu(const DwParams& p) { MNET_TWIN_CALL(bwd_reduce_impl, p); }
void dw_bwd_apply_cpu(const DwParams& p) { MNET_TWIN_CALL(bwd_apply_impl, p); }

}  // namespace mnet
