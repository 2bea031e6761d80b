// Fused y = x · dequant(W) for large M (prefill) on Hopper: int4/int2 codes,
// bf16/fp16 activations, f32 accumulation on warpgroup MMAs (wgmma, sm_90a).
//
// At large M the work is tensor-core bound, so the weights must be
// dequantized where the tensor cores read them, never through HBM.
//  * wgmma takes A from registers and B from shared memory, so the weights
//    are A: y^T = W^T x^T. A warpgroup (4 warps) owns kBlocks blocks of 64
//    output columns; each block is the 64-row A of one m64nRk16 wgmma whose
//    B is kRows rows of x (R = kRows). A CTA is two warpgroups, so it owns
//    128 kBlocks columns and kRows rows of x: 256 x 64, 256 x 128 or
//    128 x 256 by M (see Tile).
//  * A registers are the m16n8k16 A fragment per warp (warp w of the group
//    holds MMA rows 16w .. 16w + 15): lane (g, t) holds rows g and g + 8, k
//    slots 2t, 2t + 1 (registers 0, 1) and 2t + 8, 2t + 9 (2, 3). Which
//    column an MMA row stands for is ours to choose: rows g and g + 8 are
//    the adjacent columns 16w + 2g and 16w + 2g + 1, so a lane reads both
//    columns' code words (and scales) in one load and stores outputs in pairs. B comes
//    from x in its natural order (k slot s of step j is row 16j + s of K), so
//    the lane's slots are code pair t of the word holding rows 16j .. 16j + 7
//    and of the one holding 16j + 8 .. 16j + 15 (int4), or pairs t and t + 4
//    of the word holding all 16 rows (int2). Each A register is one shift,
//    one lop3, one hsub2 and one hmul2 (hfma2 with offsets) of a code word:
//    the magic-number conversion of the small-M kernel (mma_fragments.cuh).
//  * Operands arrive by TMA (tma.cuh) in a ring of kStages stages of 64
//    rows of K: x in the wgmma 128-byte swizzle K-major layout (a stage of
//    one row of x is 128 bytes; its 16-byte chunk c goes to chunk c ^ (m %
//    8), see wgmma.cuh), the code words row by row as stored, and the rows
//    of scales (and offsets) that the stage's groups use; rows past M and
//    columns past N arrive as zeros. One thread asks for a stage's four
//    tiles and every thread waits on the stage's mbarrier: with cp.async
//    issued by every thread, the copies' address arithmetic was about a
//    third of the kernel's instructions (docs/perf.md). Lanes read their
//    words and scales from shared memory; the four lanes of a quad read the
//    same ones (a broadcast).
//  * wgmma is asynchronous: the A registers of step s + 1 are dequantized
//    (into their own register set, one of four) while the wgmmas of steps
//    s - 2 .. s run; then the warpgroup waits for step s - 2, so the set it
//    fills next (last read by step s - 3) is free. A ring slot is refilled
//    only when no wgmma in flight can read it (LargeConfig::kStages).
//  * 2:4 sparse weights (kSparse; docs/formats.md) run on sparse tensor
//    cores: one m64nRk32 wgmma.mma_async.sp per 32 rows of K takes the kept
//    values of 64 columns in the registers of the dense k16 A fragment, so a
//    step is 32 rows and dequantizes half as many weights per row of K as
//    the dense kernel. Lane (g, t) holds quad t (register 0) and quad t + 4
//    (register 2) of the step: kept pair t of word rows 2 step and 2 step +
//    1. The metadata register (wgmma.cuh) wants a word row's four quads,
//    where the stored metadata groups quad q of four word rows (for the
//    small-M kernel's lanes): each lane transposes nibbles from the stage's
//    four metadata rows. ptxas serializes all wgmma.sp of a kernel that
//    defines a metadata register while wgmmas run (warning C7513), so the
//    registers of a round of two stages are read when the warpgroup has
//    drained (wgmma::wait<0>), once per four steps; the round's CTA barrier
//    and both its stages' refills come at that drain too (one barrier a
//    round, not one a stage).
//  * CTAs are ordered with M fastest: the CTAs running at once share a few
//    column tiles, so each code word comes from DRAM about once and x (a few
//    MB) is reread from L2.
//  * Too few tiles for the SMs (narrow layers at a few hundred rows: 32
//    tiles of a 4096 x 4096 weight at M = 256) split K over a cluster of up
//    to 8 CTAs (gridDim.y): each runs its share of the stages, then the
//    partial sums are added in rank order through distributed shared memory
//    (wgmma_split.cuh), one round per block b of both warpgroups (128
//    columns) so the f32 partials (34 to 136 KB by tile) fit in the ring.
// Requires K % 64 == 0, N % 8 == 0, power-of-two groups of at least 32 rows
// (or one group), M > 0; the lowering sends other shapes to dequantize + dot.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/cluster_split.cuh"
#include "cuda/convert.cuh"
#include "cuda/dense_gemm_target.h"
#include "cuda/handlers.h"
#include "cuda/kernel_attributes.h"
#include "cuda/launch_status.h"
#include "cuda/mma_fragments.cuh"
#include "cuda/small_m.cuh"
#include "cuda/sparse_gemm_target.h"
#include "cuda/staged_gemm.cuh"
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"
#include "cuda/wgmma_split.cuh"
#include "format.h"
#include "weight_shape.h"

