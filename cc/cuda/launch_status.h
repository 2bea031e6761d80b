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

// The current device, which the wgmma kernels (sm_90a) need to be an sm_90
// GPU; `kernel` names the target in the error.
inline xla::ffi::Error current_sm90_device(const char* kernel, int& device) {
  int major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  }
  if (err != cudaSuccess) {
    return xla::ffi::Error::Internal(std::string(kernel) + ": " + cudaGetErrorString(err));
  }
  if (major != 9) {
    return xla::ffi::Error::InvalidArgument(std::string(kernel) +
                                            ": the wgmma kernel needs an sm_90 GPU");
  }
  return xla::ffi::Error::Success();
}

}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_CUDA_LAUNCH_STATUS_H_
