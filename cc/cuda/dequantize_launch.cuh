// What the CUDA dequantize handlers (dense and 2:4 sparse) share: a grid of
// one thread per code word, and the launch for the output's element type.
#ifndef JAX_LOWBIT_CUDA_DEQUANTIZE_LAUNCH_CUH_
#define JAX_LOWBIT_CUDA_DEQUANTIZE_LAUNCH_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "weight_shape.h"
#include "xla/ffi/api/ffi.h"

namespace jax_lowbit {

namespace ffi = xla::ffi;

constexpr int kDequantizeThreads = 256;

// What a dequantize launch reads and writes; scales and offsets are float32.
struct DequantizeArgs {
  const uint32_t* codes;
  const float* scales;
  const float* offsets;
  WeightShape w;
  void* out;
  cudaStream_t stream;
};

// Blocks for `words` threads; the kernels loop when the grid is capped.
inline int64_t dequantize_blocks(int64_t words) {
  return std::min<int64_t>((words + kDequantizeThreads - 1) / kDequantizeThreads, 65535 * 8);
}

// Calls launch.run<T>() with T the element type of an f32, bf16 or f16 output
// and turns a launch failure into an ffi::Error.
template <typename Launch>
ffi::Error launch_dequantize(ffi::DataType out_type, const Launch& launch) {
  cudaError_t err;
  switch (out_type) {
    case ffi::F32:
      err = launch.template run<float>();
      break;
    case ffi::BF16:
      err = launch.template run<__nv_bfloat16>();
      break;
    case ffi::F16:
      err = launch.template run<__half>();
      break;
    default:
      return ffi::Error::InvalidArgument("dequantize: output dtype must be f32, bf16 or f16");
  }
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("dequantize kernel launch failed: ") +
                                cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_CUDA_DEQUANTIZE_LAUNCH_CUH_