namespace jax_lowbit {
namespace {

namespace ffi = xla::ffi;

constexpr int kWarpGroups = 2;
constexpr int kLargeThreads = 128 * kWarpGroups;
constexpr int kStageK = 64;  // rows of K per stage
// A split of K runs at least this many stages, and costs about kFixedStages
// more (the first loads' round trip, the cluster sum): what choose_splits
// weighs against filling more SMs.
constexpr int kMinStagesPerSplit = 4;
constexpr int kFixedStages = 3;

// A CTA's tile: kBlocks m64 blocks of weight columns per warpgroup (so
// kColumns in all) and kRows rows of x, the wgmma N.
template <int kBlockCount, int kRowCount>
struct Tile {
  static constexpr int kBlocks = kBlockCount;
  static constexpr int kRows = kRowCount;
  static constexpr int kColumns = 64 * kBlocks * kWarpGroups;
};
// Above 128 rows, 128 columns x 256 rows (m64n256): a warpgroup dequantizes
// half as many weights per MMA as with 256 x 128, which made the kernel 1.25x
// faster at M = 256 to 4096 on the H100 (docs/perf.md). Fewer rows take
// 256 x 128 or 256 x 64 tiles, which waste fewer MMAs on absent rows.
using Rows64Tile = Tile<2, 64>;
using Rows128Tile = Tile<2, 128>;
using Rows256Tile = Tile<1, 256>;

// A stage's shape and shared-memory layout for dense int2/int4 codes, or
// 2:4 sparse int4 ones (kSparse: kept codes and their metadata).
template <int kBits, bool kSparse, typename TileShape>
struct LargeConfig : TileShape {
  using TileShape::kBlocks, TileShape::kColumns, TileShape::kRows;
  // Rows of K per MMA step (m64nRk16, or m64nRk32 on sparse tensor cores)
  // and per code word (8 int4 or 16 int2 codes; 8 kept codes of four quads).
  static constexpr int kStepK = kSparse ? 32 : 16;
  static constexpr int kSteps = kStageK / kStepK;
  static constexpr int kWordK = kSparse ? kSparseRowsPerWord : codes_per_word(kBits);
  static constexpr int kWordRows = kStageK / kWordK;
  // Stage layout: x (kRows rows of 128 bytes), code words (kWordRows rows of
  // kColumns), kScaleRows rows of scales and of offsets (groups have at
  // least 32 rows, so a stage touches at most two groups), then for sparse
  // weights their metadata rows (one per word row: a stage is one block of
  // four, docs/formats.md).
  static constexpr int kScaleRows = kStageK / 32;
  static constexpr int kXBytes = kRows * kStageK * 2;
  static constexpr int kCodeRowBytes = kColumns * 4;
  static constexpr int kScaleRowBytes = kColumns * 2;
  static constexpr int kMetadataRowBytes = kColumns * 2;
  static constexpr int kCodeOffset = kXBytes;
  static constexpr int kScaleOffset = kCodeOffset + kWordRows * kCodeRowBytes;
  static constexpr int kOffsetOffset = kScaleOffset + kScaleRows * kScaleRowBytes;
  static constexpr int kMetadataOffset = kOffsetOffset + kScaleRows * kScaleRowBytes;
  static constexpr int kMetadataBytes = kSparse ? kWordRows * kMetadataRowBytes : 0;
  static constexpr int kBytes = kMetadataOffset + kMetadataBytes;
  // A round: the stages whose steps use each of the kernel's four A register
  // sets once (one dense stage of four k16 steps, two sparse ones of two k32
  // steps). Stages begin a round at a time (tma::begin_ring_stages: one CTA
  // barrier, then the round's refills kAhead stages ahead).
  static constexpr int kRound = 4 / kSteps;
  // Ring slots. A dense stage begins after its stage before issued its last
  // wgmmas, while up to three groups (that stage's last three steps) run, so
  // a slot is refilled two stages after its stage began. A sparse round
  // begins once the warpgroup has drained (for its metadata registers, see
  // the kernel), so the round refills the slots of the round before.
  static constexpr int kAhead = kSparse ? 4 : 3;
  static constexpr int kStages = kSparse ? kAhead + kRound : kAhead + 2;
  // The stages' mbarriers follow the ring.
  static constexpr int kBarrierOffset = kStages * kBytes;
  static_assert(kBarrierOffset + kStages * 8 <= 227 * 1024, "the ring fits in shared memory");
  static constexpr int kSharedBytes = kBarrierOffset + kStages * 8;
  static_assert(kXBytes % 1024 == 0 && kBytes % 1024 == 0, "stages must stay 1024-byte aligned");
  // The thread that asks for each stage's tiles once the ring runs (asking
  // holds up its warp, and so its warpgroup's next wgmmas). Measured, not
  // explained (docs/perf.md v20): with the first thread of warpgroup 1
  // instead of thread 0 the suite's 2:4 weights run 3-6% faster at 256 to
  // 4096 rows (dense ones within 2.5%), but at 64 rows (the 64-row tile) both
  // run 1-4% slower.
  static constexpr int kLoader = kRows > 64 ? 128 : 0;
};

// The TMA tiles of a stage: x (kRows rows x 64 of K, swizzled), code words
// (kWordRows x kColumns), scale and offset rows (scale_rows x kColumns: two
// for 32-row groups, else one), and for sparse weights metadata rows
// (kWordRows x kColumns).
struct StageMaps {
  CUtensorMap x, codes, scales, offsets, metadata;
};

template <typename T, int kBits, bool kSymmetric, bool kSparse, typename TileShape>
__global__ void __launch_bounds__(kLargeThreads, 1)
    gemm_large_m_kernel(StagedParams<T> p, int row_tiles, const __grid_constant__ StageMaps maps) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = LargeConfig<kBits, kSparse, TileShape>;
  constexpr int kBlocks = L::kBlocks, kRows = L::kRows, kColumns = L::kColumns;
  constexpr int kStages = L::kStages;
  using Pair = typename Activation<T>::Pair;
  using Dq = Dequantizer<T, kBits, kSymmetric>;
  // Stages start 1024-byte aligned, as the swizzle pattern needs (kBytes is
  // a multiple of 1024).
  extern __shared__ __align__(1024) char smem[];

