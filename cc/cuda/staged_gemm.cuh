// What the GEMM kernels that stage their operands in shared memory
// (gemm_mid_m.cu, dense codes, and gemm_sparse_mid_m.cu, 2:4 sparse codes)
// share besides cp_async.cuh: their arguments, the bank swizzle of code rows,
// the staging of scales, and the deterministic split-K epilogue (warps of a
// CTA, then CTAs of a thread-block cluster, cluster_split.cuh).
#ifndef JAX_LOWBIT_CUDA_STAGED_GEMM_CUH_
#define JAX_LOWBIT_CUDA_STAGED_GEMM_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/cluster_split.cuh"
#include "cuda/convert.cuh"
#include "cuda/cp_async.cuh"
#include "cuda/gemm_args.h"
#include "cuda/mma_fragments.cuh"

namespace jax_lowbit {

// The arguments of a staged kernel, in device types.
template <typename T>
struct StagedParams {
  const T* x;
  const uint32_t* codes;
  const T* scales;
  const T* offsets;
  T* y;
  int m, k, n, groups, group_shift;
};

// The arguments from the handler's, with the groups that K holds.
template <typename T>
StagedParams<T> staged_params(const GemmArgs& args) {
  const int groups = args.group_shift >= 31 ? 1 : args.k >> args.group_shift;
  return StagedParams<T>{static_cast<const T*>(args.x),       args.codes,
                         static_cast<const T*>(args.scales),  static_cast<const T*>(args.offsets),
                         static_cast<T*>(args.y),             args.m,
                         args.k,                              args.n,
                         groups,                              args.group_shift};
}

// 16-byte chunk c of code word row r is stored at chunk c ^ 2(r % 4): the 8
// lanes of a quarter warp (g = 2i, 2i + 1; t = 0..3, word row t) then read 8
// distinct chunks of a 128-byte window, where unswizzled they hit the same
// banks (a code row is a multiple of 128 bytes long).
__device__ __forceinline__ int swizzled_chunk(int chunk, int word_row) {
  return chunk ^ (2 * (word_row & 3));
}

// Copies the scales (and offsets, for asymmetric weights) of the groups that
// rows k0 .. k0 + kStageRows - 1 of K touch (one row of them for groups of
// kStageRows rows or more), columns col_base .. col_base + kColumns - 1, into
// rows of `row_bytes` at scale_dst and offset_dst: 8 bytes (4 columns) a
// copy, since a row of N*2 bytes is only 8-byte aligned; zeros past the
// groups or N. k0 is a multiple of kStageRows; row k is in group k >> group_shift.
template <typename T, bool kSymmetric, int kColumns, int kThreads, int kStageRows>
__device__ __forceinline__ void copy_stage_scales(char* scale_dst, char* offset_dst,
                                                  int row_bytes, const T* scales,
                                                  const T* offsets, int k0, int group_shift,
                                                  int groups, int n, int col_base) {
  const int first_group = k0 >> group_shift;
  const int rows = group_shift >= 30 || (kStageRows >> group_shift) == 0
                       ? 1
                       : kStageRows >> group_shift;
  for (int i = threadIdx.x; i < rows * (kColumns / 4); i += kThreads) {
    const int r = i / (kColumns / 4), c = i % (kColumns / 4);
    const int col = col_base + 4 * c;
    const bool ok = first_group + r < groups && col < n;
    const int64_t at = int64_t(first_group + r) * n + col;
    copy8_async(scale_dst + r * row_bytes + 8 * c, ok ? scales + at : scales, ok);
    if (!kSymmetric) copy8_async(offset_dst + r * row_bytes + 8 * c, ok ? offsets + at : offsets, ok);
  }
}

// A lane's scales and offsets (offsets are zero for symmetric weights) from
// a stage: 8-byte unit `unit` (4 columns) of row `row`, each value broadcast
// to both halves of a register as the code pairs' conversion wants.
template <bool kSymmetric>
__device__ __forceinline__ void staged_scales(const char* scale_rows, const char* offset_rows,
                                              int row_bytes, int row, int unit,
                                              uint32_t (&scale)[4], uint32_t (&offset)[4]) {
  const int at = row * row_bytes + 8 * unit;
  const uint2 s = *reinterpret_cast<const uint2*>(scale_rows + at);
  const uint2 o =
      kSymmetric ? make_uint2(0, 0) : *reinterpret_cast<const uint2*>(offset_rows + at);
  broadcast_columns(s, scale);
  broadcast_columns(o, offset);
}

// The epilogue of a CTA that owns kColumns columns (32-column strips, one per
// warp of a k lane) and a range of K split over gridDim.y CTAs of a cluster.
// acc[mt][p] is the m16n8 accumulator of M tile mt and column pair p: MMA
// rows g, g + 8 are columns 32 strip + 4g + 2p, + 1; MMA columns 2t, 2t + 1 are
// rows 8 mt + 2t, + 1 of x. The kKLanes warps of a strip are added in k-lane
// order in shared memory (`smem`, at least kKLanes * 8 kMTiles * kColumns
// floats, free once the ring is drained), then the cluster's CTAs in rank
// order through distributed shared memory: deterministic, with no workspace
// and no second kernel.
template <typename T, int kMTiles, int kColumns, int kKLanes, int kThreads>
__device__ __forceinline__ void store_split_k(const float (&acc)[kMTiles][2][4], char* smem,
                                              int strip, int k_lane, T* __restrict__ y,
                                              int m_rows, int n, int col_base) {
  const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  const int splits = gridDim.y;
  wait_async<0>();
  __syncthreads();  // every warp is done with the ring that `partial` overwrites

  float* partial = reinterpret_cast<float*>(smem);
  constexpr int kTile = 8 * kMTiles * kColumns;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int pi = 0; pi < 2; ++pi) {
      const int c = 32 * strip + 4 * g + 2 * pi;  // accumulator rows g, g + 8
      const int r = 8 * mt + 2 * t;               // accumulator columns 2t, 2t + 1
      float* out = partial + k_lane * kTile;
      out[r * kColumns + c] = acc[mt][pi][0];
      out[(r + 1) * kColumns + c] = acc[mt][pi][1];
      out[r * kColumns + c + 1] = acc[mt][pi][2];
      out[(r + 1) * kColumns + c + 1] = acc[mt][pi][3];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTile; i += kThreads) {
    float sum = 0.f;
#pragma unroll
    for (int q = 0; q < kKLanes; ++q) sum += partial[q * kTile + i];
    const int m = i / kColumns, col = col_base + i % kColumns;
    if (splits == 1) {
      if (m < m_rows && col < n) y[int64_t(m) * n + col] = from_float<T>(sum);
    } else {
      partial[i] = sum;  // read by the whole cluster below (only this thread touches i)
    }
  }
  if (splits == 1) return;
  add_across_cluster<float>(
      partial, kTile,
      [&](int i) { return i / kColumns < m_rows && col_base + i % kColumns < n ? i : -1; },
      [&](int i, float sum) {
        y[int64_t(i / kColumns) * n + col_base + i % kColumns] = from_float<T>(sum);
      });
}

}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_CUDA_STAGED_GEMM_CUH_
