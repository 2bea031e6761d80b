// Fused y = x · dequant(W) for 33 to 64 rows of x with 2:4 sparse int4 weights
// (docs/formats.md, "2:4 sparse int4"): the fragments of the direct kernel
// (gemm_sparse_small_m.cu, read its header first), fed through shared memory
// as in the dense mid-M kernel (gemm_mid_m.cu).
//
// Why a second kernel: the direct kernel's CTA owns 32 columns and reads all
// of x from L2, and it has no more than 4 M tiles (32 rows) of registers: at
// 32 rows that is already 243 MB of x against 46 MB of weights on the
// 4096 x 28672 layer (docs/perf.md).
//  * A CTA owns 256 columns (eight 32-column strips) and a range of K. x is
//    staged in shared memory once per CTA and read by all eight strips: x
//    traffic from L2 falls 8x. At 64 rows x still is 1.3x the weight bytes
//    per CTA (2 bytes per row and K row against 256 * 3/8), which is why the
//    CTA is as wide as shared memory allows rather than the dense kernel's 128.
//  * Each 128-row stage of K (codes, metadata, scales, offsets, x) arrives by
//    cp.async in a ring of up to 8 stages sized to the device's shared memory
//    at launch: 60-84 KB of weights in flight per SM without holding
//    registers.
//  * 16 warps: warp (strip s, k lane q) takes step q of every stage (a step is
//    4 code word rows = 64 rows of K) for its strip, with the direct kernel's
//    mapping: lane (g, t) owns columns 4g .. 4g+3 of the strip and word row
//    4 step + t, MMA rows g, g + 8 are columns 4g + 2p, + 1, and the selector
//    h MMA reads quads 2h, 2h + 1 of the words. 16 warps (not the dense
//    kernel's 8) because a stage barrier waits for the slowest warp and two
//    warps per scheduler left the dense kernel's loads, conversions and MMAs
//    serialized (docs/perf.md); the 64-row form fits 128 registers a lane.
//  * x in shared memory is reordered at pair granularity (4-byte cp.async) so
//    that each lane's B registers are contiguous: one 16-byte load per M tile
//    and MMA instead of four 32-bit ones (see x_position).
//  * K is split across the CTAs of a thread-block cluster (sm_90) for layers
//    too narrow to fill the GPU; partial sums meet in distributed shared
//    memory in rank order (staged_gemm.cuh): deterministic, no workspace.
// Requires N % 4 == 0, K % 64 == 0, power-of-two groups of at least 32 rows
// (the handler checks), 33 <= M <= 64 (fewer rows run the direct kernel;
// on sm_90 the sparse wgmma kernel, gemm_large_m.cu, takes every M above 16
// when N % 8 == 0).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/gemm_args.h"
#include "cuda/mma_fragments.cuh"
#include "cuda/staged_gemm.cuh"
#include "format.h"

