// Device helpers shared by the CUDA kernels (plain CUDA, no ATen): dtype conversion, 16-byte channel vectors,
// and the fixed-order block tree of the reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <initializer_list>
#include <type_traits>

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
