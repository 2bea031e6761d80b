// What the two FFI targets of int_matmul share: their signature (a, b in,
// y out) and their shape checks. jax_lowbit_int_gemm_small_m
// (int_gemm_small_m.cu, mma.sync, sm_80+) and jax_lowbit_int_gemm_large_m
// (int_gemm_large_m.cu, wgmma, sm_90) both read a and b in place.
#ifndef JAX_LOWBIT_CUDA_INT_GEMM_TARGET_H_
#define JAX_LOWBIT_CUDA_INT_GEMM_TARGET_H_

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace jax_lowbit {

struct IntGemmArgs {
  const int8_t* a;  // (m, k)
  const int8_t* b;  // (k, n)
  int32_t* y;       // (m, n)
  int m, k, n;
};

// a (M, K) int8, b (K, N) int8 -> y (M, N) int32.
inline auto int_gemm_binding() {
  return xla::ffi::Ffi::Bind()
      .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
      .Arg<xla::ffi::Buffer<xla::ffi::S8>>()
      .Arg<xla::ffi::Buffer<xla::ffi::S8>>()
      .Ret<xla::ffi::Buffer<xla::ffi::S32>>();
}

// The arguments of a product whose shapes fit each other, with M at most
// max_m and K and N multiples of `multiple` (the kernel's loads); an error
// naming `kernel` otherwise.
inline xla::ffi::Error int_gemm_problem(const char* kernel, xla::ffi::Buffer<xla::ffi::S8> a,
                                        xla::ffi::Buffer<xla::ffi::S8> b,
                                        xla::ffi::Result<xla::ffi::Buffer<xla::ffi::S32>> y,
                                        int64_t max_m, int multiple, IntGemmArgs& args) {
  const auto a_dims = a.dimensions();
  const auto b_dims = b.dimensions();
  const auto y_dims = y->dimensions();
  if (a_dims.size() != 2 || b_dims.size() != 2 || y_dims.size() != 2 || a_dims[1] != b_dims[0] ||
      y_dims[0] != a_dims[0] || y_dims[1] != b_dims[1]) {
    return xla::ffi::Error::InvalidArgument(std::string(kernel) +
                                            ": needs a (M, K), b (K, N), y (M, N)");
  }
  const int64_t m = a_dims[0], k = a_dims[1], n = b_dims[1];
  if (m > max_m || k % multiple != 0 || n % multiple != 0 || m > INT32_MAX / 2 ||
      k > INT32_MAX / 2 || n > INT32_MAX / 2) {
    return xla::ffi::Error::InvalidArgument(
        std::string(kernel) + ": needs M <= " + std::to_string(max_m) + ", K % " +
        std::to_string(multiple) + " == 0 and N % " + std::to_string(multiple) + " == 0");
  }
  args = IntGemmArgs{a.typed_data(), b.typed_data(), y->typed_data(), static_cast<int>(m),
                     static_cast<int>(k), static_cast<int>(n)};
  return xla::ffi::Error::Success();
}

}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_CUDA_INT_GEMM_TARGET_H_
