// The ffi::Error of a kernel launch: what cudaGetLastError() said after it.
#ifndef JAX_LOWBIT_CUDA_LAUNCH_STATUS_H_
#define JAX_LOWBIT_CUDA_LAUNCH_STATUS_H_

#include <cuda_runtime.h>

#include <string>

#include "xla/ffi/api/ffi.h"

namespace jax_lowbit {

inline xla::ffi::Error launch_status(cudaError_t err, const char* kernel) {
  if (err == cudaSuccess) return xla::ffi::Error::Success();
  return xla::ffi::Error::Internal(std::string(kernel) + " launch failed: " +
                                   cudaGetErrorString(err));
}

}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_CUDA_LAUNCH_STATUS_H_
