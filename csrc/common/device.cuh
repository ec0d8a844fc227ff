// Device helpers shared by the CUDA kernels (plain CUDA, no ATen): dtype conversion, 16-byte channel vectors,
// and the fixed-order block tree of the reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <initializer_list>
#include <type_traits>

#include "common/activations.h"
#include "common/macros.h"
#include "dwconv_bn_act/params.h"

// Shared memory of a kernel: `MNET_DYNAMIC_SMEM(float4, stage);` declares `stage` as the block's dynamic buffer,
// `MNET_SHARED_ARRAY(Welford, tree, n);` a static array of n. Macros so that the host emulator of the kernels
// (tests/cuda_emu/emu.h) can map them to its own per-block buffers; nvcc sees the plain declarations.
#ifndef MNET_DYNAMIC_SMEM
#define MNET_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#define MNET_SHARED_ARRAY(T, name, n) __shared__ T name[n]
#endif

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

// ---- channel vectors ----------------------------------------------------------------------------------
// V consecutive elements as fp32. FULL (a template parameter, so the hot path has no branch): V * sizeof(T) == 16,
// every vector in range and 16-byte aligned (the launcher checks C % V == 0 and the base pointers), so one 16-byte
// load serves, zero when `in` is false (padding). Otherwise the first `valid` elements load one by one (valid = 0:
// padding; < V: the last vector of a C that is not a multiple of V) and the rest read as 0.
template <typename T, int V, bool FULL>
MNET_DEVICE void load_vec(const T* __restrict__ src, bool in, int valid, float (&out)[V]) {
  if constexpr (FULL) {
    static_assert(V * sizeof(T) == 16, "FULL vectors are 16 bytes");
    uint4 raw = make_uint4(0u, 0u, 0u, 0u);
    if (in) raw = __ldg(reinterpret_cast<const uint4*>(src));
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (sizeof(T) == 4) {
        out[i] = __uint_as_float(words[i]);
      } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        // bf16 -> fp32 is exact: the bf16 bits are the high half of the fp32.
        out[2 * i] = __uint_as_float(words[i] << 16);
        out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
      } else {
        const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&words[i]));
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
      }
    }
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = in && v < valid ? to_f(src[v]) : 0.0f;
  }
}

template <typename T, int V, bool FULL>
MNET_DEVICE void store_vec(T* __restrict__ dst, int valid, const float (&in)[V]) {
  if constexpr (FULL) {
    uint32_t words[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (sizeof(T) == 4) {
        words[i] = __float_as_uint(in[i]);
      } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
        words[i] = *reinterpret_cast<const uint32_t*>(&h);
      } else {
        const __half2 h = __floats2half2_rn(in[2 * i], in[2 * i + 1]);
        words[i] = *reinterpret_cast<const uint32_t*>(&h);
      }
    }
    *reinterpret_cast<uint4*>(dst) = make_uint4(words[0], words[1], words[2], words[3]);
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v)
      if (v < valid) dst[v] = from_f<T>(in[v]);
  }
}

// 16-byte channel vectors: channels_last, every channel vector full and every base aligned.
template <typename T>
inline bool full_vectors(bool channels_last, int64_t C, std::initializer_list<const void*> ptrs) {
  constexpr int V = 16 / (int)sizeof(T);
  if (!channels_last || C % V != 0) return false;
  for (const void* q : ptrs)
    if (q && reinterpret_cast<uintptr_t>(q) % 16 != 0) return false;
  return true;
}

// Calls f with the compile-time layout variant: (CL, FULL) in {(false, false), (true, false), (true, true)}.
#define MNET_DISPATCH_LAYOUT(channels_last, full, CL, FULL, ...)          \
  [&] {                                                                   \
    if (!(channels_last)) {                                               \
      constexpr bool CL = false, FULL = false;                            \
      return __VA_ARGS__();                                               \
    }                                                                     \
    if (full) {                                                           \
      constexpr bool CL = true, FULL = true;                              \
      return __VA_ARGS__();                                               \
    }                                                                     \
    constexpr bool CL = true, FULL = false;                               \
    return __VA_ARGS__();                                                 \
  }()

