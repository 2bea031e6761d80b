// W8A8 / W4A8 for large M on Hopper: the arithmetic of docs/formats.md
// ("Quantized activations") on int8 warpgroup MMAs (wgmma s8, sm_90a), with
// xq, s and t from the quantize_rows pre-pass and the weight's packed codes
// read in place. The mma.sync kernel (act_quant_gemm.cu) streams the whole
// weight once per 32 rows of x; this one tiles M like gemm_large_m.cu.
//  * As in gemm_large_m.cu the weights are A (y^T = W^T xq^T): a CTA is two
//    warpgroups, each owning 64 output columns (one m64 block) for kRows
//    rows of x, the wgmma N; the CTA's tile is 128 columns x kRows rows
//    (128, or 256 for one group and many rows: see StageLayout).
//    MMA rows g and g + 8 of warp w are the adjacent columns 16w + 2g and
//    16w + 2g + 1 of the warpgroup's block: one 8-byte shared load gets both
//    columns' code words.
//  * A registers are the m16n8k32 s8 A fragment per warp, made from the
//    packed words as the mma.sync kernel makes them (SignedCodes in
//    mma_fragments.cuh): lane (g, t) of step s reads its two columns' words
//    of K rows 32s + 8t .. + 7 (int4: one word each, one 8-byte shared load;
//    int8: two), and every code of them lands in the lane's k slots. The
//    K order this gives the k slots is the one SignedCodes<bits>::b_fragment
//    makes of eight activations in registers; wgmma reads B from shared
//    memory as it lies, so the pre-pass stores xq in that order
//    (quantize_rows.cu, interleave_bits). Until v15 xq was in K order and a
//    lane read two words per register set, using half of each, with a prmt
//    per register (docs/perf.md v16). int4 bytes are 16 * (code - 8): the
//    sums are 16 p, exact (the group term's scale is divided by 16; one
//    group: p = sum >> 4).
//  * Groups: the s32 accumulators hold one group's sum p. The first wgmma of
//    a group passes accumulate = 0 (no register writes, which would serialize
//    the wgmmas), and after its last one the warpgroup waits for its wgmmas
//    and adds the group's term (scale, and offset and t for asymmetric
//    weights) to f32 accumulators, groups in increasing order, as fmas. A
//    stage is 128 rows of K, 4 wgmma steps: a 32-row group ends at every
//    step, a 128-row group once per stage. One group (group_size -1) keeps
//    its s32 sum to the end, which then gives the CPU handler's bits.
//  * Operands arrive by TMA (tma.cuh) in a ring of kStages stages, asked
//    for by the first lane of a producer warp beside the two warpgroups. A
//    slot is refilled once every consumer warp has arrived on its "empty"
//    barrier, so the warpgroups never wait for each other: one forms its
//    group terms while the other's wgmmas run. (Up to v11 thread 0 loaded
//    between its wgmmas and a CTA barrier per stage kept the warpgroups in
//    lockstep: both formed their terms at once while the tensor cores idled,
//    docs/perf.md v9.) With groups the warpgroups also take turns: one
//    issues a group's wgmmas while the other waits for its own and forms
//    their terms (named barriers 1 and 2: warpgroup w waits on 1 + w before
//    a group's first wgmma, and after its last lets the other go), so the
//    tensor cores have the other's wgmmas queued during each term.
//    The stage: xq (kRows rows of 128 bytes, the wgmma 128-byte swizzle),
//    the code words of the stage (in blocks of one warp's 16 columns, see
//    `fetch`) and the rows of scales (and offsets) of its groups; rows past
//    M and columns past N arrive as zeros. t (asymmetric only) is read from
//    global memory at a group's end: its rows are M * 4 bytes apart, which
//    TMA needs to be a multiple of 16.
//  * K is split over a cluster of up to 8 CTAs when tiles leave SMs idle,
//    each CTA taking whole groups; the partial sums meet in distributed
//    shared memory (wgmma_split.cuh) in rank order: f32 sums of groups (each
//    split adds its groups in order, then the splits add in rank order), or
//    for one group the exact s32 sums, of which the single term is formed.
// Requires K % 128 == 0, N % 8 == 0, groups of 32 * 2^i rows; the lowering
// sends other shapes to act_quant_gemm.cu.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "act_quant.h"
#include "cuda/act_quant_target.h"
#include "cuda/cluster_split.cuh"
#include "cuda/handlers.h"
#include "cuda/kernel_attributes.h"
#include "cuda/launch_status.h"
#include "cuda/mma_fragments.cuh"
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"
#include "cuda/wgmma_split.cuh"

