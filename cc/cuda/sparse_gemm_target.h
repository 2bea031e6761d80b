// What the two FFI targets of 2:4 sparse weight GEMMs share: their signature
// and their argument checks. jax_lowbit_sparse_gemm_small_m
// (gemm_sparse_small_m.cu) takes up to 64 rows, jax_lowbit_sparse_gemm_large_m
// (gemm_large_m.cu, sm_90) any number (the lowering sends it 17 rows or more).
#ifndef JAX_LOWBIT_CUDA_SPARSE_GEMM_TARGET_H_
#define JAX_LOWBIT_CUDA_SPARSE_GEMM_TARGET_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/gemm_args.h"
#include "cuda/handlers.h"
#include "cuda/small_m.cuh"
#include "weight_shape.h"
#include "xla/ffi/api/ffi.h"

namespace jax_lowbit {

// x (M, K), kept codes, metadata, scales, offsets (symmetric weights pass
// their scales in the offsets slot; it is not read), y (M, N); attributes
// bits, group_size, symmetric.
inline auto sparse_gemm_binding() {
  return with_gemm_output(xla::ffi::Ffi::Bind()
                              .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                              .Arg<xla::ffi::AnyBuffer>()
                              .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                              .Arg<xla::ffi::Buffer<xla::ffi::U16>>()
                              .Arg<xla::ffi::AnyBuffer>()
                              .Arg<xla::ffi::AnyBuffer>());
}

// The checks of both targets: a well-formed 2:4 sparse weight, and x,
// scales, offsets, y as small_m_problem wants them (`k_step` rows of K per
// kernel step, at most `max_rows` rows). Fills `p` and `args` or names what
// is wrong.
inline ffi::Error sparse_gemm_problem(ffi::AnyBuffer x, ffi::Buffer<ffi::U32> codes,
                                      ffi::Buffer<ffi::U16> metadata, ffi::AnyBuffer scales,
                                      ffi::AnyBuffer offsets, ffi::Result<ffi::AnyBuffer> y,
                                      int32_t bits, int64_t group_size, int64_t k_step,
                                      int64_t max_rows, SmallMProblem& p, GemmArgs& args) {
  WeightShape w;
  ffi::Error error =
      sparse_weight_shape(codes.dimensions(), metadata.dimensions(), scales.dimensions(),
                          offsets.dimensions(), bits, group_size, w);
  if (error.failure()) return error;
  error = small_m_problem(x, scales, offsets, y, w, k_step, max_rows, p);
  if (error.failure()) return error;
  args = GemmArgs{p.x, codes.typed_data(), p.scales, p.offsets, p.y, p.m, p.k, p.n, w.bits,
                  p.group_shift};
  return ffi::Error::Success();
}

}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_CUDA_SPARSE_GEMM_TARGET_H_
