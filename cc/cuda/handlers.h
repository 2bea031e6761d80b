#ifndef JAX_LOWBIT_CUDA_HANDLERS_H_
#define JAX_LOWBIT_CUDA_HANDLERS_H_

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitDequantizeCuda);

#endif  // JAX_LOWBIT_CUDA_HANDLERS_H_