namespace jax_lowbit {
namespace {

namespace ffi = xla::ffi;

constexpr int kConsumerThreads = 256;            // two warpgroups
constexpr int kThreads = kConsumerThreads + 32;  // and the producer warp
constexpr int kColumns = 128;    // output columns per CTA, 64 per warpgroup
constexpr int kStageK = 128;     // rows of K per stage: one 128-byte row of xq
constexpr int kStepK = 32;       // rows of K per wgmma
constexpr int kSteps = kStageK / kStepK;
// A split of K runs at least this many stages and costs about kFixedStages
// more (the first loads' round trip, the cluster sum).
constexpr int kMinStagesPerSplit = 4;
constexpr int kFixedStages = 3;
constexpr int kMaxSharedBytes = 227 * 1024;  // per CTA on sm_90
// A stage's code words lie in blocks of 16 columns, one warp's, each block
// rows of 64 bytes (see `fetch`).
constexpr int kCodeBlockColumns = 16;
// With one group a CTA takes 256 rows of x from this many rows on (see
// StageLayout); up to 128 rows one 128-row tile holds them all.
constexpr int kWideRowsMinRows = 129;
static_assert(kColumns == 8 * kCodeBlockColumns, "warp w of warpgroup h reads block 4h + w");

// Rows of x per CTA (the wgmma N) and ring slots (all load ahead). With
// groups a lane holds s32 and f32 accumulators, kRows / 2 each, which leaves
// room for 128 rows. One group needs no f32 ones, and above 128 rows it
// takes 256: a wgmma then does twice the work for the same A registers,
// and the weights are read once per 256 rows of x (W8A8 on the suite 1.2x
// to 1.3x faster at 256 to 4096 rows, docs/perf.md v18; v9's 256-row
// tiles, in a loop without the producer warp, were slower). A stage is a quarter of
// gemm_large_m.cu's MMA time (s8 wgmmas run twice as fast, over N = 128),
// so the ring holds as many stages as fit to hide the loads' latency.
template <int kBits, int kRows>
struct StageLayout {
  static constexpr int kAccumulators = kRows / 2;  // per lane: 2 MMA rows x kRows / 4
  static constexpr int kPerWord = 32 / kBits;
  static constexpr int kWordRows = kStageK / kPerWord;
  // A stage touches at most kSteps groups (of 32 rows); scales take up to 4
  // bytes each.
  static constexpr int kScaleRows = kSteps;
  static constexpr int kXBytes = kRows * kStageK;
  static constexpr int kBlockRowBytes = kCodeBlockColumns * 4;
  static constexpr int kCodeBlockBytes = kWordRows * kBlockRowBytes;
  static constexpr int kCodeBytes = kWordRows * kColumns * 4;
  static constexpr int kScaleRowBytes = kColumns * 4;
  static constexpr int kCodeOffset = kXBytes;
  static constexpr int kScaleOffset = kCodeOffset + kCodeBytes;
  static constexpr int kOffsetOffset = kScaleOffset + kScaleRows * kScaleRowBytes;
  static constexpr int kBytes = (kOffsetOffset + kScaleRows * kScaleRowBytes + 1023) / 1024 * 1024;
  static constexpr int kStages = (kMaxSharedBytes - 1024) / kBytes;
  static constexpr int kBarrierOffset = kStages * kBytes;
  // After the full and empty barriers: the tile's rows' x scales and sums t,
  // for the epilogue (see `stage_rows`).
  static constexpr int kRowOffset = kBarrierOffset + 2 * kStages * 8;
  static constexpr int kSharedBytes = kRowOffset + 2 * kRows * 4;
  static_assert(split_bytes(kRows) <= kBarrierOffset, "split partials fit in the ring");
  static_assert(kSharedBytes <= kMaxSharedBytes, "the ring leaves room for the rows");
};

struct StageMaps {
  CUtensorMap x, codes, scales, offsets;
};

// Named barrier 1 + `warpgroup` (0 is __syncthreads), of both consumer
// warpgroups' threads: a warpgroup waits on its own and arrives on the
// other's. The ids are immediates (ptxas reserves all 16 for a register id).
__device__ __forceinline__ void wait_turn(int warpgroup) {
  if (warpgroup == 0) {
    asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumerThreads) : "memory");
  } else {
    asm volatile("bar.sync 2, %0;\n" ::"n"(kConsumerThreads) : "memory");
  }
}
__device__ __forceinline__ void pass_turn(int warpgroup) {
  if (warpgroup == 0) {
    asm volatile("bar.arrive 2, %0;\n" ::"n"(kConsumerThreads) : "memory");
  } else {
    asm volatile("bar.arrive 1, %0;\n" ::"n"(kConsumerThreads) : "memory");
  }
}

