#ifndef JAX_LOWBIT_CPU_HANDLERS_H_
#define JAX_LOWBIT_CPU_HANDLERS_H_

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitDequantizeCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitMatmulCpu);

#endif  // JAX_LOWBIT_CPU_HANDLERS_H_
