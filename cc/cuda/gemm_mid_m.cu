// Fused y = x · dequant(W) for 33 to 64 rows: the small-M kernel's fragments
// (gemm_small_m.cu, mma_fragments.cuh), fed through shared memory.
//
// Why a second kernel: the small-M kernel's CTA owns 32 columns and reads all
// of x, so x costs M*K*2 bytes per 32 columns against 32*K*bits/8 bytes of
// codes: at M = 32 with int4 four times the code bytes (235 MB from L2 for
// the 4096 x 28672 layer), and each lane has one 16-byte code load in flight.
//  * A CTA owns 128 columns (four 32-column strips) and a range of K. x is
//    staged in shared memory once per CTA and read by all four strips, so x
//    traffic falls 4x.
//  * Each 256-row stage of K (codes, scales, offsets, x) arrives by cp.async
//    in a ring of 3 stages: 2 stages of codes (32 KB for int4) are in flight
//    per SM without holding registers, which go to the accumulators instead.
//  * 8 warps: warp (strip s, k lane q) takes steps q, q + 2, ... of every
//    stage (a step is 4 word rows) for its strip, with the small-M kernel's
//    fragment mapping: lane (g, t) owns columns 4g .. 4g+3 of the strip and
//    word row 4*step + t; x row m = 8*tile + g is the MMA's n index.
//  * A 4096-column layer has only 32 such CTAs, so K is split across the CTAs
//    of a thread-block cluster (sm_90); their partial sums meet in distributed
//    shared memory and are added in cluster-rank order: deterministic, with no
//    workspace and no second kernel. Without clusters (sm_80) K is not split.
// Requires N % 4 == 0, K % (4 * codes per word) == 0, power-of-two groups of
// at least 32 rows (the handler checks), M <= 64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/convert.cuh"
#include "cuda/gemm_args.h"
#include "cuda/mma_fragments.cuh"
#include "cuda/staged_gemm.cuh"
#include "format.h"