// kGroupSteps: 0 for one group (group_size -1); 1, 2 or 4 for groups of that
// many 32-row steps (1, 2 or 4 groups end in every stage); kStagedGroups (8)
// for groups of two or more stages. Where a group starts and ends within a
// stage is then known at compile time: v15 worked it out at run time at
// every step, and the branches and index arithmetic were about a third of the
// instructions of a stage (docs/perf.md v16).
constexpr int kStagedGroups = 8;

// kIntegerScales: int4 symmetric weights whose group scales are integer
// multiples m (0..16) of one scale per column (quantize(...,
// integer_group_scales=True)): p.scales holds the multiples, uint8 (G, N), and
// p.offsets the column scales, float32 (N,). The A registers hold (code - 8) *
// m (SignedCodes<4>::a_fragment_scaled), so one s32 sum runs over all of K as
// for one group: no group terms, no turns, and 256-row tiles above 128 rows
// (docs/perf.md v23: the same kernel without groups runs 1.4x-1.6x faster than
// float group scales).
template <int kBits, bool kSymmetric, int kGroupSteps, int kRows, bool kIntegerScales>
__global__ void __launch_bounds__(kThreads, 1)
    act_quant_large_m_kernel(const ActQuantArgs p, int row_tiles,
                             const __grid_constant__ StageMaps maps) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool kOneGroup = kGroupSteps == 0;
  // One s32 sum over all of K (no f32 sums of groups).
  constexpr bool kOneSum = kOneGroup || kIntegerScales;
  static_assert(kOneSum || kRows == 128, "groups leave registers for 128 rows");
  static_assert(!kIntegerScales || (kBits == 4 && kSymmetric && !kOneGroup),
                "integer group scales: int4 symmetric groups");
  using L = StageLayout<kBits, kRows>;
  using Codes = SignedCodes<kBits>;
  constexpr int kAccumulators = L::kAccumulators, kStages = L::kStages;
  constexpr int kShift = kIntegerScales ? 0 : Codes::kProductShift;
  extern __shared__ __align__(1024) char smem[];

  const int group = threadIdx.x / 128;
  const int warp = threadIdx.x / 32 % 4;
  const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  const int row0 = blockIdx.x % row_tiles * kRows;
  const int col0 = blockIdx.x / row_tiles * kColumns;
  const int column = group * 64 + 16 * warp + 2 * g;  // of MMA row g; g + 8 is column + 1
  // A split takes whole chunks of stages that end groups.
  const int group_steps = kOneGroup ? 1 : p.group_steps;
  // Steps per group where a group lies within a stage (else a stage's).
  constexpr int kPerGroup = kOneGroup || kGroupSteps == kStagedGroups ? kSteps : kGroupSteps;
  const int stages_per_group = kGroupSteps == kStagedGroups ? group_steps / kSteps : 1;
  const int chunks = p.k / kStageK / stages_per_group;
  const int splits = int(gridDim.y);
  const int first = chunks * int(blockIdx.y) / splits * stages_per_group;
  const int stages = chunks * (int(blockIdx.y) + 1) / splits * stages_per_group - first;
  constexpr int kScaleRows = kSteps / kPerGroup;  // groups a stage touches
  const int scale_bytes = float_bytes(p.scale_type);

  int32_t iacc[kAccumulators];  // left unset: the first wgmma of a group overwrites them
  float facc[kOneSum ? 1 : kAccumulators];
