// Fused y = x · dequant(W) for large M (prefill) on Hopper: int4/int2 codes,
// bf16/fp16 activations, f32 accumulation on warpgroup MMAs (wgmma, sm_90a).
//
// At large M the work is tensor-core bound, so the weights must be
// dequantized where the tensor cores read them, never through HBM.
//  * wgmma takes A from registers and B from shared memory, so the weights
//    are A: y^T = W^T x^T. A warpgroup (4 warps) owns kBlocks blocks of 64
//    output columns; each block is the 64-row A of one m64nRk16 wgmma whose
//    B is kRows rows of x (R = kRows). A CTA is two warpgroups, so it owns
//    128 * kBlocks columns and kRows rows of x.
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
//  * Operands arrive by cp.async in a ring of kStages stages of 64 rows of
//    K: x in the wgmma 128-byte swizzle K-major layout (a stage of one row
//    of x is 128 bytes; its 16-byte chunk c goes to chunk c ^ (m % 8), see
//    wgmma.cuh; 8 threads copy one row's 128 contiguous bytes), the code
//    words row by row as stored, and the rows of scales (and offsets) that
//    the stage's groups use. Lanes read their words and scales from shared
//    memory; the four lanes of a quad read the same ones (a broadcast). Each
//    thread's copy addresses are computed once (StageCopies).
//  * wgmma is asynchronous: the A registers of step s + 1 are dequantized
//    (into their own register set, one per step of a stage) while the
//    wgmmas of steps s - 2 .. s run; then the warpgroup waits for step
//    s - 2, so the set it fills next (step s + 2's, last read by step s - 2)
//    is free. A ring slot is refilled two stages after it was read, so the
//    wgmma groups still in flight at a stage boundary (steps of the current
//    stage only) never read a slot being written.
//  * CTAs are ordered with M fastest: the CTAs running at once share a few
//    column tiles, so each code word comes from DRAM about once and x (a few
//    MB) is reread from L2.
// Requires K % 64 == 0, N % 8 == 0, power-of-two groups of at least 32 rows
// (or one group), M > 0; the lowering sends other shapes to dequantize + dot.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/convert.cuh"
#include "cuda/cp_async.cuh"
#include "cuda/dense_gemm_target.h"
#include "cuda/handlers.h"
#include "cuda/kernel_attributes.h"
#include "cuda/mma_fragments.cuh"
#include "cuda/small_m.cuh"
#include "cuda/staged_gemm.cuh"
#include "cuda/wgmma.cuh"
#include "format.h"
#include "weight_shape.h"

