// The epilogue of a K split for the wgmma kernels (gemm_large_m.cu,
// act_quant_gemm_large_m.cu): the CTAs of a cluster each hold partial sums of
// the same tile, in the wgmma accumulator layout of two warpgroups, and add
// them through distributed shared memory (no workspace, no second kernel).
#ifndef JAX_LOWBIT_CUDA_WGMMA_SPLIT_CUH_
#define JAX_LOWBIT_CUDA_WGMMA_SPLIT_CUH_

#include <cooperative_groups.h>

#include <cstdint>

#include "cuda/cluster_split.cuh"

namespace jax_lowbit {

// Partials are f32 (summed with float rounding, in rank order, so the result
// does not depend on which CTA adds) or s32 (summed modulo 2^32: exact, as
// the spec's integer sums).
__device__ __forceinline__ float split_add(float a, float b) { return a + b; }
__device__ __forceinline__ int32_t split_add(int32_t a, int32_t b) {
  return static_cast<int32_t>(static_cast<uint32_t>(a) + static_cast<uint32_t>(b));
}

template <typename V>
struct alignas(8) SplitPair {
  V v[2];
};
template <typename V>
struct alignas(16) SplitQuad {
  V v[4];
};

// Partials are rows of 128 columns padded to this stride: a warp's 8-byte
// writes below then take two wavefronts, the least. The ring of a kernel must
// hold split_bytes(rows) below its barriers.
constexpr int kSplitStride = 128 + 8;
constexpr int split_bytes(int rows) { return rows * kSplitStride * 4; }

// For each column block b (one m64 wgmma per warpgroup, so 128 columns: the
// "local" column of a lane's MMA rows g and g + 8 is `local` and local + 1),
// every CTA writes its partials (kRows x 128) over its ring, then each CTA
// adds an equal share of them across the cluster and passes each sum of four
// adjacent columns to finish(b, row, column, sums) (row < rows, column a
// multiple of 4, both relative to the tile). The accumulators are those of
// threads 0 .. kThreads - 1; threads past them (a producer warp) only join
// the barriers. A distributed shared memory load
// takes a few hundred cycles: a thread adds four columns at a time and issues
// the loads of two such quads from every CTA before it adds (one float at a
// time, this epilogue cost about 20 us a CTA, docs/perf.md).
template <int kThreads, int kBlocks, int kAccumulators, typename V, typename Finish>
__device__ __forceinline__ void add_split_partials(const V (&acc)[kBlocks][kAccumulators],
                                                   char* smem, int rows, int local,
                                                   Finish&& finish) {
  namespace cg = cooperative_groups;
  constexpr int kRows = 2 * kAccumulators;  // a lane's accumulators cover half the rows
  constexpr int kWidth = 128;         // columns of a round: block b of both warpgroups
  constexpr int kQuads = kWidth / 4;  // per row
  constexpr int kBatch = 2;           // quads per thread whose loads are in flight together
  cg::cluster_group cluster = cg::this_cluster();
  const int splits = int(cluster.num_blocks()), rank = int(cluster.block_rank());
  // This CTA adds quads [first, last) of the rows below M.
  const int quads = rows * kQuads;
  const int first = quads * rank / splits, last = quads * (rank + 1) / splits;
  V* partial = reinterpret_cast<V*>(smem);
  const bool adds = threadIdx.x < kThreads;
  __syncthreads();  // no warp still reads its last stage (no loads are in flight)
#pragma unroll
  for (int b = 0; b < kBlocks; ++b) {
    // Accumulators 4q + h and 4q + 2 + h: MMA rows g and g + 8 (columns local,
    // local + 1) at MMA column (tile row) 8q + 2t + h.
    const int t = threadIdx.x % 4;
#pragma unroll
    for (int i = 0; i < (adds ? kRows / 2 : 0); i += 4) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = 8 * (i / 4) + 2 * t + h;
        *reinterpret_cast<SplitPair<V>*>(partial + m * kSplitStride + local) =
            SplitPair<V>{{acc[b][i + h], acc[b][i + 2 + h]}};
      }
    }
    cluster.sync();  // every CTA's partials are written
    for (int q0 = first + int(threadIdx.x); adds && q0 < last; q0 += kBatch * kThreads) {
      SplitQuad<V> part[kBatch][kMaxSplits];
#pragma unroll
      for (int e = 0; e < kBatch; ++e) {
        const int q = q0 + e * kThreads;
        const int at = q / kQuads * kSplitStride + q % kQuads * 4;
#pragma unroll
        for (int r = 0; r < kMaxSplits; ++r) {
          if (q < last && r < splits) {
            part[e][r] =
                *reinterpret_cast<const SplitQuad<V>*>(cluster.map_shared_rank(partial, r) + at);
          }
        }
      }
#pragma unroll
      for (int e = 0; e < kBatch; ++e) {
        const int q = q0 + e * kThreads;
        if (q >= last) continue;
        SplitQuad<V> sum = part[e][0];
#pragma unroll
        for (int r = 1; r < kMaxSplits; ++r) {
          if (r < splits) {
#pragma unroll
            for (int c = 0; c < 4; ++c) sum.v[c] = split_add(sum.v[c], part[e][r].v[c]);
          }
        }
        finish(b, q / kQuads, q % kQuads * 4, sum.v);
      }
    }
    cluster.sync();  // every CTA is done reading before the next round's writes
  }
}

}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_CUDA_WGMMA_SPLIT_CUH_