namespace jax_lowbit {
namespace {

constexpr int kStrips = 8;                  // 32-column strips per CTA
constexpr int kColumns = 32 * kStrips;      // columns per CTA
constexpr int kKLanes = 2;                  // warps per strip, one step of each stage each
constexpr int kThreads = 32 * kStrips * kKLanes;
constexpr int kStepRows = kSparseKMultiple;                 // 64 rows of K: 4 code word rows
constexpr int kStageRows = kKLanes * kStepRows;             // 128
constexpr int kWordRows = kStageRows / kSparseRowsPerWord;  // code (and metadata) rows per stage
constexpr int kMaxScaleRows = kStageRows / 32;              // groups are at least 32 rows
constexpr int kMaxRing = 8;  // stages in the ring, at most (fewer where shared memory is short)
// Fewer rows of K per CTA and the pipeline's fill (one DRAM round trip)
// dominates the CTA's time.
constexpr int kMinRowsPerSplit = 4 * kStageRows;

// 33 to 64 rows: eight 8-row M tiles, 128 registers a lane, one CTA an SM.
constexpr int kMTiles = 8;
constexpr int kCtasPerSm = 1;

template <typename T>
struct SparseMidParams : StagedParams<T> {
  const uint16_t* metadata;  // (K / 16, N), as the codes
  int ring;                  // stages in the ring, 2 .. kMaxRing
};

// The byte layout of one stage of the ring.
struct Stage {
  static constexpr int kRows = 8 * kMTiles;
  static constexpr int kCodeRowBytes = kColumns * 4;
  static constexpr int kMetaRowBytes = kColumns * 2;
  // An odd number of 16-byte chunks: x rows g and g + 1, read by one quarter
  // warp, then start in the other half of the banks (see compute_step).
  static constexpr int kXRowBytes = kStageRows * 2 + 16;
  // 68 8-byte units: scale rows 0..3, read by one half warp with g = 0..3,
  // fall on distinct banks (4 r + g mod 16) where 64 units put them on one.
  static constexpr int kScaleRowBytes = kColumns * 2 + 32;
  static constexpr int kMetaOffset = kWordRows * kCodeRowBytes;
  static constexpr int kXOffset = kMetaOffset + kWordRows * kMetaRowBytes;
  static constexpr int kScaleOffset = kXOffset + kRows * kXRowBytes;
  static constexpr int kOffsetOffset = kScaleOffset + kMaxScaleRows * kScaleRowBytes;
  static constexpr int kBytes = kOffsetOffset + kMaxScaleRows * kScaleRowBytes;
  // The epilogue's partial sums reuse the ring.
  static constexpr int kReductionBytes = kKLanes * kRows * kColumns * 4;
  static_assert(kBytes % 16 == 0 && kXOffset % 16 == 0 && kScaleOffset % 16 == 0,
                "16-byte copies and loads need 16-byte aligned parts");
};

// 8-byte unit u (4 columns) of metadata row r is stored at unit u ^ 4(r % 4):
// the 16 lanes of a half warp (g = 0..3, t = 0..3, metadata row t) then read
// 16 distinct units of a 128-byte window, where unswizzled the four rows (512
// bytes apart) hit the same banks. Units 2c and 2c + 1 stay one 16-byte chunk.
__device__ __forceinline__ int swizzled_metadata_unit(int unit, int row) {
  return unit ^ (4 * (row & 3));
}

// Where pair `pair` of a row of x (rows 2 pair, 2 pair + 1 of the stage) is
// stored, in 4-byte units. Lane t's B registers of a step are rows
// 16 (t >> 1) + 2 (t & 1) + 8h + {0, 32, 4, 36} (gemm_sparse_small_m.cu): in
// pairs of the step, P(t) + 4h + {0, 16, 2, 18} with P(t) = 8 (t >> 1) +
// (t & 1). No two pairs of a lane are adjacent, so no copy of 8 or 16 bytes
// can put them together; 4-byte copies store lane t's eight pairs of a step
// at units 8t .. 8t + 7 in register order, MMA h = 0 first: pair bits
// b4 b3 b2 b1 b0 give t = 2 b3 + b0, h = b2 and register i = 2 b1 + b4.
__device__ __forceinline__ int x_position(int pair) {
  const int step = pair / 32, q = pair % 32;
  const int t = 2 * ((q >> 3) & 1) + (q & 1);
  const int h = (q >> 2) & 1;
  const int i = 2 * ((q >> 1) & 1) + ((q >> 4) & 1);
  return 32 * step + 8 * t + 4 * h + i;
}

template <typename T, bool kSymmetric>
__device__ __forceinline__ void load_stage(char* stage, const SparseMidParams<T>& p,
                                           int stage_index, int col_base) {
  const int k0 = stage_index * kStageRows;
  const int word_row0 = k0 / kSparseRowsPerWord;
  const int word_rows = p.k / kSparseRowsPerWord;
  // Codes (16 bytes) and metadata (8 bytes, all a row of N*2 bytes is aligned
  // to) of 4 columns: one copy of each per thread, no loop.
  static_assert(kWordRows * (kColumns / 4) == kThreads, "one code copy per thread");
  {
    const int r = threadIdx.x / (kColumns / 4), c = threadIdx.x % (kColumns / 4);
    const int col = col_base + 4 * c;
    const bool ok = word_row0 + r < word_rows && col < p.n;
    const int64_t at = int64_t(word_row0 + r) * p.n + col;
    copy16_async(stage + r * Stage::kCodeRowBytes + 16 * swizzled_chunk(c, r),
                 ok ? p.codes + at : p.codes, ok);
    copy8_async(
        stage + Stage::kMetaOffset + r * Stage::kMetaRowBytes + 8 * swizzled_metadata_unit(c, r),
        ok ? p.metadata + at : p.metadata, ok);
  }
  // x: thread i copies pair i % 64 of rows i / 64 + 8u, u < kMTiles, so the
  // pair's place in the reordered row is computed once; a warp reads 128
  // contiguous bytes of one row. Only the M rows that exist: rows of an M
  // tile past M are never written, since an MMA's B column (a row of x)
  // reaches only its own output column (that row of y, not stored), so
  // whatever the slot holds is harmless and the copies are saved.
  constexpr int kPairs = kStageRows / 2;
  constexpr int kRowStride = kThreads / kPairs;
  static_assert(kRowStride * kMTiles == Stage::kRows, "every row of the tiles has a thread");
  const int pair = threadIdx.x % kPairs, row0 = threadIdx.x / kPairs;
  const int kk = k0 + 2 * pair;
  const bool k_ok = kk < p.k;  // K is a multiple of 64, not of 128
  char* x_dst = stage + Stage::kXOffset + row0 * Stage::kXRowBytes + 4 * x_position(pair);
  const T* x_src = p.x + int64_t(row0) * p.k + kk;
#pragma unroll
  for (int u = 0; u < kMTiles; ++u) {
    if (row0 + kRowStride * u < p.m) {
      copy4_async(x_dst + u * kRowStride * Stage::kXRowBytes,
                  k_ok ? x_src + int64_t(u) * kRowStride * p.k : p.x, k_ok);
    }
  }
  copy_stage_scales<T, kSymmetric, kColumns, kThreads, kStageRows>(
      stage + Stage::kScaleOffset, stage + Stage::kOffsetOffset, Stage::kScaleRowBytes, p.scales,
      p.offsets, k0, p.group_shift, p.groups, p.n, col_base);
}

// The MMAs with sparsity selector kH of one step, every M tile. x_lane is the
// lane's 32 bytes of x row g of the step; tile mt is 8 rows further.
template <typename T, bool kSymmetric, int kH>
__device__ __forceinline__ void mma_half(float (&acc)[kMTiles][2][4], const char* x_lane,
                                         const uint32_t (&word)[4], const uint32_t (&scale)[4],
                                         const uint32_t (&offset)[4], const uint32_t (&meta)[2]) {
  using Dq = Dequantizer<T, kSparseBits, kSymmetric>;
  uint32_t a[2][4];
  Dq::fragment(a[0], word, scale, offset, 0, kH);
  Dq::fragment(a[1], word, scale, offset, 1, kH);
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    // x rows g and g + 1 (lanes 4g + t of a quarter warp) are an odd number
    // of 16-byte chunks apart, lanes t 32 bytes apart: 8 distinct chunks of
    // the banks, no conflict.
    const uint4 v =
        *reinterpret_cast<const uint4*>(x_lane + mt * 8 * Stage::kXRowBytes + 16 * kH);
    const uint32_t b[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int p = 0; p < 2; ++p) Activation<T>::template mma_sp<kH>(acc[mt][p], a[p], b, meta[p]);
  }
}

// One step (4 code word rows, 64 rows of K) of a stage for the lane's strip.
template <typename T, bool kSymmetric>
__device__ __forceinline__ void compute_step(const char* stage, int step, int group_shift,
                                             int strip, int g, int t, bool col_ok,
                                             float (&acc)[kMTiles][2][4]) {
  const int r = 4 * step + t;  // the lane's code word and metadata row in the stage
  const int unit = 8 * strip + g;  // its 4 columns, in 16-byte code / 8-byte metadata units
  const uint4 w = *reinterpret_cast<const uint4*>(stage + r * Stage::kCodeRowBytes +
                                                  16 * swizzled_chunk(unit, r));
  const uint2 e = *reinterpret_cast<const uint2*>(
      stage + Stage::kMetaOffset + r * Stage::kMetaRowBytes + 8 * swizzled_metadata_unit(unit, r));
  const int scale_row = group_shift >= 7 ? 0 : (r * kSparseRowsPerWord) >> group_shift;
  uint32_t scale[4], offset[4];
  staged_scales<kSymmetric>(stage + Stage::kScaleOffset, stage + Stage::kOffsetOffset,
                            Stage::kScaleRowBytes, scale_row, unit, scale, offset);
  const uint32_t word[4] = {w.x, w.y, w.z, w.w};
  // Past N the copies filled zeros: zero codes and scales give zero weights,
  // but the metadata must still be valid nibbles for mma.sp.
  const uint32_t meta[2] = {col_ok ? e.x : kNoMetadata, col_ok ? e.y : kNoMetadata};
  const char* x_lane = stage + Stage::kXOffset + g * Stage::kXRowBytes + 128 * step + 32 * t;
  mma_half<T, kSymmetric, 0>(acc, x_lane, word, scale, offset, meta);
  mma_half<T, kSymmetric, 1>(acc, x_lane, word, scale, offset, meta);
}

// cp.async.wait_group takes an immediate; the ring's depth is chosen at launch.
__device__ __forceinline__ void wait_all_but(int pending) {
  switch (pending) {
    case 0: wait_async<0>(); break;
    case 1: wait_async<1>(); break;
    case 2: wait_async<2>(); break;
    case 3: wait_async<3>(); break;
    case 4: wait_async<4>(); break;
    case 5: wait_async<5>(); break;
    default: wait_async<6>(); break;  // kMaxRing - 2

  }
}

template <typename T, bool kSymmetric>
__global__ void __launch_bounds__(kThreads, kCtasPerSm)
    gemm_sparse_mid_m_kernel(SparseMidParams<T> p) {
  extern __shared__ __align__(16) char smem[];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int strip = warp % kStrips, k_lane = warp / kStrips;
  const int g = lane / 4, t = lane % 4;
  const int col_base = blockIdx.x * kColumns;
  const bool col_ok = col_base + 32 * strip + 4 * g < p.n;
  const int splits = gridDim.y;
  const int stages = (p.k + kStageRows - 1) / kStageRows;
  const int steps = p.k / kStepRows;
  const int begin = int(int64_t(stages) * blockIdx.y / splits);
  const int end = int(int64_t(stages) * (blockIdx.y + 1) / splits);
  const int ring = p.ring;

  float acc[kMTiles][2][4] = {};
  // Ring: stage j lives in slot (j - begin) % ring. Every iteration commits
  // one group (empty past the end), so "all but the newest ring - 2 groups"
  // is always "up to stage j".
  for (int i = 0; i < ring - 1; ++i) {
    if (begin + i < end) {
      load_stage<T, kSymmetric>(smem + i * Stage::kBytes, p, begin + i, col_base);
    }
    commit_async();
  }
  int slot = 0;
  for (int j = begin; j < end; ++j) {
    wait_all_but(ring - 2);
    __syncthreads();  // stage j is visible, and every warp is done with slot j - 1
    const int next = j + ring - 1;
    const int free_slot = slot == 0 ? ring - 1 : slot - 1;  // slot of stage j - 1
    if (next < end) {
      load_stage<T, kSymmetric>(smem + free_slot * Stage::kBytes, p, next, col_base);
    }
    commit_async();
    // K is a multiple of 64, not of 128: the last stage may hold one step.
    if (j * kKLanes + k_lane < steps) {
      compute_step<T, kSymmetric>(smem + slot * Stage::kBytes, k_lane, p.group_shift, strip,
                                           g, t, col_ok, acc);
    }
    slot = slot + 1 == ring ? 0 : slot + 1;
  }
  store_split_k<T, kMTiles, kColumns, kKLanes, kThreads>(acc, smem, strip, k_lane, p.y, p.m, p.n,
                                                         col_base);
}

// The deepest ring of `stage_bytes` stages that lets kCtasPerSm CTAs share
// an SM on this device (227 KB a CTA on the H100, 163 KB on the A100), or 0.
inline int ring_stages(int device, int stage_bytes, int ctas_per_sm) {
  int per_block = 0, per_sm = 0, reserved = 0;
  if (cudaDeviceGetAttribute(&per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
          cudaSuccess ||
      cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device) !=
          cudaSuccess ||
      cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, device) !=
          cudaSuccess) {
    return 0;
  }
  const int bytes = std::min(per_block, per_sm / ctas_per_sm - reserved);
  return std::min(kMaxRing, bytes / stage_bytes);
}