namespace jax_lowbit {
namespace {

namespace ffi = xla::ffi;

constexpr int kWarpGroups = 2;
constexpr int kLargeThreads = 128 * kWarpGroups;
constexpr int kStageK = 64;  // rows of K per stage
constexpr int kStages = 5;   // ring slots: kStages - 2 stages load ahead

template <int kBits, int kBlocks, int kRows>
struct LargeConfig {
  static constexpr int kColumns = 64 * kBlocks * kWarpGroups;
  static constexpr int kPerWord = codes_per_word(kBits);
  static constexpr int kWordRows = kStageK / kPerWord;
  // Stage layout: x (kRows rows of 128 bytes), code words (kWordRows rows of
  // kColumns), then kScaleRows rows of scales and of offsets (groups have at
  // least 32 rows, so a stage touches at most two groups).
  static constexpr int kScaleRows = kStageK / 32;
  static constexpr int kXBytes = kRows * kStageK * 2;
  static constexpr int kCodeRowBytes = kColumns * 4;
  static constexpr int kScaleRowBytes = kColumns * 2;
  static constexpr int kCodeOffset = kXBytes;
  static constexpr int kScaleOffset = kCodeOffset + kWordRows * kCodeRowBytes;
  static constexpr int kOffsetOffset = kScaleOffset + kScaleRows * kScaleRowBytes;
  static constexpr int kBytes = kOffsetOffset + kScaleRows * kScaleRowBytes;
  static constexpr int kSharedBytes = kStages * kBytes;
  static_assert(kXBytes % 1024 == 0 && kBytes % 1024 == 0, "stages must stay 1024-byte aligned");
  // 16-byte copies per stage, and per thread (the last round may be partial).
  static constexpr int kXChunks = kRows * kStageK / 8;
  static constexpr int kCodeChunks = kWordRows * kColumns / 4;
  static constexpr int kScaleChunks = kColumns / 8;  // per scale row
  static_assert(kXChunks % kLargeThreads == 0, "x copies must fill whole rounds");
  // Two CTAs per SM when the accumulators are small (64 x 64 per warpgroup),
  // so one CTA's loads and dequantization overlap the other's wgmmas.
  static constexpr int kCtasPerSm = kBlocks * kRows <= 64 ? 2 : 1;
};

// Where this thread's cp.async copies go, computed once: thread i copies x
// chunk i, i + 256, ... (row i / 8 + 32 r, K chunk i % 8, so the swizzled
// chunk is the same in every round) and code chunk i, i + 256, ... (word row
// i / (kColumns / 4) + 256 r / (kColumns / 4), 4 columns); a stage only adds
// its K offset.
template <typename T, int kBits, bool kSymmetric, int kBlocks, int kRows>
struct StageCopies {
  using L = LargeConfig<kBits, kBlocks, kRows>;
  const T* x;             // row row0 + i / 8, column 8 (i % 8) of K
  const uint32_t* codes;  // word row i / (kColumns / 4), column col0 + 4 (i % (kColumns / 4))
  int x_dst, code_dst;
  int x_rows_left;  // rows of x from this thread's first row to M
  bool code_ok;

  __device__ __forceinline__ StageCopies(const StagedParams<T>& p, int row0, int col0) {
    const int i = threadIdx.x;
    const int r = i / 8, c = i % 8;
    x = p.x + int64_t(row0 + r) * p.k + 8 * c;
    x_dst = 128 * r + 16 * (c ^ (r % 8));
    x_rows_left = p.m - row0 - r;
    const int code_row = i / (L::kColumns / 4), code_col = col0 + 4 * (i % (L::kColumns / 4));
    codes = p.codes + int64_t(code_row) * p.n + code_col;
    code_dst = L::kCodeOffset + code_row * L::kCodeRowBytes + 16 * (i % (L::kColumns / 4));
    code_ok = code_col < p.n;
  }

  __device__ __forceinline__ void load(char* stage, const StagedParams<T>& p, int index,
                                       int col0) const {
    const int k0 = index * kStageK;
#pragma unroll
    for (int round = 0; round < L::kXChunks / kLargeThreads; ++round) {
      const bool ok = 32 * round < x_rows_left;
      copy16_async(stage + x_dst + 4096 * round, ok ? x + k0 + int64_t(32 * round) * p.k : p.x,
                   ok);
    }
    constexpr int kCodeRoundRows = kLargeThreads / (L::kColumns / 4);
#pragma unroll
    for (int round = 0; round * kLargeThreads < L::kCodeChunks; ++round) {
      if (L::kCodeChunks % kLargeThreads == 0 ||
          int(threadIdx.x) + round * kLargeThreads < L::kCodeChunks) {
        const int64_t row = k0 / L::kPerWord + round * kCodeRoundRows;
        copy16_async(stage + code_dst + round * kCodeRoundRows * L::kCodeRowBytes,
                     code_ok ? codes + row * p.n : p.codes, code_ok);
      }
    }
    // The scale (and offset) rows of the groups this stage touches, 8
    // columns a copy: one row, or two for 32-row groups.
    const int scale_rows = p.group_shift >= 6 ? 1 : L::kScaleRows;
    const int i = threadIdx.x;
    if (i < scale_rows * L::kScaleChunks) {
      const int r = i / L::kScaleChunks, c = i % L::kScaleChunks;
      const int group = p.group_shift >= 31 ? 0 : (k0 >> p.group_shift) + r;
      const int col = col0 + 8 * c;
      const bool ok = col < p.n;
      const int64_t at = int64_t(group) * p.n + col;
      const int dst = r * L::kScaleRowBytes + 16 * c;
      copy16_async(stage + L::kScaleOffset + dst, ok ? p.scales + at : p.scales, ok);
      if (!kSymmetric) {
        copy16_async(stage + L::kOffsetOffset + dst, ok ? p.offsets + at : p.offsets, ok);
      }
    }
  }
};

template <typename T, int kBits, bool kSymmetric, int kBlocks, int kRows>
__global__ void __launch_bounds__(kLargeThreads, (LargeConfig<kBits, kBlocks, kRows>::kCtasPerSm))
    gemm_large_m_kernel(StagedParams<T> p, int row_tiles) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = LargeConfig<kBits, kBlocks, kRows>;
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
  const int col0 = blockIdx.x / row_tiles * L::kColumns;
  const int stages = p.k / kStageK;

