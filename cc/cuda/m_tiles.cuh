// How many 8-row MMA tiles of x a small-M kernel instantiates: the fewest of
// 1, 2 or 4 that cover M (4 for anything larger: the kernel tiles M itself or
// refuses it). Each count is its own template instance, so the accumulators
// stay in registers.
#ifndef JAX_LOWBIT_CUDA_M_TILES_CUH_
#define JAX_LOWBIT_CUDA_M_TILES_CUH_

#include <cuda_runtime.h>

#include <type_traits>

namespace jax_lowbit {

constexpr int kMaxMTiles = 4;

// Calls launch(std::integral_constant<int, tiles>{}) and returns its result.
template <typename Launch>
cudaError_t with_m_tiles(int m_rows, Launch&& launch) {
  if (m_rows <= 8) return launch(std::integral_constant<int, 1>{});
  if (m_rows <= 16) return launch(std::integral_constant<int, 2>{});
  return launch(std::integral_constant<int, kMaxMTiles>{});
}

}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_CUDA_M_TILES_CUH_
