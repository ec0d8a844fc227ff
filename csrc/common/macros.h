// Portability macros: the headers in csrc/common and the params/kernels headers compile with g++ (host twin)
// and nvcc (device kernels) alike. No ATen here.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MNET_HD __host__ __device__ __forceinline__
#define MNET_DEVICE __device__ __forceinline__
#else
#define MNET_HD inline
#define MNET_DEVICE inline
#endif

// A device function kept out of line: a rare path whose loop and loads stay out of its caller's registers (and off
// the static report's counted path: bench/kernel_report.py).
#if defined(__CUDACC__) || defined(__HIPCC__)
#define MNET_DEVICE_COLD __device__ __noinline__
#else
#define MNET_DEVICE_COLD __attribute__((noinline))
#endif

// Kept for readability in signatures that must be callable from both sides.
#define HOST_DEVICE MNET_HD

// Full unrolling of a loop with a compile-time trip count on the device; the host compilers decide for themselves.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define MNET_UNROLL _Pragma("unroll")
#else
#define MNET_UNROLL
#endif

#define MNET_RESTRICT __restrict__  // g++, clang and nvcc all accept it

#define MNET_STR2(...) #__VA_ARGS__
#define MNET_STR(...) MNET_STR2(__VA_ARGS__)
