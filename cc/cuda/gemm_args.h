// What the weight-only GEMM handler passes to the kernels it dispatches to.
#ifndef JAX_LOWBIT_CUDA_GEMM_ARGS_H_
#define JAX_LOWBIT_CUDA_GEMM_ARGS_H_

#include <cuda_runtime.h>

#include <cstdint>

namespace jax_lowbit {

struct GemmArgs {
  const void* x;         // (m, k) bf16 or f16
  const uint32_t* codes;  // (k / codes per word, n)
  const void* scales;    // (groups, n) in x's dtype
  const void* offsets;   // (groups, n); not read for symmetric weights
  void* y;               // (m, n)
  int m, k, n, bits;
  int group_shift;  // row k is in scale group k >> group_shift
};

// The mid-M kernel (gemm_mid_m.cu): 33 <= m <= 64 rows; T is __nv_bfloat16 or __half.
template <typename T>
cudaError_t launch_gemm_mid_m(const GemmArgs& args, bool symmetric, cudaStream_t stream);

// The staged 2:4 sparse kernel (gemm_sparse_mid_m.cu): 33 <= m <= 64 rows,
// args.codes the kept codes and `metadata` their rows, both (k / 16, n).
template <typename T>
cudaError_t launch_gemm_sparse_mid_m(const GemmArgs& args, const uint16_t* metadata,
                                     bool symmetric, cudaStream_t stream);

}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_CUDA_GEMM_ARGS_H_
