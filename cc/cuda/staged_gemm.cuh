// What the GEMM kernels that stage their operands in shared memory
// (gemm_mid_m.cu, dense codes, and gemm_sparse_mid_m.cu, 2:4 sparse codes)
// share: the cp.async copies of the ring, the bank swizzle of code rows, the
// deterministic split-K epilogue (warps of a CTA, then CTAs of a thread-block
// cluster through distributed shared memory) and, on the host, the cluster
// launch and the choice of the K split.
#ifndef JAX_LOWBIT_CUDA_STAGED_GEMM_CUH_
#define JAX_LOWBIT_CUDA_STAGED_GEMM_CUH_

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "cuda/convert.cuh"
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

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// A source size of 0 fills the bytes with zeros (past K, N or M). No L2
// evict-first hint on the codes: with one (createpolicy + cache_hint), ptxas
// 13.0 gave the 64-row dense kernel a copy whose descriptor register was never
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
template <int kPending>
__device__ __forceinline__ void wait_async() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
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
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Each CTA of the cluster finishes an equal share of the tile, adding the
  // CTAs' sums in rank order.
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  const int rank = int(cluster.block_rank());
  const int first = kTile * rank / splits, last = kTile * (rank + 1) / splits;
  for (int i = first + threadIdx.x; i < last; i += kThreads) {
    const int m = i / kColumns, col = col_base + i % kColumns;
    if (m < m_rows && col < n) {
      float sum = 0.f;
      for (int other = 0; other < splits; ++other) sum += cluster.map_shared_rank(partial, other)[i];
      y[int64_t(m) * n + col] = from_float<T>(sum);
    }
  }
  cluster.sync();  // the other CTAs' shared memory must outlive the reads
#else
  __trap();  // the launchers split K only on devices with clusters
#endif
}

// --- host ---------------------------------------------------------------------------

constexpr int kMaxDevices = 64;
constexpr int kMaxSplits = 8;  // the portable cluster size

// A launch of `grid`, whose gridDim.y CTAs along K form one cluster.
struct ClusterLaunch {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute cluster = {};
  ClusterLaunch(dim3 grid, int threads, int shared_bytes, cudaStream_t stream) {
    config.gridDim = grid;
    config.blockDim = dim3(threads);
    config.dynamicSmemBytes = shared_bytes;
    config.stream = stream;
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = 1;
    cluster.val.clusterDim.y = grid.y;
    cluster.val.clusterDim.z = 1;
    config.attrs = &cluster;
    config.numAttrs = grid.y > 1 ? 1 : 0;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;  // config points at cluster
};

// More than 48 KB of dynamic shared memory must be asked for, once per kernel
// and device (the bytes a kernel asks for never change on one device).
template <auto kKernel>
cudaError_t opt_in_shared_bytes(int device, int shared_bytes) {
  static std::atomic<bool> opted_in[kMaxDevices];
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  if (opted_in[device].load(std::memory_order_relaxed)) return cudaSuccess;
  const cudaError_t err =
      cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes);
  if (err == cudaSuccess) opted_in[device].store(true, std::memory_order_relaxed);
  return err;
}

// How many CTAs of kKernel run at once with clusters of `splits` CTAs, per
// device (clusters must fit in one GPC, so with clusters this is below the
// CTAs per SM times the SM count).
// Cached per kernel: the occupancy query is not free and the answer never
// changes.
template <auto kKernel>
int concurrent_ctas(int device, int splits, int threads, int shared_bytes) {
  static std::atomic<int> cache[kMaxDevices][kMaxSplits + 1];
  if (device < 0 || device >= kMaxDevices) return 0;
  int known = cache[device][splits].load(std::memory_order_relaxed);
  if (known != 0) return known;
  int clusters = 0;
  cudaError_t err;
  if (splits == 1) {  // no cluster: CTAs per SM times SMs
    int sms = 0;
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess) {
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&clusters, kKernel, threads,
                                                          shared_bytes);
    }
    clusters *= sms;
  } else {
    const ClusterLaunch launch(dim3(1, splits), threads, shared_bytes, nullptr);
    err = cudaOccupancyMaxActiveClusters(&clusters, kKernel, &launch.config);
  }
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it: this split is simply not used
    clusters = 0;
  }
  known = clusters > 0 ? clusters * splits : -1;  // -1 caches "cannot run"
  cache[device][splits].store(known, std::memory_order_relaxed);
  return known;
}

// The split of K (at most max_splits) that finishes soonest: waves of CTAs
// over the concurrent CTAs, each wave 1/splits of K long; ties keep fewer
// splits (less reduction). 1 without clusters (before sm_90).
template <auto kKernel>
int choose_splits(int device, int column_ctas, int max_splits, int threads, int shared_bytes) {
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  const int unsplit = concurrent_ctas<kKernel>(device, 1, threads, shared_bytes);
  if (major < 9 || unsplit <= 0) return 1;
  max_splits = std::min(max_splits, kMaxSplits);
  int best = 1;
  double best_time = double((column_ctas + unsplit - 1) / unsplit);
  for (int s = 2; s <= max_splits; ++s) {
    const int concurrent = concurrent_ctas<kKernel>(device, s, threads, shared_bytes);
    if (concurrent <= 0) continue;
    const double time = double((column_ctas * s + concurrent - 1) / concurrent) / s;
    if (time < best_time - 1e-9) {
      best = s;
      best_time = time;
    }
  }
  return best;
}

}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_CUDA_STAGED_GEMM_CUH_