// ---- an activated pair rounded to 16 bits -------------------------------------------------------------
// act(u), act(v) rounded to T (bf16 / fp16) as the 4 bytes of a pair (u low). relu and relu6 are applied after the
// rounding, on the packed pair: exact, since rounding to nearest is monotonic and 0 and 6 are representable in T
// (round(max(u, 0)) = max(round(u), 0), the same for min with 6), and NaN stays NaN (cvt's .relu gives the
// canonical NaN for a NaN, min.NaN keeps it). On sm_80+ relu is then free (cvt.rn.relu: F2FP.RELU) and relu6 one
// min.NaN per pair (HMNMX2) instead of 1 and 2 FMNMX per element; elsewhere (and in the host emulator) the same
// order of operations with fp32 comparisons. The tensor-core forward's epilogue (mma_fwd.cuh); its cost per
// element is what the static report's probe measures (bench/act_cost.cu: act_pair_cost).
template <typename T>
MNET_DEVICE uint32_t pack_pair(float u, float v) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(u, v);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __half2 h = __floats2half2_rn(u, v);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

template <typename T>
MNET_DEVICE float pair_half(uint32_t w, int h) {
  const uint16_t bits = (uint16_t)(w >> (16 * h));
  if constexpr (std::is_same<T, __nv_bfloat16>::value) return __uint_as_float((uint32_t)bits << 16);  // exact
  else return __half2float(*reinterpret_cast<const __half*>(&bits));
}

// Each half of pair w clamped by f (NaN kept), through fp32: exact, the halves and the bounds are values of T.
template <typename T, typename F>
MNET_DEVICE uint32_t clamp_pair_f32(uint32_t w, F f) {
  return pack_pair<T>(f(pair_half<T>(w, 0)), f(pair_half<T>(w, 1)));
}

template <Act A, typename T>
MNET_DEVICE uint32_t act_pair(float u, float v) {
  static_assert(sizeof(T) == 2, "pairs of bf16 / fp16");
  if constexpr (A == Act::Relu || A == Act::Relu6) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    constexpr bool bf = std::is_same<T, __nv_bfloat16>::value;
    uint32_t w;
    if constexpr (bf) asm("cvt.rn.relu.bf16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(v), "f"(u));
    else asm("cvt.rn.relu.f16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(v), "f"(u));
    if constexpr (A == Act::Relu6) {
      const uint32_t six = bf ? 0x40c040c0u : 0x46004600u;  // 6.0 in both halves
      if constexpr (bf) asm("min.NaN.bf16x2 %0, %1, %2;" : "=r"(w) : "r"(w), "r"(six));
      else asm("min.NaN.f16x2 %0, %1, %2;" : "=r"(w) : "r"(w), "r"(six));
    }
    return w;
#else
    return clamp_pair_f32<T>(pack_pair<T>(u, v), [](float h) { return act_fwd<A>(h); });
#endif
  } else {
    return pack_pair<T>(act_fwd<A>(u), act_fwd<A>(v));
  }
}

// ---- tensor cores and asynchronous copies (sm_80+) ------------------------------------------------------
// Inline PTX on the device; on the host, the CUDA emulator's warp collectives (tests/cuda_emu/emu.h defines
// MNET_EMU: every lane of the warp must arrive, then each takes its part of the result). Shared memory is addressed
// by a 32-bit byte address (`SmemAddr`: the .shared window on the device, an offset into the block's dynamic
// buffer in the emulator), so a lane's base plus compile-time offsets becomes immediate offsets of LDSM.
// The nvcc host pass parses these bodies but never runs them (device code), hence no third branch.
using SmemAddr = uint32_t;

MNET_DEVICE SmemAddr smem_addr(const void* p) {
#if defined(__CUDA_ARCH__)
  return (SmemAddr)__cvta_generic_to_shared(p);
#elif defined(MNET_EMU)
  return ::emu::smem_offset(p);
#else
  return (SmemAddr)(uintptr_t)p;
#endif
}

// 16 bytes global -> shared without registers; `in` false: 16 zero bytes (src is not read). Visible to the
// issuing thread after cp_async_wait_all, to the others after a barrier that follows it.
MNET_DEVICE void cp_async_16(SmemAddr dst, const void* src, bool in) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(in ? 16 : 0) : "memory");
#elif defined(MNET_EMU)
  ::emu::cp_async_16(dst, src, in);
