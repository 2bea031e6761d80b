// Splitting K across the CTAs of a thread-block cluster (sm_90): on the host
// the launch with the cluster attribute, how many CTAs run at once for a
// split, and which split finishes soonest; on the device the sum of the CTAs'
// partial results through distributed shared memory, so a split needs no
// workspace and no second kernel (gemm_mid_m.cu, gemm_large_m.cu;
// int_gemm_small_m.cu takes only the count of CTAs that run at once).
#ifndef JAX_LOWBIT_CUDA_CLUSTER_SPLIT_CUH_
#define JAX_LOWBIT_CUDA_CLUSTER_SPLIT_CUH_

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>

#include "cuda/kernel_attributes.h"

namespace jax_lowbit {

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

// How many CTAs of kKernel run at once per device with clusters of `splits`
// CTAs (clusters must fit in one GPC, so this can be below the SM count times
// the CTAs per SM); `splits` 1 is plain occupancy. Cached per kernel (the
// template argument) and device: the query is not free and never changes.
template <auto kKernel>
int concurrent_ctas(int device, int splits, int threads, int shared_bytes) {
  static std::atomic<int> cache[kMaxDevices][kMaxSplits + 1];
  if (device < 0 || device >= kMaxDevices) return 0;
  int known = cache[device][splits].load(std::memory_order_relaxed);
  if (known != 0) return known;
  int count = 0;
  if (splits == 1) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&count, kKernel, threads, shared_bytes) !=
            cudaSuccess) {
      cudaGetLastError();
      count = 0;
    }
    count *= sms;
  } else {
    const ClusterLaunch launch(dim3(1, splits), threads, shared_bytes, nullptr);
    if (cudaOccupancyMaxActiveClusters(&count, kKernel, &launch.config) != cudaSuccess) {
      cudaGetLastError();  // clear it: this split is simply not used
      count = 0;
    }
    count *= splits;
  }
  known = count > 0 ? count : -1;  // -1 caches "cannot run"
  cache[device][splits].store(known, std::memory_order_relaxed);
  return known;
}

// The split of K (1 to max_splits, at most kMaxSplits) that finishes
// soonest: waves of CTAs over the concurrent CTAs, each wave 1/splits of K
// long plus `fixed_share` (a CTA's cost beyond its share of K, as a
// fraction of all of K); ties keep fewer splits (less reduction). 1 below
// sm_90 (no clusters).
template <auto kKernel>
int choose_splits(int device, int column_ctas, int max_splits, int threads, int shared_bytes,
                  double fixed_share = 0.0) {
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (major < 9) return 1;
  max_splits = std::min(kMaxSplits, max_splits);
  const int single = concurrent_ctas<kKernel>(device, 1, threads, shared_bytes);
  if (single <= 0) return 1;
  int best = 1;
  double best_time = double((column_ctas + single - 1) / single) * (1.0 + fixed_share);
  for (int s = 2; s <= max_splits; ++s) {
    const int concurrent = concurrent_ctas<kKernel>(device, s, threads, shared_bytes);
    if (concurrent <= 0) continue;
    const double time =
        double((column_ctas * s + concurrent - 1) / concurrent) * (1.0 / s + fixed_share);
    if (time < best_time - 1e-9) {
      best = s;
      best_time = time;
    }
  }
  return best;
}

// Device side, called by every CTA of a cluster of K splits once its partial
// results are in `shared`: each CTA finishes an equal share of the
// `elements`, adding the CTAs' values in rank order (as T) and passing the
// sum to finish(i, sum); index(i) is element i's place in `shared`, or -1 to
// skip it. Shared memory stays alive until every CTA has read it.
template <typename T, typename S, typename Index, typename Finish>
__device__ __forceinline__ void add_across_cluster(S* shared, int elements, Index index,
                                                   Finish finish) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  const int splits = int(cluster.num_blocks());
  const int rank = int(cluster.block_rank());
  const int first = elements * rank / splits, last = elements * (rank + 1) / splits;
  for (int i = first + int(threadIdx.x); i < last; i += int(blockDim.x)) {
    const int at = index(i);
    if (at < 0) continue;
    T sum = 0;
    for (int other = 0; other < splits; ++other) {
      sum += static_cast<T>(cluster.map_shared_rank(shared, other)[at]);
    }
    finish(i, sum);
  }
  cluster.sync();
#else
  __trap();  // the launchers split K only on devices with clusters
#endif
}

}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_CUDA_CLUSTER_SPLIT_CUH_