  const int group = threadIdx.x / 128;
  const int warp = threadIdx.x / 32 % 4;
  const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  // CTAs are ordered with M fastest (row_tiles row tiles per column tile).
  const int row0 = blockIdx.x % row_tiles * kRows;
  const int col0 = blockIdx.x / row_tiles * kColumns;
  // This CTA's share of the K stages (all of them without a split; the
  // launcher gives every split at least kMinStagesPerSplit).
  const int splits = int(gridDim.y);
  // (K > 0: the handler writes y = 0 itself for K = 0.)
  const int first = p.k / kStageK * int(blockIdx.y) / splits;
  const int stages = p.k / kStageK * (int(blockIdx.y) + 1) / splits - first;

  // MMA rows g and g + 8 of warp `warp` in block b are the adjacent columns
  // column[b] and column[b] + 1 (relative to col0): one 8-byte read gets both
  // code words, one 4-byte read both scales, and the epilogue stores pairs.
  int column[kBlocks];
#pragma unroll
  for (int b = 0; b < kBlocks; ++b) column[b] = (group * kBlocks + b) * 64 + 16 * warp + 2 * g;

  // Left unset: the first wgmma overwrites them (see wgmma.cuh).
  float acc[kBlocks][kRows / 2];
  // kSets A register sets (and metadata registers, sparse weights only), used
  // by the steps in turn: the set of step s + 1 is filled while the wgmmas of
  // steps s - 2 .. s run. A round (LargeConfig::kRound) uses each set once,
  // so that set indices are constants.
  constexpr int kSets = 4;
  constexpr int kRound = L::kRound;
  static_assert(kRound * L::kSteps == kSets, "a round uses each register set once");
  uint32_t a[kSets][kBlocks][4];
  uint32_t e[kSets][kBlocks];

