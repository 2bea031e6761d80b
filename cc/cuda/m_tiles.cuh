// How many 8-row MMA tiles of x a small-M kernel instantiates: the fewest of
// 1, 2, 4 (and 8 where asked) that cover M (the most for anything larger: the
// kernel tiles M itself or refuses it). Each count is its own template instance, so the accumulators
// stay in registers.
#ifndef JAX_LOWBIT_CUDA_M_TILES_CUH_
#define JAX_LOWBIT_CUDA_M_TILES_CUH_

#include <cuda_runtime.h>

#include <type_traits>

namespace jax_lowbit {

constexpr int kMaxMTiles = 4;

// Calls launch(std::integral_constant<int, tiles>{}) and returns its result.
// kMax 8 (int_gemm_small_m.cu) adds 4 tiles up to 32 rows and 8 above.
template <int kMax = kMaxMTiles, typename Launch>
cudaError_t with_m_tiles(int m_rows, Launch&& launch) {
  static_assert(kMax == 4 || kMax == 8, "1, 2, 4 (and 8) tiles");
  if (m_rows <= 8) return launch(std::integral_constant<int, 1>{});
  if (m_rows <= 16) return launch(std::integral_constant<int, 2>{});
  if constexpr (kMax == 8) {
    if (m_rows <= 32) return launch(std::integral_constant<int, 4>{});
  }
  return launch(std::integral_constant<int, kMax>{});
}

}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_CUDA_M_TILES_CUH_
