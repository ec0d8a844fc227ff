// Compile-time switches: the one place where runtime choices become template parameters.
//
// Each macro evaluates `__VA_ARGS__` (a lambda body or a call) with a constexpr/type alias in scope:
//
//   MNET_DISPATCH_DTYPE(dtype, HalfT, BF16T, T, ...)  DType -> `using T = float | HalfT | BF16T`
//        (the host twin passes c10::Half / c10::BFloat16, device code __half / __nv_bfloat16)
//   MNET_DISPATCH_BOOL(cond, NAME, ...)               bool  -> `constexpr bool NAME` (layout: channels_last)
//   MNET_DISPATCH_KSIZE(k, K, ...)                    k in {3,5,7} -> `constexpr int K`
//   MNET_DISPATCH_ACT(act, A, ...)                    Act   -> `constexpr Act A` (all 7 activations)
//   MNET_DISPATCH_CONV_ACT(act, A, ...)               the 5 conv activations only (none/relu/relu6/hardswish/silu)
//
// Unsupported values never reach these macros (op.cpp validates first); the default arms fall back to a
// valid choice only to keep every path compiled, never silently at runtime.
// Compile time grows with the product of the switches used by a kernel: keep that product small and split
// instantiations over .cu files (see csrc/dwconv_bn_act/*.cu).
#pragma once

#include <stdint.h>

#include "common/activations.h"

namespace mnet {
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };
}  // namespace mnet

// The fp16 arm of MNET_DISPATCH_DTYPE, a macro of its own so that a build can leave fp16 out (the CUDA emulator's
// default build, tests/cuda_emu/emu.h, defines it first).
#ifndef MNET_DISPATCH_F16_ARM
#define MNET_DISPATCH_F16_ARM(HalfT, T, ...) \
  {                                          \
    using T = HalfT;                         \
    return __VA_ARGS__();                    \
  }
#endif

#define MNET_DISPATCH_DTYPE(dtype, HalfT, BF16T, T, ...) \
  [&] {                                                  \
    switch (dtype) {                                     \
      case ::mnet::DType::F16:                           \
        MNET_DISPATCH_F16_ARM(HalfT, T, __VA_ARGS__)     \
      case ::mnet::DType::BF16: {                        \
        using T = BF16T;                                 \
        return __VA_ARGS__();                            \
      }                                                  \
      default: {                                         \
        using T = float;                                 \
        return __VA_ARGS__();                            \
      }                                                  \
    }                                                    \
  }()

#define MNET_DISPATCH_BOOL(cond, NAME, ...) \
  [&] {                                     \
    if (cond) {                             \
      constexpr bool NAME = true;           \
      return __VA_ARGS__();                 \
    } else {                                \
      constexpr bool NAME = false;          \
      return __VA_ARGS__();                 \
    }                                       \
  }()

#define MNET_DISPATCH_KSIZE(k, K, ...) \
  [&] {                                \
    switch (k) {                       \
      case 5: {                        \
        constexpr int K = 5;           \
        return __VA_ARGS__();          \
      }                                \
      case 7: {                        \
        constexpr int K = 7;           \
        return __VA_ARGS__();          \
      }                                \
      default: {                       \
        constexpr int K = 3;           \
        return __VA_ARGS__();          \
      }                                \
    }                                  \
  }()

#define MNET_ACT_CASE(VAL, A, ...)         \
  case ::mnet::Act::VAL: {                 \
    constexpr ::mnet::Act A = ::mnet::Act::VAL; \
    return __VA_ARGS__();                  \
  }

#define MNET_DISPATCH_ACT(act, A, ...)                  \
  [&] {                                                 \
    switch (act) {                                      \
      MNET_ACT_CASE(Relu, A, __VA_ARGS__)               \
      MNET_ACT_CASE(Relu6, A, __VA_ARGS__)              \
      MNET_ACT_CASE(Hardswish, A, __VA_ARGS__)          \
      MNET_ACT_CASE(Silu, A, __VA_ARGS__)               \
      MNET_ACT_CASE(Hardsigmoid, A, __VA_ARGS__)        \
      MNET_ACT_CASE(Sigmoid, A, __VA_ARGS__)            \
      default: {                                        \
        constexpr ::mnet::Act A = ::mnet::Act::None;    \
        return __VA_ARGS__();                           \
      }                                                 \
    }                                                   \
  }()

#define MNET_DISPATCH_CONV_ACT(act, A, ...)             \
  [&] {                                                 \
    switch (act) {                                      \
      MNET_ACT_CASE(Relu, A, __VA_ARGS__)               \
      MNET_ACT_CASE(Relu6, A, __VA_ARGS__)              \
      MNET_ACT_CASE(Hardswish, A, __VA_ARGS__)          \
      MNET_ACT_CASE(Silu, A, __VA_ARGS__)               \
      default: {                                        \
        constexpr ::mnet::Act A = ::mnet::Act::None;    \
        return __VA_ARGS__();                           \
      }                                                 \
    }                                                   \
  }()