  // Stage j lives in slot j % kStages and completes phase j / kStages of its
  // slot's barrier.
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::kBarrierOffset);
  const int scale_rows = p.group_shift >= 6 ? 1 : L::kScaleRows;
  const uint32_t stage_bytes = L::kXBytes + L::kWordRows * L::kCodeRowBytes +
                               (kSymmetric ? 1 : 2) * scale_rows * L::kScaleRowBytes +
                               L::kMetadataBytes;
  auto load = [&](int j) {  // one thread: thread 0 at the start, then L::kLoader
    char* stage = smem + (j % kStages) * L::kBytes;
    uint64_t* barrier = full + j % kStages;
    const int k0 = (first + j) * kStageK;
    const int scale_row = p.group_shift >= 31 ? 0 : k0 >> p.group_shift;
    tma::expect_bytes(barrier, stage_bytes);
    tma::load_2d(stage, &maps.x, row0, k0, barrier);
    tma::load_2d(stage + L::kCodeOffset, &maps.codes, k0 / L::kWordK, col0, barrier);
    tma::load_2d(stage + L::kScaleOffset, &maps.scales, scale_row, col0, barrier);
    if (!kSymmetric) {
      tma::load_2d(stage + L::kOffsetOffset, &maps.offsets, scale_row, col0, barrier);
    }
    if (kSparse) {
      tma::load_2d(stage + L::kMetadataOffset, &maps.metadata, k0 / L::kWordK, col0, barrier);
    }
  };
  tma::start_ring(full, kStages, L::kAhead, stages, load);
  // When a round begins at stage j both warpgroups are past the
  // dequantization and the wgmmas of stages j + kAhead - kStages .. + kRound
  // - 1 (see LargeConfig::kStages): their slots are refilled then.
  auto begin_round = [&](int j) {
    tma::begin_ring_stages(full, kStages, L::kAhead, j, kRound, stages, L::kLoader, load);
  };
  // The A fragments of rows kStepK step .. + kStepK - 1 of a stage.
  auto dequantize = [&](const char* stage, int step, uint32_t(&frag)[kBlocks][4]) {
    // Those rows are in scale row (kStepK step) >> shift of the stage.
    const int scale_row = p.group_shift >= 6 ? 0 : (L::kStepK * step) >> p.group_shift;
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) {
      const int at = scale_row * L::kScaleRowBytes + 2 * column[b];
      const uint32_t s = *reinterpret_cast<const uint32_t*>(stage + L::kScaleOffset + at);
      const uint32_t o =
          kSymmetric ? 0u : *reinterpret_cast<const uint32_t*>(stage + L::kOffsetOffset + at);
      const uint32_t scale[2] = {broadcast_low(s), broadcast_high(s)};
      const uint32_t offset[2] = {broadcast_low(o), broadcast_high(o)};
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        // Dense: rows kStepK step + 8 half + 2t, + 1 of the stage, a code pair
        // of one word. Sparse: quad 4 half + t of the k32 step, the kept pair t
        // of word row 2 step + half.
        const int row = L::kStepK * step + L::kStepK / 2 * half;
        const uint2 words = *reinterpret_cast<const uint2*>(
            stage + L::kCodeOffset + (row / L::kWordK) * L::kCodeRowBytes + 4 * column[b]);
        const int pair = (kSparse ? 0 : row % L::kWordK / 2) + t;
        frag[b][2 * half] =
            Dq::pair(words.x, pair, as_pair<Pair>(scale[0]), as_pair<Pair>(offset[0]));
        frag[b][2 * half + 1] =
            Dq::pair(words.y, pair, as_pair<Pair>(scale[1]), as_pair<Pair>(offset[1]));
      }
    }
  };
  // A sparse weight's metadata registers for rows kStepK step .. + kStepK - 1
  // of a stage. This lane's register (wgmma.cuh) holds quads 0-3 of word row
  // 2 step + t % 2 of the stage, columns column[b] (bits 0-15) and + 1
  // (16-31), a nibble per quad in quad order. Metadata row q of the stage
  // holds quad q of its four word rows, word row w's in nibble w
  // (docs/formats.md), so this is column w of a 4 x 4 nibble transpose. It
  // runs on bytes (a third of the shift-mask-or form's instructions, where
  // the warpgroup has drained): word rows 2 step and 2 step + 1 are byte
  // `step` of each u16; one byte permute gathers that byte of rows 0 and 2
  // (quads 0 and 2) into bytes 0 and 1 of each u16, one of rows 1 and 3
  // (quads 1 and 3) likewise; then quads 0 and 2 want the byte's wanted
  // nibble low, quads 1 and 3 high: two shifts and a lop3.
  auto read_metadata = [&](const char* stage, int step, uint32_t(&metadata)[kBlocks]) {
    const uint32_t select = step == 0 ? 0x6240u : 0x7351u;  // bytes 0, 4, 2, 6 or 1, 5, 3, 7
    const int shift = 4 * (t & 1);                          // the byte's low or high nibble
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) {
      uint32_t row[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        row[q] = *reinterpret_cast<const uint32_t*>(stage + L::kMetadataOffset +
                                                    q * L::kMetadataRowBytes + 2 * column[b]);
      }
      const uint32_t even = __byte_perm(row[0], row[2], select);
      const uint32_t odd = __byte_perm(row[1], row[3], select);
      const uint32_t nibbles = (even >> shift & 0x0F0F0F0Fu) | (odd << (4 - shift) & 0xF0F0F0F0u);
      // Columns past N arrive as zeros, an invalid pattern; their outputs
      // are not stored, so any valid one (rows 0 and 1) will do.
      metadata[b] = col0 + column[b] < p.n ? nibbles : 0x44444444u;
    }
  };

  // A dense round (stage) begins at the last step of the one before, a sparse
  // round once the warpgroup has drained at the top of the loop.
  if (kSparse) {
    tma::wait_stage(full, kStages, 0);
  } else {
    begin_round(0);
  }
  dequantize(smem, 0, a[0]);
  for (int j0 = 0; j0 < stages; j0 += kRound) {
    if (kSparse) {
      // The round's metadata registers, defined while no wgmma runs: ptxas
      // serializes every wgmma.sp of a kernel that defines a metadata
      // register with wgmmas in flight (C7513). The round begins here, so
      // that its CTA barrier and the drain are one wait.
      wgmma::wait<0>();
      begin_round(j0);
#pragma unroll
      for (int r = 0; r < kRound; ++r) {
        if (j0 + r == stages) break;
#pragma unroll
        for (int step = 0; step < L::kSteps; ++step) {
          read_metadata(smem + ((j0 + r) % kStages) * L::kBytes, step, e[r * L::kSteps + step]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRound; ++r) {
      const int j = j0 + r;
      if (j == stages) break;
      const char* stage = smem + (j % kStages) * L::kBytes;
      const uint32_t x_base = shared_address(stage);
#pragma unroll
      for (int step = 0; step < L::kSteps; ++step) {
        const int set = r * L::kSteps + step, next = (set + 1) % kSets;
        // B: rows kStepK step .. of K, 2 kStepK bytes into every 128-byte row of x.
        const uint64_t desc = wgmma::descriptor_sw128(x_base + 2 * L::kStepK * step);
        wgmma::fence();
#pragma unroll
        for (int b = 0; b < kBlocks; ++b) {
          if (kSparse) {
            wgmma::SparseMma<T>::mma(acc[b], a[set][b], desc, j > 0 || step > 0, e[set][b]);
          } else {
            wgmma::Mma<T>::mma(acc[b], a[set][b], desc, j > 0 || step > 0);
          }
        }
        wgmma::commit();
        if (step + 1 < L::kSteps) {
          dequantize(stage, step + 1, a[next]);
        } else if (j + 1 < stages) {
          if (r + 1 == kRound) {  // the next round's first stage
            if (kSparse) {
              tma::wait_stage(full, kStages, j + 1);  // it begins after the drain
            } else {
              begin_round(j + 1);
            }
          }
          dequantize(smem + ((j + 1) % kStages) * L::kBytes, 0, a[next]);
        }
        wgmma::wait<2>();  // the wgmmas of two steps back are done
      }
    }
  }
  wgmma::wait<0>();

  if (splits > 1) {
    static_assert(split_bytes(kRows) <= L::kBarrierOffset, "partials fit in the ring");
    add_split_partials<kLargeThreads>(
        acc, smem, min(kRows, p.m - row0), group * 64 + 16 * warp + 2 * g,
        [&](int b, int row, int c, const float(&sum)[4]) {
          const int col = col0 + (c / 64 * kBlocks + b) * 64 + c % 64;
          if (col >= p.n) return;  // N % 8 == 0: all four columns or none
          Pair* out = reinterpret_cast<Pair*>(p.y + int64_t(row0 + row) * p.n + col);
          out[0] = Pair{from_float<T>(sum[0]), from_float<T>(sum[1])};
          out[1] = Pair{from_float<T>(sum[2]), from_float<T>(sum[3])};
        });
    return;
  }
  // Accumulators 4q + 2h and 4q + 2h + 1 of block b: MMA rows g (column
  // column[b]) and g + 8 (column[b] + 1) at MMA column 8q + 2t + h (a row of
  // x): one 4-byte store of two adjacent outputs.
#pragma unroll
  for (int b = 0; b < kBlocks; ++b) {
    const int col = col0 + column[b];
    if (col >= p.n) continue;  // N % 8 == 0: both columns or neither
#pragma unroll
    for (int i = 0; i < kRows / 2; i += 4) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = row0 + 8 * (i / 4) + 2 * t + h;
        if (m < p.m) {
          Pair out;
          out.x = from_float<T>(acc[b][i + h]);
          out.y = from_float<T>(acc[b][i + 2 + h]);
          *reinterpret_cast<Pair*>(p.y + int64_t(m) * p.n + col) = out;
        }
      }
    }
  }
#else
  __trap();  // the handler launches this kernel only on sm_90
#endif
}

