// nanobind module _cuda: the CUDA FFI targets (platform "CUDA").
#include <nanobind/nanobind.h>

#include "cuda/handlers.h"

namespace nb = nanobind;

NB_MODULE(_cuda, m) {
  m.def("registrations", []() {
    nb::dict targets;
    targets["jax_lowbit_dequantize"] = nb::capsule(reinterpret_cast<void*>(LowbitDequantizeCuda));
    targets["jax_lowbit_gemm_small_m"] = nb::capsule(reinterpret_cast<void*>(LowbitGemmSmallMCuda));
    targets["jax_lowbit_gemm_large_m"] = nb::capsule(reinterpret_cast<void*>(LowbitGemmLargeMCuda));
    targets["jax_lowbit_quantize_rows"] = nb::capsule(reinterpret_cast<void*>(LowbitQuantizeRowsCuda));
    targets["jax_lowbit_quantize_rows_integer_scales"] =
        nb::capsule(reinterpret_cast<void*>(LowbitQuantizeRowsIntegerScalesCuda));
    targets["jax_lowbit_act_quant_gemm"] = nb::capsule(reinterpret_cast<void*>(LowbitActQuantGemmCuda));
    targets["jax_lowbit_act_quant_gemm_large_m"] =
        nb::capsule(reinterpret_cast<void*>(LowbitActQuantGemmLargeMCuda));
    targets["jax_lowbit_act_quant_gemm_integer_scales"] =
        nb::capsule(reinterpret_cast<void*>(LowbitActQuantGemmIntegerScalesCuda));
    targets["jax_lowbit_sparse_dequantize"] =
        nb::capsule(reinterpret_cast<void*>(LowbitSparseDequantizeCuda));
    targets["jax_lowbit_sparse_gemm_small_m"] =
        nb::capsule(reinterpret_cast<void*>(LowbitSparseGemmSmallMCuda));
    targets["jax_lowbit_sparse_gemm_large_m"] =
        nb::capsule(reinterpret_cast<void*>(LowbitSparseGemmLargeMCuda));
    targets["jax_lowbit_int_gemm_small_m"] =
        nb::capsule(reinterpret_cast<void*>(LowbitIntGemmSmallMCuda));
    targets["jax_lowbit_int_gemm_large_m"] =
        nb::capsule(reinterpret_cast<void*>(LowbitIntGemmLargeMCuda));
    return targets;
  });
}
