// Launch error checking for .cu files (no ATen there): throw std::runtime_error, which the torch boundary
// turns into a Python RuntimeError.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define MNET_CUDA_CHECK(expr)                                                                             \
  do {                                                                                                    \
    const cudaError_t err_ = (expr);                                                                      \
    if (err_ != cudaSuccess)                                                                              \
      throw std::runtime_error(std::string("mnet_ext CUDA error in ") + __func__ + ": " +                  \
                               cudaGetErrorString(err_));                                                 \
  } while (0)

#define MNET_CUDA_CHECK_LAUNCH() MNET_CUDA_CHECK(cudaGetLastError())