template <typename T, int kBits, bool kSymmetric, bool kSparse, typename TileShape>
cudaError_t launch(const GemmArgs& args, const StageMaps& maps, int device, cudaStream_t stream) {
  using L = LargeConfig<kBits, kSparse, TileShape>;
  constexpr int kRows = L::kRows, kColumns = L::kColumns;
  constexpr auto kernel = gemm_large_m_kernel<T, kBits, kSymmetric, kSparse, TileShape>;
  cudaError_t err = allow_shared_memory<kernel>(device, L::kSharedBytes);
  if (err != cudaSuccess) return err;
  const int row_tiles = (args.m + kRows - 1) / kRows;
  const int tiles = row_tiles * ((args.n + kColumns - 1) / kColumns);
  const int stages = args.k / kStageK;  // > 0
  const int splits =
      choose_splits<kernel>(device, tiles, stages / kMinStagesPerSplit, kLargeThreads,
                            L::kSharedBytes, double(kFixedStages) / stages);
  const ClusterLaunch launch(dim3(tiles, splits), kLargeThreads, L::kSharedBytes, stream);
  err = cudaLaunchKernelEx(&launch.config, kernel, staged_params<T>(args), row_tiles, maps);
  return err != cudaSuccess ? err : cudaGetLastError();
}

