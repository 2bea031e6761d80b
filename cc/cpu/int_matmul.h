#ifndef JAX_LOWBIT_CPU_INT_MATMUL_H_
#define JAX_LOWBIT_CPU_INT_MATMUL_H_

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(LowbitIntMatmulCpu);

#endif  // JAX_LOWBIT_CPU_INT_MATMUL_H_
