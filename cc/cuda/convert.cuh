// float <-> element conversions shared by the CUDA kernels.
#ifndef JAX_LOWBIT_CUDA_CONVERT_CUH_
#define JAX_LOWBIT_CUDA_CONVERT_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace jax_lowbit {

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Exact: every bf16, fp16 and f32 value is a float.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_CUDA_CONVERT_CUH_