template <typename T, bool kSparse, typename TileShape>
cudaError_t launch_type(const GemmArgs& args, const StageMaps& maps, bool symmetric, int device,
                        cudaStream_t stream) {
  if (kSparse || args.bits == 4) {
    return symmetric ? launch<T, 4, true, kSparse, TileShape>(args, maps, device, stream)
                     : launch<T, 4, false, kSparse, TileShape>(args, maps, device, stream);
  }
  return symmetric ? launch<T, 2, true, false, TileShape>(args, maps, device, stream)
                   : launch<T, 2, false, false, TileShape>(args, maps, device, stream);
}

// Launches the kernel of one tile shape (M, N, K > 0): the tensor maps of a
// stage's tiles (see StageMaps), then the kernel for x's type, bits, symmetry.
// `metadata` is a sparse weight's (null for dense weights).
template <bool kSparse, typename TileShape>
ffi::Error launch_tile(const GemmArgs& args, const uint16_t* metadata, bool bf16, bool symmetric,
                       int device, cudaStream_t stream) {
  constexpr int kRows = TileShape::kRows, kColumns = TileShape::kColumns;
  constexpr int kWordK = LargeConfig<4, kSparse, TileShape>::kWordK;
  const int word_k = kSparse ? kWordK : codes_per_word(args.bits);
  const uint64_t groups = args.group_shift >= 31 ? 1 : uint64_t(args.k) >> args.group_shift;
  const uint32_t scale_rows = args.group_shift >= 6 ? 1 : kStageK / 32;
  StageMaps maps;
  if (!(tma::map_2d(&maps.x, args.x, 2, args.m, args.k, kRows, kStageK, true) &&
        tma::map_2d(&maps.codes, args.codes, 4, args.k / word_k, args.n, kStageK / word_k,
                    kColumns, false) &&
        tma::map_2d(&maps.scales, args.scales, 2, groups, args.n, scale_rows, kColumns, false) &&
        tma::map_2d(&maps.offsets, args.offsets, 2, groups, args.n, scale_rows, kColumns,
                    false) &&
        (!kSparse || tma::map_2d(&maps.metadata, metadata, 2, args.k / word_k, args.n,
                                 kStageK / word_k, kColumns, false)))) {
    return ffi::Error::Internal("gemm (large M): the CUDA driver refused a TMA tensor map");
  }
  return launch_result(
      bf16 ? launch_type<__nv_bfloat16, kSparse, TileShape>(args, maps, symmetric, device, stream)
           : launch_type<__half, kSparse, TileShape>(args, maps, symmetric, device, stream));
}