#pragma unroll
  for (int i = 0; i < (kOneSum ? 1 : kAccumulators); ++i) facc[i] = 0.f;
  // Two A register sets: the set of step s + 1 is filled once the wgmma of
  // step s - 1 is done, while step s's runs.
  uint32_t a[2][4];

  uint64_t* barriers = reinterpret_cast<uint64_t*>(smem + L::kBarrierOffset);
  const tma::ProducerRing ring{barriers, barriers + kStages, kStages};
  // The epilogue's values of each row (x scale; one group asymmetric, also
  // the sum t), staged in shared memory by the first kRows consumer threads
  // while the first stage loads. Read from global memory between the
  // epilogue's stores, a lane's 32 to 64 rows cost a load round trip each
  // while the tensor cores idle (docs/perf.md v23).
  float* row_scales = reinterpret_cast<float*>(smem + L::kRowOffset);
  int32_t* row_sums = reinterpret_cast<int32_t*>(row_scales + kRows);
  const uint32_t stage_bytes =
      L::kXBytes + L::kCodeBytes +
      (kOneGroup        ? 0
       : kIntegerScales ? kScaleRows * kColumns  // uint8 multiples
                        : (kSymmetric ? 1 : 2) * kScaleRows * kColumns * scale_bytes);
  ring.init(kConsumerThreads / 32);
  // The A registers of step `step` of a stage, in two parts: the code words'
  // shared loads are issued before the wait for the wgmma of the step
  // before, so that their latency overlaps it. A warp reads its block's
  // columns (64 bytes) of four word rows, one per t, two wavefronts with no
  // bank conflict: int4's rows 4s + t are adjacent; int8 lanes of odd t
  // load their rows 8s + 2t + 1 and 8s + 2t in that order, so that each load
  // reads two even and two odd rows (the two 64-byte halves of the banks),
  // and the pre-pass stores their activations' halves swapped to match
  // (docs/formats.md). v16's rows of all 128 columns were 512 bytes apart:
  // a 4-way conflict.
  using Words = uint4[Codes::kLoads];  // .x, .y: columns column and column + 1
  const int code_lane = L::kCodeOffset + (4 * group + warp) * L::kCodeBlockBytes + 8 * g;
  const int first_load = Codes::kOddLanesSwapHalves ? t & 1 : 0;
  auto fetch = [&](const char* stage, int step, Words& words) {
#pragma unroll
    for (int load = 0; load < Codes::kLoads; ++load) {
      const uint2 pair = *reinterpret_cast<const uint2*>(
          stage + code_lane + Codes::word_row(step, t, load ^ first_load) * L::kBlockRowBytes);
      words[load] = make_uint4(pair.x, pair.y, 0, 0);
    }
  };
  // The A registers of step `step` of `stage` from its fetched words.
  auto widen = [&](const char* stage, int step, const Words& words, uint32_t(&frag)[4]) {
    if constexpr (kIntegerScales) {
      // The two columns' multiples of the step's group: adjacent bytes of its row.
      const uint32_t pair = *reinterpret_cast<const uint16_t*>(
          stage + L::kScaleOffset + step / kPerGroup * kColumns + column);
      Codes::a_fragment_scaled(words, pair & 0xFFu, pair >> 8, frag);
    } else {
      Codes::a_fragment(words, 0, frag);
    }
  };
  // After the last step of group `group_index` (step `step` of `stage`): its
  // term joins the f32 sums, as one fma: acc + f32(sum) * scale rounds once
  // where the spec rounds the product and the sum (docs/formats.md). The
  // accumulators hold 2^kShift times the sum, so the scale is divided by
  // 2^kShift (exact). f32(sum) is one instruction on sm_90 (I2FP.F32.S32);
  // up to v16 an integer add of 1.5 * 2^23 and a float add converted it,
  // one instruction more per accumulator and group (docs/perf.md v17).
  // Accumulators 4q + h and 4q + 2 + h are MMA rows g and g + 8 (columns
  // column, column + 1) at MMA column 8q + 2t + h.
  auto add_group = [&](const char* stage, int step, int group_index) {
    const int at = step / kPerGroup * kColumns + column;
    constexpr float kUnit = 1.f / (1 << kShift);
    float scale[2], offset[2] = {0.f, 0.f};
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      scale[c] = load_float(stage + L::kScaleOffset, at + c, p.scale_type) * kUnit;
      if (!kSymmetric) offset[c] = load_float(stage + L::kOffsetOffset, at + c, p.scale_type);
    }
