// Host emulation of the CUDA builtins the kernels use, so that g++ compiles the real csrc kernels (forced first by
// `-include`; tests/cuda_emu/build.py). One OS thread runs every CUDA thread of a block as a fiber (emu.cpp): a
// thread runs until its next __syncthreads, the scheduler releases a barrier when every thread of the block is at it
// (several thread orders, chosen per run), and a barrier that not every thread reaches, or threads waiting at
// different barriers, is an error. Dynamic shared memory and the kernels' static __shared__ arrays are filled with
// NaN bytes before each block (a read of a value no thread staged shows in the outputs) and the bytes past the
// launch's dynamic size are checked after it; __ldg checks bounds (against the buffers the driver registered) and
// alignment. bf16/fp16 conversions are the CUDA headers' host versions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

namespace emu {
extern uint3 g_tid, g_bid;
extern dim3 g_bdim, g_gdim;
extern unsigned char* g_dynamic_smem;
void syncthreads(const char* file, int line);
void* shared_array(size_t bytes, size_t align, const char* file, int line);
void check_load(const void* p, size_t bytes);

template <typename T>
inline T* dynamic_smem() {
  return reinterpret_cast<T*>(g_dynamic_smem);
}

template <typename T>
inline T ldg(const T* p) {
  check_load(p, sizeof(T));
  return *p;
}

// A kernel launch `kernel<<<grid, block, smem, stream>>>(args...)` reads, after build.py's rewrite,
// `::emu::Launch(grid, block, smem, stream)(kernel, args...)`: the arguments are copied into the kernel's parameter
// types once (as a launch does), then every thread of every block runs the kernel on them.
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* ctx);

struct Launch {
  dim3 grid, block;
  size_t smem;
  Launch(dim3 g, dim3 b, size_t bytes = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(bytes) {}
  template <typename... P, typename... A>
  void operator()(void (*kernel)(P...), A&&... args) const {
    struct Ctx {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> params;
    } ctx{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem,
             [](void* c) {
               Ctx* x = static_cast<Ctx*>(c);
               std::apply(x->kernel, x->params);
             },
             &ctx);
  }
  // A kernel held in a variable (kernels.cuh's launch_band_kernel): the rewrite of `kernel<<<...>>>` takes its
  // address, a pointer to the function pointer.
  template <typename... P, typename... A>
  void operator()(void (*const* kernel)(P...), A&&... args) const {
    (*this)(*kernel, std::forward<A>(args)...);
  }
};
}  // namespace emu

#undef __global__
#define __global__
#undef __launch_bounds__
#define __launch_bounds__(...)
// csrc/common/device.cuh's shared-memory declarations: the block's dynamic buffer, and static arrays carved from a
// per-block arena (one per declaration, the same for every thread of the block; emu.cpp: shared_array).
#define MNET_DYNAMIC_SMEM(T, name) T* const name = ::emu::dynamic_smem<T>()
#define MNET_SHARED_ARRAY(T, name, n) \
  T* const name = static_cast<T*>(::emu::shared_array(sizeof(T) * (n), alignof(T), __FILE__, __LINE__))
// A plain `__shared__ T a[n];` (the final combines in stats.cu, bwd_reduce.cu): one static copy per kernel (blocks
// run one after another), in a section the runtime NaN-fills before each block. g++ ignores the section for statics
// of function templates, so kernels.cuh's templates use MNET_SHARED_ARRAY.
#undef __shared__
#define __shared__ static __attribute__((section("mnet_emu_smem")))
#define threadIdx (::emu::g_tid)
#define blockIdx (::emu::g_bid)
#define blockDim (::emu::g_bdim)
#define gridDim (::emu::g_gdim)
#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __ldg(p) ::emu::ldg(p)

inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// cuda_runtime.h's typed overload exists for nvcc only.
template <typename... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// The default build instantiates the kernels for fp32 and bf16 only (fp16 shares bf16's 2-byte vector geometry and
// differs in the conversions alone): a third of the compile time. build.py's `full` build defines
// MNET_EMU_ALL_DTYPES and keeps dispatch.h's switch.
#ifndef MNET_EMU_ALL_DTYPES
#include <stdexcept>

#define MNET_DISPATCH_F16_ARM(HalfT, T, ...) \
  throw std::runtime_error("this emulator build runs fp32 and bf16 (build.py: build(full=True))");
#endif
#include "common/dispatch.h"