// What both targets do once their arguments are checked (`p`, `args`): the
// device and shape checks, then the tile for M.
template <bool kSparse>
ffi::Error run_large_m(const SmallMProblem& p, const GemmArgs& args, const uint16_t* metadata,
                       bool bf16, bool symmetric, cudaStream_t stream) {
  if (p.n % 8 != 0) return ffi::Error::InvalidArgument("gemm (large M): needs N % 8 == 0");
  int device = 0;
  ffi::Error error = current_sm90_device("gemm (large M)", device);
  if (error.failure()) return error;
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();
  if (p.k == 0) {  // an empty sum: y = 0 (zero bits in bf16 and fp16)
    return launch_result(cudaMemsetAsync(p.y, 0, size_t(p.m) * p.n * 2, stream));
  }
  if (p.m <= Rows64Tile::kRows) {
    return launch_tile<kSparse, Rows64Tile>(args, metadata, bf16, symmetric, device, stream);
  }
  if (p.m <= Rows128Tile::kRows) {
    return launch_tile<kSparse, Rows128Tile>(args, metadata, bf16, symmetric, device, stream);
  }
  return launch_tile<kSparse, Rows256Tile>(args, metadata, bf16, symmetric, device, stream);
}

ffi::Error gemm_large_m_impl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::U32> codes,
                             ffi::AnyBuffer scales, ffi::AnyBuffer offsets,
                             ffi::Result<ffi::AnyBuffer> y, int32_t bits, int64_t group_size,
                             bool symmetric) {
  SmallMProblem p;
  GemmArgs args;
  ffi::Error error = dense_gemm_problem(x, codes, scales, offsets, y, bits, group_size,
                                        [](int) { return kStageK; }, INT32_MAX, p, args);
  if (error.failure()) return error;
  return run_large_m<false>(p, args, nullptr, x.element_type() == ffi::BF16, symmetric, stream);
}

ffi::Error gemm_sparse_large_m_impl(cudaStream_t stream, ffi::AnyBuffer x,
                                    ffi::Buffer<ffi::U32> codes, ffi::Buffer<ffi::U16> metadata,
                                    ffi::AnyBuffer scales, ffi::AnyBuffer offsets,
                                    ffi::Result<ffi::AnyBuffer> y, int32_t bits,
                                    int64_t group_size, bool symmetric) {
  SmallMProblem p;
  GemmArgs args;
  const ffi::Error error = sparse_gemm_problem(x, codes, metadata, scales, offsets, y, bits,
                                               group_size, kStageK, INT32_MAX, p, args);
  if (error.failure()) return error;
  return run_large_m<true>(p, args, metadata.typed_data(), x.element_type() == ffi::BF16,
                           symmetric, stream);
}

}  // namespace
}  // namespace jax_lowbit

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitGemmLargeMCuda, jax_lowbit::gemm_large_m_impl,
                              jax_lowbit::dense_gemm_binding(),
                              {xla::ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitSparseGemmLargeMCuda, jax_lowbit::gemm_sparse_large_m_impl,
                              jax_lowbit::sparse_gemm_binding(),
                              {xla::ffi::Traits::kCmdBufferCompatible});