#pragma unroll
    for (int i = 0; i < kAccumulators; i += 4) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = row0 + 8 * (i / 4) + 2 * t + h;
        const int32_t sum_x =
            kSymmetric || m >= p.m ? 0 : __ldg(p.group_sums + int64_t(group_index) * p.m + m);
        // 2^(bits-1) t in the accumulators' units: their sum is then 2^kShift sum xq * code.
        const uint32_t code_shift = uint32_t(sum_x) << (kBits - 1 + kShift);
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int r = i + 2 * c + h;
          const int32_t sum = int32_t(uint32_t(iacc[r]) + code_shift);
          facc[r] = fmaf(float(sum), scale[c], facc[r]);
          if (!kSymmetric) facc[r] = fmaf(float(sum_x), offset[c], facc[r]);
        }
      }
    }
  };

  if (threadIdx.x >= kConsumerThreads) {  // the producer warp
    if (threadIdx.x == kConsumerThreads) {
      for (int j = 0; j < stages; ++j) {
        uint64_t* full = ring.begin_fill(j, stage_bytes);
        char* stage = smem + (j % kStages) * L::kBytes;
        const int k0 = (first + j) * kStageK;
        tma::load_2d(stage, &maps.x, row0, k0, full);
#pragma unroll
        for (int b = 0; b < kColumns / kCodeBlockColumns; ++b) {
          tma::load_2d(stage + L::kCodeOffset + b * L::kCodeBlockBytes, &maps.codes,
                       k0 / L::kPerWord, col0 + b * kCodeBlockColumns, full);
        }
        if (!kOneGroup) {
          const int scale_row = k0 / (group_steps * kStepK);
          tma::load_2d(stage + L::kScaleOffset, &maps.scales, scale_row, col0, full);
          if (!kSymmetric) {
            tma::load_2d(stage + L::kOffsetOffset, &maps.offsets, scale_row, col0, full);
          }
        }
      }
    }
    if (splits == 1) return;  // else the warp joins the cluster's barriers below
  } else {
    if (threadIdx.x < kRows) {
      const int m = row0 + int(threadIdx.x);
      row_scales[threadIdx.x] = m < p.m ? p.x_scales[m] : 0.f;
      if (kOneGroup && !kSymmetric) row_sums[threadIdx.x] = m < p.m ? p.group_sums[m] : 0;
    }
    ring.wait_full(0);
    Words words;
    fetch(smem, 0, words);
    widen(smem, 0, words, a[0]);
    for (int j = 0; j < stages; ++j) {
      const char* stage = smem + (j % kStages) * L::kBytes;
      const uint32_t x_base = shared_address(stage);
      // Groups of whole stages: whether stage j starts and ends one.
      const bool stage_starts = j % stages_per_group == 0;
      const bool stage_ends = (j + 1) % stages_per_group == 0;
#pragma unroll
      for (int step = 0; step < kSteps; ++step) {
        const int set = step % 2;
        // Constants once the loop is unrolled, but for groups of whole stages.
        const bool starts_group =
            kOneSum ? j + step == 0 : step % kPerGroup == 0 && stage_starts;
        // (32- and 64-row groups end 4 and 2 times a stage; the run-time test
        // of group_steps, always kGroupSteps there, keeps ptxas from scheduling
        // their terms together, which spilled up to 660 bytes.)
        const bool ends_group = !kOneSum && (step + 1) % kPerGroup == 0 && stage_ends &&
                                (kPerGroup == kSteps || p.group_steps == kGroupSteps);
        const bool first_group = j < stages_per_group && step < kPerGroup;
        const bool last_group = j >= stages - stages_per_group && step >= kSteps - kPerGroup;
        // This warpgroup's turn to issue a group's wgmmas (see the header).
        if (!kOneSum && starts_group && (group == 1 || !first_group)) wait_turn(group);
        // B: rows 32 step .. + 31 of K, 32 bytes into every 128-byte row of xq.
        wgmma::fence();
        wgmma::Mma<int8_t>::mma(iacc, a[set], wgmma::descriptor_sw128(x_base + 32 * step),
                                !starts_group);
        wgmma::commit();
        if (ends_group && (group == 0 || !last_group)) pass_turn(group);
        const bool more = step + 1 < kSteps || j + 1 < stages;
        // The step whose A registers are filled next: step + 1 of this stage or 0 of the next.
        const char* next_stage = step + 1 < kSteps ? stage : smem + ((j + 1) % kStages) * L::kBytes;
        const int next_step = (step + 1) % kSteps;
        if (step + 1 < kSteps) {
          fetch(stage, step + 1, words);
        } else if (more) {
          ring.wait_full(j + 1);
          fetch(next_stage, 0, words);
        }
        // The stage before is done with (its wgmmas, and its group terms formed
        // below), and the A set of the next step is filled.
        auto advance = [&] {
          if (step == 0 && j > 0) ring.release(j - 1);
          if (more) widen(next_stage, next_step, words, a[1 - set]);
        };
        // One branch waits for all wgmmas and reads the accumulators: ptxas
        // serializes every wgmma if a path reaches such reads without that wait.
        if (ends_group) {
          wgmma::wait<0>();
          advance();
          const int group_index = kGroupSteps == kStagedGroups
                                      ? (first + j) / stages_per_group
                                      : ((first + j) * kSteps + step) / kPerGroup;
          add_group(stage, step, group_index);
        } else {
          wgmma::wait<1>();  // the wgmma of the step before is done, and its A set free
          advance();
        }
      }
    }
    wgmma::wait<0>();
    // The rows staged above are visible to every consumer thread (named
    // barrier 3 of the two warpgroups; the producer warp takes no part).
    asm volatile("bar.sync 3, %0;\n" ::"n"(kConsumerThreads) : "memory");
  }

  // The scale of a column's single term: its one group's, or its column scale.
  auto column_scale = [&](int col) {
    return kIntegerScales ? static_cast<const float*>(p.offsets)[col]
                          : load_float(p.scales, col, p.scale_type);
  };
  // y[m, col] from a column's sum: the f32 sum of groups, or with one sum the
  // s32 sum of which the single term is formed (acc = 0 + term).
  auto finish = [&](int m, int col, auto sum) {
    float acc;
    if constexpr (kOneSum) {
      const float scale = column_scale(col);
      const float offset = kSymmetric ? 0.f : load_float(p.offsets, col, p.scale_type);
      acc = add_rn(0.f, group_term(int32_t(sum) >> kShift, kSymmetric ? 0 : row_sums[m - row0],
                                   kBits, kSymmetric, scale, offset));
    } else {
      acc = sum;
    }
    store_output(p.y, int64_t(m) * p.n + col, mul_rn(acc, row_scales[m - row0]), p.out_type);
  };
  const int rows = min(kRows, p.m - row0);
  if (splits > 1) {
    auto finish_quad = [&](int, int row, int c, const auto(&sum)[4]) {
      const int col = col0 + c;
      if (col >= p.n) return;  // N % 8 == 0: all four columns or none
#pragma unroll
      for (int e = 0; e < 4; ++e) finish(row0 + row, col + e, sum[e]);
    };
    if constexpr (kOneSum) {
      const int32_t(&sums)[1][kAccumulators] =
          *reinterpret_cast<const int32_t(*)[1][kAccumulators]>(&iacc);
      add_split_partials<kConsumerThreads>(sums, smem, rows, column, finish_quad);
    } else {
      const float(&sums)[1][kAccumulators] =
          *reinterpret_cast<const float(*)[1][kAccumulators]>(&facc);
      add_split_partials<kConsumerThreads>(sums, smem, rows, column, finish_quad);
    }
    return;
  }
  // Without a split each lane stores its own two columns: their scales are
  // loaded once, each row's pair is one store, and the output type is
  // chosen once (per element, the loads and type switches of `finish` made
  // the epilogue ~9000 instructions, 43% of the kernel's time at M = 4096).
  const int col = col0 + column;
  if (col >= p.n) return;  // N % 8 == 0: both columns or neither
  float scale[2] = {0.f, 0.f}, offset[2] = {0.f, 0.f};
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    if (kOneSum) scale[c] = column_scale(col + c);
    if (kOneGroup && !kSymmetric) offset[c] = load_float(p.offsets, col + c, p.scale_type);
  }
  auto store_rows = [&](auto out) {
    using Out = decltype(out);
#pragma unroll
    for (int i = 0; i < kAccumulators; i += 4) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = 8 * (i / 4) + 2 * t + h, m = row0 + row;
        if (row >= rows) continue;
        [[maybe_unused]] const int32_t sum_x = kOneGroup && !kSymmetric ? row_sums[row] : 0;
        float v[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int r = i + 2 * c + h;
          if constexpr (kOneSum) {
            v[c] = add_rn(0.f, group_term(iacc[r] >> kShift, sum_x, kBits, kSymmetric, scale[c],
                                          offset[c]));
          } else {
            v[c] = facc[r];
          }
          v[c] = mul_rn(v[c], row_scales[row]);
        }
        store_output_pair<Out>(p.y, int64_t(m) * p.n + col, v[0], v[1]);
      }
    }
  };
  switch (p.out_type) {
    case FloatType::kF32: store_rows(float{}); break;
    case FloatType::kBF16: store_rows(__nv_bfloat16{}); break;
    case FloatType::kF16: store_rows(__half{}); break;
  }
