// What the two FFI targets of dense weight-only GEMMs share: their signature
// and their argument checks. jax_lowbit_gemm_small_m (gemm_small_m.cu) takes
// up to 64 rows, jax_lowbit_gemm_large_m (gemm_large_m.cu, sm_90) any number
// (the lowering sends it 17 rows or more).
#ifndef JAX_LOWBIT_CUDA_DENSE_GEMM_TARGET_H_
#define JAX_LOWBIT_CUDA_DENSE_GEMM_TARGET_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/gemm_args.h"
#include "cuda/small_m.cuh"
#include "format.h"
#include "weight_shape.h"
#include "cuda/handlers.h"
#include "xla/ffi/api/ffi.h"

namespace jax_lowbit {

// x (M, K), codes, scales, offsets (symmetric weights pass their scales in
// the offsets slot; it is not read), y (M, N); attributes bits, group_size,
// symmetric.
inline auto dense_gemm_binding() {
  return with_gemm_output(xla::ffi::Ffi::Bind()
                              .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                              .Arg<xla::ffi::AnyBuffer>()
                              .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                              .Arg<xla::ffi::AnyBuffer>()
                              .Arg<xla::ffi::AnyBuffer>());
}

// The checks of both targets: int2/int4 codes of a well-formed weight, and
// x, scales, offsets, y as small_m_problem wants them (k_step(bits) rows of K
// per kernel step, asked once bits is known to be valid; at most `max_rows`
// rows). Fills `p` and `args` or names what is wrong.
template <typename KStep>
ffi::Error dense_gemm_problem(ffi::AnyBuffer x, ffi::Buffer<ffi::U32> codes,
                              ffi::AnyBuffer scales, ffi::AnyBuffer offsets,
                              ffi::Result<ffi::AnyBuffer> y, int32_t bits, int64_t group_size,
                              KStep k_step, int64_t max_rows, SmallMProblem& p, GemmArgs& args) {
  WeightShape w;
  ffi::Error error = weight_shape(codes.dimensions(), scales.dimensions(),
                                  offsets.dimensions(), bits, group_size, w);
  if (error.failure()) return error;
  if (bits != 2 && bits != 4) return ffi::Error::InvalidArgument("gemm: bits must be 2 or 4");
  error = small_m_problem(x, scales, offsets, y, w, k_step(w.bits), max_rows, p);
  if (error.failure()) return error;
  args = GemmArgs{p.x, codes.typed_data(), p.scales, p.offsets, p.y, p.m, p.k, p.n, w.bits,
                  p.group_shift};
  return ffi::Error::Success();
}

}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_CUDA_DENSE_GEMM_TARGET_H_
