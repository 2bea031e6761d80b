#ifndef JAX_LOWBIT_CUDA_HANDLERS_H_
#define JAX_LOWBIT_CUDA_HANDLERS_H_

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

}  // namespace jax_lowbit

XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitDequantizeCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitGemmSmallMCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitGemmLargeMCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitQuantizeRowsCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitQuantizeRowsIntegerScalesCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitActQuantGemmCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitActQuantGemmLargeMCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitActQuantGemmIntegerScalesCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitSparseDequantizeCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitSparseGemmSmallMCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitSparseGemmLargeMCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitIntGemmSmallMCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitIntGemmLargeMCuda);

#endif  // JAX_LOWBIT_CUDA_HANDLERS_H_