#else
  __trap();  // the handler launches this kernel only on sm_90
#endif
}

// The tensor maps of a stage's tiles (see StageMaps); false if the driver
// refuses one. With integer group scales the scales are uint8 multiples and
// there are no offsets.
bool make_maps(const ActQuantArgs& args, int rows, bool integer_scales, StageMaps& maps) {
  const int per_word = 32 / args.bits;
  const int scale_size = integer_scales ? 1 : float_bytes(args.scale_type);
  const uint32_t scale_rows = std::max(1, kSteps / args.group_steps);
  return tma::map_2d(&maps.x, args.xq, 1, args.m, args.k, rows, kStageK, true) &&
         tma::map_2d(&maps.codes, args.codes, 4, args.k / per_word, args.n, kStageK / per_word,
                     kCodeBlockColumns, false) &&
         tma::map_2d(&maps.scales, args.scales, scale_size, args.groups, args.n, scale_rows,
                     kColumns, false) &&
         (integer_scales || tma::map_2d(&maps.offsets, args.offsets, scale_size, args.groups,
                                        args.n, scale_rows, kColumns, false));
}

template <int kBits, bool kSymmetric, int kGroupSteps, int kRows = 128,
          bool kIntegerScales = false>
cudaError_t launch(const ActQuantArgs& args, int device, cudaStream_t stream) {
  constexpr bool kOneGroup = kGroupSteps == 0;
  using L = StageLayout<kBits, kRows>;
  constexpr auto kernel =
      act_quant_large_m_kernel<kBits, kSymmetric, kGroupSteps, kRows, kIntegerScales>;
  StageMaps maps;
  if (!make_maps(args, kRows, kIntegerScales, maps)) return cudaErrorInvalidValue;
  cudaError_t err = allow_shared_memory<kernel>(device, L::kSharedBytes);
  if (err != cudaSuccess) return err;
  const int row_tiles = (args.m + kRows - 1) / kRows;
  const int tiles = row_tiles * ((args.n + kColumns - 1) / kColumns);
  const int stages = args.k / kStageK;  // > 0
  const int chunk = kOneGroup ? 1 : std::max(1, args.group_steps / kSteps);
  const int max_splits = std::min(stages / chunk, stages / kMinStagesPerSplit);
  const int splits = choose_splits<kernel>(device, tiles, max_splits, kThreads, L::kSharedBytes,
                                           double(kFixedStages) / stages);
  const ClusterLaunch launch(dim3(tiles, splits), kThreads, L::kSharedBytes, stream);
  err = cudaLaunchKernelEx(&launch.config, kernel, args, row_tiles, maps);
  return err != cudaSuccess ? err : cudaGetLastError();
}