#endif
}

MNET_DEVICE void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#elif defined(MNET_EMU)
  ::emu::cp_async_wait_all();
#endif
}

MNET_DEVICE void syncwarp() {
#if defined(__CUDA_ARCH__)
  __syncwarp();
#elif defined(MNET_EMU)
  ::emu::warp_sync(__FILE__, __LINE__);
#endif
}

// ldmatrix.sync.aligned.m8n8.x{N}.shared.b16: lanes 8i..8i+7 give the 16-byte row addresses of matrix i; register
// i of lane l receives row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1 of matrix i (low half: the first).
template <int N>
MNET_DEVICE void ldmatrix(uint32_t (&r)[N], SmemAddr row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (N == 4)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(row) : "memory");
  else if constexpr (N == 2)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(row)
                 : "memory");
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(row) : "memory");
#elif defined(MNET_EMU)
  ::emu::ldmatrix(N, row, r, __FILE__, __LINE__);
#endif
}

// d += A B on the tensor cores, fp32 accumulation: mma.sync.aligned.m16n8k{KD}.row.col.f32.{bf16,f16}.{..}.f32.
// KD = 16: a = A 16x16 (a[0]: rows g, cols 2t, 2t+1; a[1]: rows g + 8; a[2], a[3]: the same at cols + 8), b = B
// 16x8 (b[0]: rows 2t, 2t+1 of col g; b[1]: rows + 8); KD = 8: a[0], a[1] and b[0] only. d: D 16x8, d[0], d[1] at
// row g, cols 2t, 2t + 1, d[2], d[3] at row g + 8 (g = lane / 4, t = lane % 4; PTX ISA, "Matrix fragments for
// mma.m16n8k16 / m16n8k8" with floating-point types).
template <typename T, int KD>
MNET_DEVICE void mma(float (&d)[4], const uint32_t (&a)[KD / 4], const uint32_t (&b)[KD / 8]) {
  static_assert(KD == 8 || KD == 16, "m16n8k8 or m16n8k16");
  static_assert(sizeof(T) == 2, "bf16 or fp16 operands");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (KD == 16 && std::is_same<T, __nv_bfloat16>::value)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else if constexpr (KD == 16)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else if constexpr (std::is_same<T, __nv_bfloat16>::value)
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(b[0]));
  else
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(b[0]));
#elif defined(MNET_EMU)
  ::emu::mma(std::is_same<T, __nv_bfloat16>::value, KD, d, a, b, __FILE__, __LINE__);
#endif
}

// ---- fixed-order block tree ---------------------------------------------------------------------------
// Threads are `lanes` x `walkers` (thread = walker * lanes + lane). Combines the walkers of each lane by a fixed
// binary tree over sh[] (one S per thread); afterwards walker 0 of each lane holds the block's value. Walkers need
// not be a power of two. Every thread of the block must call it (it synchronises).
template <typename S, typename F>
MNET_DEVICE S block_tree(S v, S* sh, int lanes, int walkers, F combine) {
  const int tid = threadIdx.x, walker = tid / lanes;
  sh[tid] = v;
  __syncthreads();
  int span = 1;
  while (span < walkers) span <<= 1;
  for (int s = span >> 1; s >= 1; s >>= 1) {
    if (walker < s && walker + s < walkers) sh[tid] = combine(sh[tid], sh[tid + s * lanes]);
    __syncthreads();
  }
  const S out = sh[tid];
  __syncthreads();  // sh is reused by the caller
  return out;
}

}  // namespace dev
}  // namespace mnet
