#ifndef JAX_LOWBIT_CUDA_HANDLERS_H_
#define JAX_LOWBIT_CUDA_HANDLERS_H_

#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jax_lowbit {

// How every weight GEMM target's binding ends, after its inputs: the output y
// and the weight's attributes bits, group_size and symmetric.
template <typename Binding>
auto with_gemm_output(Binding binding) {
  return std::move(binding)
      .template Ret<xla::ffi::AnyBuffer>()
      .template Attr<int32_t>("bits")
      .template Attr<int64_t>("group_size")
      .template Attr<bool>("symmetric");
}

// The targets of 2:4 sparse weights (gemm_sparse_small_m.cu,
// gemm_large_m.cu): x (M, K), kept codes, metadata, scales, offsets
// (symmetric weights pass their scales in the offsets slot; it is not read).
inline auto sparse_gemm_binding() {
  return with_gemm_output(xla::ffi::Ffi::Bind()
                              .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                              .Arg<xla::ffi::AnyBuffer>()
                              .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                              .Arg<xla::ffi::Buffer<xla::ffi::U16>>()
                              .Arg<xla::ffi::AnyBuffer>()
                              .Arg<xla::ffi::AnyBuffer>());
}

}  // namespace jax_lowbit

XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitDequantizeCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitGemmSmallMCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitGemmLargeMCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitQuantizeRowsCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitActQuantGemmCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitActQuantGemmLargeMCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitSparseDequantizeCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitSparseGemmSmallMCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitSparseGemmLargeMCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitIntGemmSmallMCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitIntGemmLargeMCuda);

#endif  // JAX_LOWBIT_CUDA_HANDLERS_H_