template <int kBits, int kGroupSteps, int kRows = 128>
cudaError_t launch_symmetry(const ActQuantArgs& args, bool symmetric, int device,
                            cudaStream_t stream) {
  return symmetric ? launch<kBits, true, kGroupSteps, kRows>(args, device, stream)
                   : launch<kBits, false, kGroupSteps, kRows>(args, device, stream);
}

template <int kBits>
cudaError_t launch_bits(const ActQuantArgs& args, bool symmetric, int device,
                        cudaStream_t stream) {
  if (args.groups == 1) {
    return args.m >= kWideRowsMinRows
               ? launch_symmetry<kBits, 0, 256>(args, symmetric, device, stream)
               : launch_symmetry<kBits, 0>(args, symmetric, device, stream);
  }
  switch (args.group_steps) {  // a power of two
    case 1: return launch_symmetry<kBits, 1>(args, symmetric, device, stream);
    case 2: return launch_symmetry<kBits, 2>(args, symmetric, device, stream);
    case 4: return launch_symmetry<kBits, 4>(args, symmetric, device, stream);
    default: return launch_symmetry<kBits, kStagedGroups>(args, symmetric, device, stream);
  }
}

// Integer group scales (int4 symmetric): one sum over K like one group, so
// 256-row tiles above 128 rows.
template <int kGroupSteps>
cudaError_t launch_integer_scales_rows(const ActQuantArgs& args, int device,
                                       cudaStream_t stream) {
  return args.m >= kWideRowsMinRows
             ? launch<4, true, kGroupSteps, 256, true>(args, device, stream)
             : launch<4, true, kGroupSteps, 128, true>(args, device, stream);
}

cudaError_t launch_integer_scales(const ActQuantArgs& args, int device, cudaStream_t stream) {
  switch (args.group_steps) {  // a power of two
    case 1: return launch_integer_scales_rows<1>(args, device, stream);
    case 2: return launch_integer_scales_rows<2>(args, device, stream);
    case 4: return launch_integer_scales_rows<4>(args, device, stream);
    default: return launch_integer_scales_rows<kStagedGroups>(args, device, stream);
  }
}

ffi::Error act_quant_gemm_large_m_impl(cudaStream_t stream, ffi::Buffer<ffi::S8> xq,
                                       ffi::Buffer<ffi::F32> x_scales,
                                       ffi::Buffer<ffi::S32> group_sums,
                                       ffi::Buffer<ffi::U32> codes, ffi::AnyBuffer scales,
                                       ffi::AnyBuffer offsets, ffi::Result<ffi::AnyBuffer> y,
                                       int32_t bits, int64_t group_size, bool symmetric) {
  constexpr const char* kName = "act_quant_gemm (large M)";
  ActQuantArgs args;
  ffi::Error error = act_quant_problem(kName, xq, x_scales, group_sums, codes, scales, offsets, y,
                                       bits, group_size, kStageK, 8, INT32_MAX, args);
  if (error.failure()) return error;
  int device = 0;
  error = current_sm90_device(kName, device);
  if (error.failure()) return error;
  if (args.m == 0 || args.n == 0) return ffi::Error::Success();
  if (args.k == 0) {  // an empty sum: y = 0 (zero bits in every float type)
    const size_t bytes = size_t(args.m) * args.n * float_bytes(args.out_type);
    return launch_status(cudaMemsetAsync(args.y, 0, bytes, stream), kName);
  }
  // (cudaErrorInvalidValue: the driver refused a TMA tensor map.)
  return launch_status(args.bits == 8 ? launch_bits<8>(args, symmetric, device, stream)
                                      : launch_bits<4>(args, symmetric, device, stream),
                       kName);
}

}  // namespace
}  // namespace jax_lowbit

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitActQuantGemmLargeMCuda,
                              jax_lowbit::act_quant_gemm_large_m_impl,
                              jax_lowbit::act_quant_binding(),
                              {xla::ffi::Traits::kCmdBufferCompatible});