  if (stages == 0) {  // K = 0: y is zero (the wgmma loop below never runs)
    for (int i = threadIdx.x; i < kRows * L::kColumns; i += kLargeThreads) {
      const int m = row0 + i / L::kColumns, col = col0 + i % L::kColumns;
      if (m < p.m && col < p.n) p.y[int64_t(m) * p.n + col] = from_float<T>(0.f);
    }
    return;
  }

  // MMA rows g and g + 8 of warp `warp` in block b are the adjacent columns
  // column[b] and column[b] + 1 (relative to col0): one 8-byte read gets both
  // code words, one 4-byte read both scales, and the epilogue stores pairs.
  int column[kBlocks];
#pragma unroll
  for (int b = 0; b < kBlocks; ++b) column[b] = (group * kBlocks + b) * 64 + 16 * warp + 2 * g;

  const StageCopies<T, kBits, kSymmetric, kBlocks, kRows> copies(p, row0, col0);
  // Left unset: the first wgmma overwrites them (see wgmma.cuh).
  float acc[kBlocks][kRows / 2];
  // One A register set per step of a stage: the set of step s + 1 is filled
  // while the wgmmas of steps s - 1 and s run.
  uint32_t a[kStageK / 16][kBlocks][4];

  // Stage j lives in slot j % kStages. Every stage commits one group of
  // copies (empty past the end), so waiting for all but the newest
  // kStages - 3 groups is waiting for stage j.
#pragma unroll
  for (int i = 0; i < kStages - 2; ++i) {
    if (i < stages) copies.load(smem + i * L::kBytes, p, i, col0);
    commit_async();
  }
  auto begin_stage = [&](int j) {
    wait_async<kStages - 3>();
    wgmma::fence_async_shared();
    // Stage j is visible to every thread, and both warpgroups are past the
    // wgmmas of stage j - 2 (at most three groups, of stage j - 1, run), whose
    // slot is refilled now.
    __syncthreads();
    const int next = j + kStages - 2;
    if (next < stages) copies.load(smem + (next % kStages) * L::kBytes, p, next, col0);
    commit_async();
  };
  // The A fragments of rows 16 step .. + 15 of a stage.
  auto dequantize = [&](const char* stage, int step, uint32_t(&frag)[kBlocks][4]) {
    // Those rows are in scale row (16 step) >> shift of the stage.
    const int scale_row = p.group_shift >= 6 ? 0 : (16 * step) >> p.group_shift;
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
        // Rows 16 step + 8 half + 2t, + 1 of the stage: word row and code pair.
        const int row = 16 * step + 8 * half;
        const uint2 words = *reinterpret_cast<const uint2*>(
            stage + L::kCodeOffset + (row / L::kPerWord) * L::kCodeRowBytes + 4 * column[b]);
        const int pair = row % L::kPerWord / 2 + t;
        frag[b][2 * half] =
            Dq::pair(words.x, pair, as_pair<Pair>(scale[0]), as_pair<Pair>(offset[0]));
        frag[b][2 * half + 1] =
            Dq::pair(words.y, pair, as_pair<Pair>(scale[1]), as_pair<Pair>(offset[1]));
      }
    }
  };

  begin_stage(0);
  dequantize(smem, 0, a[0]);
  for (int j = 0; j < stages; ++j) {
    const char* stage = smem + (j % kStages) * L::kBytes;
    const uint32_t x_base = shared_address(stage);
#pragma unroll
    for (int step = 0; step < kStageK / 16; ++step) {
      // B: rows 16 step .. + 15 of K, 32 bytes into every 128-byte row of x.
      const uint64_t desc = wgmma::descriptor_sw128(x_base + 32 * step);
      wgmma::fence();
#pragma unroll
      for (int b = 0; b < kBlocks; ++b) {
        wgmma::Mma<T>::mma(acc[b], a[step][b], desc, j > 0 || step > 0);
      }
      wgmma::commit();
      if (step + 1 < kStageK / 16) {
        dequantize(stage, step + 1, a[step + 1]);
      } else if (j + 1 < stages) {
        begin_stage(j + 1);
        dequantize(smem + ((j + 1) % kStages) * L::kBytes, 0, a[0]);
      }
      wgmma::wait<2>();  // the wgmmas of two steps back are done
    }
  }
  wgmma::wait<0>();

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