template <typename T, bool kSymmetric>
cudaError_t launch(const GemmArgs& args, const uint16_t* metadata, cudaStream_t stream) {
  constexpr auto kernel = gemm_sparse_mid_m_kernel<T, kSymmetric>;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const int ring = ring_stages(device, Stage::kBytes, kCtasPerSm);
  if (ring < 2) return cudaErrorInvalidConfiguration;  // no device has this little
  const int shared_bytes = std::max(ring * Stage::kBytes, Stage::kReductionBytes);
  err = allow_shared_memory<kernel>(device, shared_bytes);
  if (err != cudaSuccess) return err;
  const int column_ctas = (args.n + kColumns - 1) / kColumns;
  const int splits = choose_splits<kernel>(device, column_ctas,
                                           std::max(1, args.k / kMinRowsPerSplit), kThreads,
                                           shared_bytes);

  const SparseMidParams<T> params{staged_params<T>(args), metadata, ring};
  const ClusterLaunch launch(dim3(column_ctas, splits), kThreads, shared_bytes, stream);
  err = cudaLaunchKernelEx(&launch.config, kernel, params);
  return err != cudaSuccess ? err : cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_gemm_sparse_mid_m(const GemmArgs& args, const uint16_t* metadata,
                                     bool symmetric, cudaStream_t stream) {
  return symmetric ? launch<T, true>(args, metadata, stream)
                   : launch<T, false>(args, metadata, stream);
}

template cudaError_t launch_gemm_sparse_mid_m<__nv_bfloat16>(const GemmArgs&, const uint16_t*,
                                                             bool, cudaStream_t);
template cudaError_t launch_gemm_sparse_mid_m<__half>(const GemmArgs&, const uint16_t*, bool,
                                                      cudaStream_t);

}  // namespace jax_lowbit
