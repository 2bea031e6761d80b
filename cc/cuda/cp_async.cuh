// Asynchronous global -> shared copies (cp.async, sm_80+) for the kernels
// that stage their operands through a ring of shared-memory stages.
#ifndef JAX_LOWBIT_CUDA_CP_ASYNC_CUH_
#define JAX_LOWBIT_CUDA_CP_ASYNC_CUH_

#include <cstdint>

namespace jax_lowbit {

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// A source size of 0 fills the 16 bytes with zeros (past K, N or M). No L2
// evict-first hint on the codes: with one (createpolicy + cache_hint), ptxas
// 13.0 gave the mid-M 64-row kernel a copy whose descriptor register was never
// set (an illegal instruction on the H100).
__device__ __forceinline__ void copy16_async(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)),
               "l"(src), "r"(valid ? 16 : 0));
}
// Scale rows are N*2 bytes, only 8-byte aligned for N % 8 == 4 (so are the
// rows of 2:4 metadata).
__device__ __forceinline__ void copy8_async(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(shared_address(dst)),
               "l"(src), "r"(valid ? 8 : 0));
}
// One pair of activations, for layouts that reorder x at pair granularity.
__device__ __forceinline__ void copy4_async(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(shared_address(dst)),
               "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void commit_async() { asm volatile("cp.async.commit_group;\n" ::); }
// Returns once at most kPending of this thread's committed groups are in flight.
template <int kPending>
__device__ __forceinline__ void wait_async() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_CUDA_CP_ASYNC_CUH_