namespace jax_lowbit {
namespace {

// Int4 symmetric weights with integer group scales (the kernel's
// kIntegerScales): xq (M, K) interleaved for int4 codes and x_scales (M,)
// from the pre-pass, codes (K / 8, N), the multiples uint8 (G, N), the column
// scales float32 (N,), y (M, N); attribute group_size.
ffi::Error act_quant_gemm_integer_scales_impl(cudaStream_t stream, ffi::Buffer<ffi::S8> xq,
                                              ffi::Buffer<ffi::F32> x_scales,
                                              ffi::Buffer<ffi::U32> codes,
                                              ffi::Buffer<ffi::U8> multiples,
                                              ffi::Buffer<ffi::F32> column_scales,
                                              ffi::Result<ffi::AnyBuffer> y, int64_t group_size) {
  constexpr const char* kName = "act_quant_gemm (integer group scales)";
  const auto x_dims = xq.dimensions(), code_dims = codes.dimensions();
  const auto multiple_dims = multiples.dimensions(), y_dims = y->dimensions();
  if (x_dims.size() != 2 || code_dims.size() != 2 || multiple_dims.size() != 2 ||
      x_scales.dimensions().size() != 1 || column_scales.dimensions().size() != 1 ||
      y_dims.size() != 2) {
    return ffi::Error::InvalidArgument(
        std::string(kName) + ": needs xq (M, K), x_scales (M,), codes (K / 8, N), multiples "
                             "(G, N), column scales (N,) and y (M, N)");
  }
  const int64_t m = x_dims[0], k = x_dims[1], n = code_dims[1];
  const int64_t group_steps = group_size / kStepK;
  if (group_size <= 0 || group_size % kStepK != 0 || (group_steps & (group_steps - 1)) != 0 ||
      k % group_size != 0 || k % kStageK != 0 || n % 16 != 0 || k > INT32_MAX / 2 ||
      n > INT32_MAX / 2 || m > INT32_MAX || code_dims[0] != k / 8 ||
      multiple_dims[0] != k / group_size || multiple_dims[1] != n ||
      column_scales.dimensions()[0] != n || x_scales.dimensions()[0] != m || y_dims[0] != m ||
      y_dims[1] != n || !act_quant_float_type(y->element_type())) {
    return ffi::Error::InvalidArgument(
        std::string(kName) + ": needs groups of 32 * 2^i rows dividing K, K % 128 == 0, "
                             "N % 16 == 0, shapes as above and y of f32, bf16 or f16");
  }
  int device = 0;
  ffi::Error error = current_sm90_device(kName, device);
  if (error.failure()) return error;
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {  // an empty sum: y = 0 (zero bits in every float type)
    const size_t bytes = size_t(m) * n * float_bytes(float_type(y->element_type()));
    return launch_status(cudaMemsetAsync(y->untyped_data(), 0, bytes, stream), kName);
  }
  const ActQuantArgs args{xq.typed_data(),          x_scales.typed_data(),
                          nullptr,                  codes.typed_data(),
                          multiples.typed_data(),   column_scales.typed_data(),
                          y->untyped_data(),        static_cast<int>(m),
                          static_cast<int>(k),      static_cast<int>(n),
                          static_cast<int>(k / group_size), static_cast<int>(group_steps),
                          4,                        float_type(y->element_type()),
                          FloatType::kF32};
  // (cudaErrorInvalidValue: the driver refused a TMA tensor map.)
  return launch_status(launch_integer_scales(args, device, stream), kName);
}

}  // namespace
}  // namespace jax_lowbit

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitActQuantGemmIntegerScalesCuda,
                              jax_lowbit::act_quant_gemm_integer_scales_impl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S8>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U8>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Attr<int64_t>("group_size"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
