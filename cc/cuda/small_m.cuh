// What the small-M GEMM kernels (gemm_small_m.cu, dense codes, and
// gemm_sparse_small_m.cu, 2:4 sparse codes) share: the CTA shape, the
// per-column scales, the deterministic split-K epilogue, and on the host the
// handler's checks and the launch dispatch over activation type, M tiles and
// symmetry.
#ifndef JAX_LOWBIT_CUDA_SMALL_M_CUH_
#define JAX_LOWBIT_CUDA_SMALL_M_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda/convert.cuh"
#include "cuda/m_tiles.cuh"
#include "cuda/mma_fragments.cuh"
#include "weight_shape.h"
#include "xla/ffi/api/ffi.h"

namespace jax_lowbit {

namespace ffi = xla::ffi;

// A CTA owns kColumns consecutive output columns and the whole of K; its
// warps take K steps round-robin and are reduced in the epilogue.
constexpr int kWarps = 16;
constexpr int kThreads = kWarps * 32;
constexpr int kColumns = 32;
constexpr int kSmallMMaxRows = 32;  // 4 M tiles of 8 rows (the MMA's N)

// Up to 16 rows two CTAs share an SM, so one CTA's dequantize, MMAs and
// reduction overlap the other's loads (with one, every SM idled its DRAM
// queue between CTAs). 17 to 32 rows need one CTA's 128 registers a lane.
template <int kMTiles>
constexpr int kCtasPerSm = kMTiles <= 2 ? 2 : 1;

// Deterministic split-K: partial sums of every warp, added in warp order,
// one M tile (8 rows) at a time to keep shared memory at 16 KB. acc[mt][p] is
// the m16n8 accumulator of M tile mt and column pair p: MMA rows g, g + 8 are
// columns 4g + 2p, 4g + 2p + 1 of the CTA's strip, MMA columns 2t, 2t + 1 are
// rows of x.
template <typename T, int kMTiles>
__device__ __forceinline__ void reduce_and_store(const float (&acc)[kMTiles][2][4],
                                                 T* __restrict__ y, int m_rows, int n,
                                                 int strip) {
  __shared__ float partial[kWarps][8][kColumns];
  const int warp = threadIdx.x / 32;
  const int g = threadIdx.x % 32 / 4;
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const int c = 4 * g + 2 * p;  // accumulator rows g, g + 8 -> columns c, c + 1
      const int r = 2 * t;          // accumulator columns 2t, 2t + 1 -> rows r, r + 1
      partial[warp][r][c] = acc[mt][p][0];
      partial[warp][r + 1][c] = acc[mt][p][1];
      partial[warp][r][c + 1] = acc[mt][p][2];
      partial[warp][r + 1][c + 1] = acc[mt][p][3];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < 8 * kColumns; i += kThreads) {
      const int m = mt * 8 + i / kColumns;
      const int col = strip + i % kColumns;
      if (m < m_rows && col < n) {
        float sum = 0.f;
#pragma unroll
        for (int wi = 0; wi < kWarps; ++wi) sum += partial[wi][i / kColumns][i % kColumns];
        y[int64_t(m) * n + col] = from_float<T>(sum);
      }
    }
    __syncthreads();
  }
}

// The launch arguments every small-M kernel takes besides its packed codes.
struct SmallMProblem {
  const void* x;
  const void* scales;
  const void* offsets;
  void* y;
  int m, k, n;
  int group_shift;  // row k of K is in scale group k >> group_shift
};

// The handler's checks on x, scales, offsets and y for the weight `w`;
// `k_step` is the rows of K of one kernel step, `max_rows` the most rows of x
// the handler's kernels take. Fills `p` or names what is wrong.
inline ffi::Error small_m_problem(ffi::AnyBuffer x, ffi::AnyBuffer scales,
                                  ffi::AnyBuffer offsets, ffi::Result<ffi::AnyBuffer> y,
                                  const WeightShape& w, int64_t k_step, int64_t max_rows,
                                  SmallMProblem& p) {
  const auto dtype = x.element_type();
  if ((dtype != ffi::BF16 && dtype != ffi::F16) || scales.element_type() != dtype ||
      offsets.element_type() != dtype || y->element_type() != dtype) {
    return ffi::Error::InvalidArgument("gemm: x, scales, offsets and y must share bf16 or f16");
  }
  auto x_dims = x.dimensions();
  auto y_dims = y->dimensions();
  if (x_dims.size() != 2 || x_dims[1] != w.k || y_dims.size() != 2 || y_dims[0] != x_dims[0] ||
      y_dims[1] != w.n) {
    return ffi::Error::InvalidArgument("gemm: x must be (M, K) and y (M, N)");
  }
  if (x_dims[0] > max_rows || w.n % 4 != 0 || w.k % k_step != 0 || w.k > INT32_MAX / 2 ||
      w.n > INT32_MAX / 2) {
    return ffi::Error::InvalidArgument("gemm: needs M <= " + std::to_string(max_rows) +
                                       ", N % 4 == 0 and K % " + std::to_string(k_step) +
                                       " == 0");
  }
  // Groups are powers of two; one group spanning K has every row in group 0.
  int group_shift = 31;
  if (w.groups > 1) {
    group_shift = 0;
    while ((int64_t{1} << group_shift) < w.group_rows) ++group_shift;
    if ((int64_t{1} << group_shift) != w.group_rows) {
      return ffi::Error::InvalidArgument("gemm: group size must be a power of two");
    }
    if (w.group_rows < 32) {
      return ffi::Error::InvalidArgument("gemm: groups must have at least 32 rows");
    }
  }
  p = SmallMProblem{x.untyped_data(), scales.untyped_data(), offsets.untyped_data(),
                    y->untyped_data(), static_cast<int>(x_dims[0]), static_cast<int>(w.k),
                    static_cast<int>(w.n), group_shift};
  return ffi::Error::Success();
}

// The fewest 8-row MMA tiles that cover M.
template <typename T, bool kSymmetric, typename Launch>
cudaError_t launch_tiles(const Launch& launch, int m) {
  return with_m_tiles(m, [&](auto tiles) {
    return launch.template run<T, decltype(tiles)::value, kSymmetric>();
  });
}

// A kernel launch's error as the handler's ffi::Error.
inline ffi::Error launch_result(cudaError_t err) {
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("gemm kernel launch failed: ") +
                                cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

// Calls launch.run<T, kMTiles, kSymmetric>() for x's type and the problem's M
// (at most kSmallMMaxRows; nothing for an empty product).
template <typename Launch>
ffi::Error launch_small_m(const Launch& launch, const SmallMProblem& p, ffi::DataType dtype,
                          bool symmetric) {
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();
  if (dtype == ffi::BF16) {
    return launch_result(symmetric ? launch_tiles<__nv_bfloat16, true>(launch, p.m)
                                   : launch_tiles<__nv_bfloat16, false>(launch, p.m));
  }
  return launch_result(symmetric ? launch_tiles<__half, true>(launch, p.m)
                                 : launch_tiles<__half, false>(launch, p.m));
}

}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_CUDA_SMALL_M_CUH_