template <typename T, int kBits, bool kSymmetric, int kBlocks, int kRows>
cudaError_t launch(const GemmArgs& args, int device, cudaStream_t stream) {
  using L = LargeConfig<kBits, kBlocks, kRows>;
  constexpr auto kernel = gemm_large_m_kernel<T, kBits, kSymmetric, kBlocks, kRows>;
  cudaError_t err = allow_shared_memory<kernel>(device, L::kSharedBytes);
  if (err != cudaSuccess) return err;
  const int row_tiles = (args.m + kRows - 1) / kRows;
  const int column_tiles = (args.n + L::kColumns - 1) / L::kColumns;
  kernel<<<row_tiles * column_tiles, kLargeThreads, L::kSharedBytes, stream>>>(
      staged_params<T>(args), row_tiles);
  return cudaGetLastError();
}

// The tile (columns x rows of x): 256 x 128 when that makes about a full
// wave of CTAs, else 128 x 64 (four times the CTAs). 128 x 256 (one m64n256
// block per warpgroup) was no faster on the H100 (docs/perf.md) and is not built.
template <typename T, int kBits, bool kSymmetric>
cudaError_t launch_tile(const GemmArgs& args, int device, cudaStream_t stream) {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t big_tiles = int64_t((args.n + 255) / 256) * ((args.m + 127) / 128);
  if (big_tiles >= sms * 9 / 10) {
    return launch<T, kBits, kSymmetric, 2, 128>(args, device, stream);
  }
  return launch<T, kBits, kSymmetric, 1, 64>(args, device, stream);
}

template <typename T>
cudaError_t launch_type(const GemmArgs& args, bool symmetric, int device, cudaStream_t stream) {
  if (args.bits == 4) {
    return symmetric ? launch_tile<T, 4, true>(args, device, stream)
                     : launch_tile<T, 4, false>(args, device, stream);
  }
  return symmetric ? launch_tile<T, 2, true>(args, device, stream)
                   : launch_tile<T, 2, false>(args, device, stream);
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
  if (p.n % 8 != 0) return ffi::Error::InvalidArgument("gemm (large M): needs N % 8 == 0");
  int device = 0, major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  }
  if (err != cudaSuccess) return launch_result(err);
  if (major != 9) {
    return ffi::Error::InvalidArgument("gemm (large M): the wgmma kernel needs an sm_90 GPU");
  }
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();
  return launch_result(x.element_type() == ffi::BF16
                           ? launch_type<__nv_bfloat16>(args, symmetric, device, stream)
                           : launch_type<__half>(args, symmetric, device, stream));
}

}  // namespace
}  // namespace jax_lowbit

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitGemmLargeMCuda, jax_lowbit::gemm_large_m_impl,
                              jax_lowbit::dense_gemm_binding(),
                              {xla::ffi::Traits::kCmdBufferCompatible});
