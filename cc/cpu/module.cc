// nanobind module _cpu: the CPU FFI targets and what the build was made from.
#include <nanobind/nanobind.h>

#include "build_config.h"
#include "cpu/act_quant_matmul.h"
#include "cpu/handlers.h"
#include "cpu/int_matmul.h"
#include "cpu/sparse_handlers.h"
#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

namespace {

template <typename Fn>
nb::capsule as_capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_cpu, m) {
  m.def("registrations", []() {
    nb::dict targets;
    targets["jax_lowbit_dequantize"] = as_capsule(LowbitDequantizeCpu);
    targets["jax_lowbit_matmul"] = as_capsule(LowbitMatmulCpu);
    targets["jax_lowbit_int_matmul"] = as_capsule(LowbitIntMatmulCpu);
    targets["jax_lowbit_act_quant_matmul"] = as_capsule(LowbitActQuantMatmulCpu);
    targets["jax_lowbit_sparse_dequantize"] = as_capsule(LowbitSparseDequantizeCpu);
    targets["jax_lowbit_sparse_matmul"] = as_capsule(LowbitSparseMatmulCpu);
    return targets;
  });
  m.def("build_info", []() {
    nb::dict info;
    info["cuda"] = JAX_LOWBIT_WITH_CUDA != 0;
    info["cuda_architectures"] = JAX_LOWBIT_CUDA_ARCHITECTURES;
    info["jaxlib_version"] = JAX_LOWBIT_JAXLIB_VERSION;
    info["ffi_api_version"] = nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
    return info;
  });
}