namespace jax_lowbit {
namespace {

constexpr int kStrips = 4;  // 32-column strips per CTA
constexpr int kColumns = 32 * kStrips;
constexpr int kStageRows = 256;                 // K rows per pipeline stage
constexpr int kMaxScaleRows = kStageRows / 32;  // groups are at least 32 rows
constexpr int kMinStagesPerSplit = 4;           // below this the prologue dominates
// 33 to 64 rows. With 16 and 32 rows (2 and 4 tiles) this kernel lost to the
// small-M kernel on the H100 (docs/perf.md), so only the 8-tile form is built.
constexpr int kMidMTiles = 8;

// Warps and the byte layout of one stage of the ring, for kMTiles tiles of
// 8 rows of x.
template <int kBits, int kMTiles>
struct MidConfig {
  static constexpr int kRows = 8 * kMTiles;
  // Warps sharing a strip and splitting its K. Eight tiles need 64
  // accumulators a lane, more than 128 registers: 8 warps (255 registers).
  static constexpr int kKLanes = 2;
  static constexpr int kWarps = kStrips * kKLanes;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kPerWord = codes_per_word(kBits);
  static constexpr int kWordRows = kStageRows / kPerWord;
  static constexpr int kCodeRowBytes = kColumns * 4;
  static constexpr int kCodeBytes = kWordRows * kCodeRowBytes;
  // A quarter warp reads two x rows (g = 2i, 2i + 1), 64 bytes each for int4
  // and four 16-byte pieces 32 bytes apart for int2; the pad puts the second
  // row in the other banks.
  static constexpr int kXRowBytes = kStageRows * 2 + (kBits == 4 ? 64 : 16);
  static constexpr int kScaleRowBytes = kColumns * 2;
  static constexpr int kXOffset = kCodeBytes;
  static constexpr int kScaleOffset = kXOffset + kRows * kXRowBytes;
  static constexpr int kOffsetOffset = kScaleOffset + kMaxScaleRows * kScaleRowBytes;
  static constexpr int kBytes = kOffsetOffset + kMaxScaleRows * kScaleRowBytes;
  // 64 rows of x leave room for three stages in 227 KB.
  static constexpr int kStages = 3;
  static constexpr int kReductionBytes = kKLanes * kRows * kColumns * 4;
  static constexpr int kSharedBytes =
      kStages * kBytes > kReductionBytes ? kStages * kBytes : kReductionBytes;
};

template <typename T, int kBits, int kMTiles, bool kSymmetric>
__device__ __forceinline__ void load_stage(char* stage, const StagedParams<T>& p, int stage_index,
                                           int col_base) {
  using L = MidConfig<kBits, kMTiles>;
  constexpr int kThreads = L::kThreads;
  const int k0 = stage_index * kStageRows;
  const int word_row0 = k0 / L::kPerWord;
  const int word_rows = p.k / L::kPerWord;
  for (int i = threadIdx.x; i < L::kWordRows * (kColumns / 4); i += kThreads) {
    const int r = i / (kColumns / 4), c = i % (kColumns / 4);
    const int col = col_base + 4 * c;
    const bool ok = word_row0 + r < word_rows && col < p.n;
    copy16_async(stage + r * L::kCodeRowBytes + 16 * swizzled_chunk(c, r),
                 ok ? p.codes + int64_t(word_row0 + r) * p.n + col : p.codes, ok);
  }
  for (int i = threadIdx.x; i < L::kRows * (kStageRows / 8); i += kThreads) {
    const int m = i / (kStageRows / 8), c = i % (kStageRows / 8);
    const int kk = k0 + 8 * c;
    const bool ok = m < p.m && kk < p.k;
    copy16_async(stage + L::kXOffset + m * L::kXRowBytes + 16 * c,
                 ok ? p.x + int64_t(m) * p.k + kk : p.x, ok);
  }
  copy_stage_scales<T, kSymmetric, kColumns, kThreads, kStageRows>(
      stage + L::kScaleOffset, stage + L::kOffsetOffset, L::kScaleRowBytes, p.scales, p.offsets,
      k0, p.group_shift, p.groups, p.n, col_base);
}

template <typename T, int kBits, int kMTiles, bool kSymmetric>
__device__ __forceinline__ void compute_stage(const char* stage, int group_shift, int strip,
                                              int k_lane, int g, int t,
                                              float (&acc)[kMTiles][2][4]) {
  using Act = Activation<T>;
  using Pair = typename Act::Pair;
  using Dq = Dequantizer<T, kBits, kSymmetric>;
  using L = MidConfig<kBits, kMTiles>;
  constexpr int kHalves = L::kPerWord / 4;  // MMA k16 steps per word
  constexpr int kXVectors = L::kPerWord / 8;  // 16-byte x loads per word
  constexpr int kStepsPerWarp = L::kWordRows / 4 / L::kKLanes;
#pragma unroll
  for (int u = 0; u < kStepsPerWarp; ++u) {
    const int r = 4 * (k_lane + L::kKLanes * u) + t;  // this lane's word row in the stage
    const uint4 w = *reinterpret_cast<const uint4*>(stage + r * L::kCodeRowBytes +
                                                     16 * swizzled_chunk(8 * strip + g, r));
    const int scale_row = group_shift >= 8 ? 0 : (r * L::kPerWord) >> group_shift;
    uint32_t scale[4], offset[4];
    staged_scales<kSymmetric>(stage + L::kScaleOffset, stage + L::kOffsetOffset,
                              L::kScaleRowBytes, scale_row, 8 * strip + g, scale, offset);
    const uint32_t word[4] = {w.x, w.y, w.z, w.w};
    // Columns 2p and 2p + 1 of the lane's four are MMA rows g and g + 8.
    uint32_t a[2][kHalves][4];
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const int ca = 2 * p, cb = 2 * p + 1;
#pragma unroll
      for (int h = 0; h < kHalves; ++h) {
        a[p][h][0] = Dq::pair(word[ca], 2 * h, as_pair<Pair>(scale[ca]), as_pair<Pair>(offset[ca]));
        a[p][h][1] = Dq::pair(word[cb], 2 * h, as_pair<Pair>(scale[cb]), as_pair<Pair>(offset[cb]));
        a[p][h][2] =
            Dq::pair(word[ca], 2 * h + 1, as_pair<Pair>(scale[ca]), as_pair<Pair>(offset[ca]));
        a[p][h][3] =
            Dq::pair(word[cb], 2 * h + 1, as_pair<Pair>(scale[cb]), as_pair<Pair>(offset[cb]));
      }
    }
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      const char* xrow = stage + L::kXOffset + (8 * mt + g) * L::kXRowBytes + 2 * L::kPerWord * r;
      uint32_t xv[4 * kXVectors];
#pragma unroll
      for (int v = 0; v < kXVectors; ++v) {
        const uint4 q = *reinterpret_cast<const uint4*>(xrow + 16 * v);
        xv[4 * v] = q.x;
        xv[4 * v + 1] = q.y;
        xv[4 * v + 2] = q.z;
        xv[4 * v + 3] = q.w;
      }
#pragma unroll
      for (int p = 0; p < 2; ++p) {
#pragma unroll
        for (int h = 0; h < kHalves; ++h) Act::mma(acc[mt][p], a[p][h], xv[2 * h], xv[2 * h + 1]);
      }
    }
  }
}

template <typename T, int kBits, int kMTiles, bool kSymmetric>
__global__ void __launch_bounds__(MidConfig<kBits, kMTiles>::kThreads, 1)
    gemm_mid_m_kernel(StagedParams<T> p) {
  using L = MidConfig<kBits, kMTiles>;
  constexpr int kThreads = L::kThreads;
  extern __shared__ __align__(16) char smem[];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int strip = warp % kStrips, k_lane = warp / kStrips;
  const int g = lane / 4, t = lane % 4;
  const int col_base = blockIdx.x * kColumns;
  const int splits = gridDim.y;
  const int stages = (p.k + kStageRows - 1) / kStageRows;
  const int begin = int(int64_t(stages) * blockIdx.y / splits);
  const int end = int(int64_t(stages) * (blockIdx.y + 1) / splits);

  float acc[kMTiles][2][4] = {};
  // Ring: stage j lives in slot (j - begin) % kStages. Every iteration commits
  // one group (empty past the end), so "all but the newest kStages - 2 groups"
  // is always "up to stage j".
#pragma unroll
  for (int i = 0; i < L::kStages - 1; ++i) {
    if (begin + i < end) {
      load_stage<T, kBits, kMTiles, kSymmetric>(smem + i * L::kBytes, p, begin + i, col_base);
    }
    commit_async();
  }
  for (int j = begin; j < end; ++j) {
    wait_async<L::kStages - 2>();
    __syncthreads();  // stage j is visible, and every warp is done with slot j - 1
    const int next = j + L::kStages - 1;
    if (next < end) {
      load_stage<T, kBits, kMTiles, kSymmetric>(smem + ((next - begin) % L::kStages) * L::kBytes,
                                              p, next, col_base);
    }
    commit_async();
    compute_stage<T, kBits, kMTiles, kSymmetric>(smem + ((j - begin) % L::kStages) * L::kBytes,
                                                 p.group_shift, strip, k_lane, g, t, acc);
  }
  store_split_k<T, kMTiles, kColumns, L::kKLanes, kThreads>(acc, smem, strip, k_lane, p.y, p.m,
                                                          p.n, col_base);
}

template <typename T, int kBits, int kMTiles, bool kSymmetric>
cudaError_t launch(const GemmArgs& args, cudaStream_t stream) {
  using L = MidConfig<kBits, kMTiles>;
  constexpr auto kernel = gemm_mid_m_kernel<T, kBits, kMTiles, kSymmetric>;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = allow_shared_memory<kernel>(device, L::kSharedBytes);
  if (err != cudaSuccess) return err;
  const int column_ctas = (args.n + kColumns - 1) / kColumns;
  const int stages = (args.k + kStageRows - 1) / kStageRows;
  const int splits = choose_splits<kernel>(device, column_ctas,
                                           std::max(1, stages / kMinStagesPerSplit),
                                           L::kThreads, L::kSharedBytes);

  const StagedParams<T> params = staged_params<T>(args);
  const ClusterLaunch launch(dim3(column_ctas, splits), L::kThreads, L::kSharedBytes, stream);
  err = cudaLaunchKernelEx(&launch.config, kernel, params);
  return err != cudaSuccess ? err : cudaGetLastError();
}

template <typename T, int kBits, int kMTiles>
cudaError_t launch_symmetry(const GemmArgs& args, bool symmetric, cudaStream_t stream) {
  return symmetric ? launch<T, kBits, kMTiles, true>(args, stream)
                   : launch<T, kBits, kMTiles, false>(args, stream);
}

}  // namespace

template <typename T>
cudaError_t launch_gemm_mid_m(const GemmArgs& args, bool symmetric, cudaStream_t stream) {
  return args.bits == 4 ? launch_symmetry<T, 4, kMidMTiles>(args, symmetric, stream)
                        : launch_symmetry<T, 2, kMidMTiles>(args, symmetric, stream);
}

template cudaError_t launch_gemm_mid_m<__nv_bfloat16>(const GemmArgs&, bool, cudaStream_t);
template cudaError_t launch_gemm_mid_m<__half>(const GemmArgs&, bool, cudaStream_t);

}  // namespace jax_lowbit
