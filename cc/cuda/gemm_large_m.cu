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
//    slots 2t, 2t + 1 (registers 0, 1) and 2t + 8, 2t + 9 (2, 3). B comes
//    from x in its natural order (k slot s of step j is row 16j + s of K), so
//    the lane's slots are code pair t of the word holding rows 16j .. 16j + 7
//    and of the one holding 16j + 8 .. 16j + 15 (int4), or pairs t and t + 4
//    of the word holding all 16 rows (int2). Each A register is one shift,
//    one lop3, one hsub2 and one hmul2 (hfma2 with offsets) of a code word:
//    the magic-number conversion of the small-M kernel (mma_fragments.cuh).
//  * Operands arrive by cp.async in a ring of kStages stages of 64 rows of
//    K: x in the wgmma 128-byte swizzle K-major layout (a stage of one row
//    of x is 128 bytes; its 16-byte chunk c goes to chunk c ^ (m % 8), see
//    wgmma.cuh; 8 threads copy one row's 128 contiguous bytes), and the code
//    words row by row as stored. Lanes read their words from shared memory;
//    the four lanes of a quad read the same word (a broadcast).
//  * wgmma is asynchronous: the A registers of step j are dequantized while
//    the wgmmas of step j - 1 run, alternating two register sets, and each
//    warpgroup keeps at most one group of wgmmas in flight past a step. A
//    ring slot is refilled two stages after it was read, so the wgmma group
//    still in flight at a stage boundary never reads a slot being written.
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
#include "cuda/handlers.h"
#include "cuda/kernel_attributes.h"
#include "cuda/mma_fragments.cuh"
#include "cuda/small_m.cuh"
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

template <typename T>
struct LargeParams {
  const T* x;
  const uint32_t* codes;
  const T* scales;
  const T* offsets;
  T* y;
  int m, k, n, group_shift, row_tiles;
};

template <int kBits, int kBlocks, int kRows>
struct LargeConfig {
  static constexpr int kColumns = 64 * kBlocks * kWarpGroups;
  static constexpr int kPerWord = codes_per_word(kBits);
  static constexpr int kWordRows = kStageK / kPerWord;
  static constexpr int kXBytes = kRows * kStageK * 2;
  static constexpr int kCodeRowBytes = kColumns * 4;
  static constexpr int kBytes = kXBytes + kWordRows * kCodeRowBytes;
  static constexpr int kSharedBytes = kStages * kBytes;
  static_assert(kXBytes % 1024 == 0 && kBytes % 1024 == 0, "stages must stay 1024-byte aligned");
  // Two CTAs per SM when the accumulators are small (64 x 64 per warpgroup),
  // so one CTA's loads and dequantization overlap the other's wgmmas.
  static constexpr int kCtasPerSm = kBlocks * kRows <= 64 ? 2 : 1;
};

template <typename T, int kBits, int kBlocks, int kRows>
__device__ __forceinline__ void load_stage(char* stage, const LargeParams<T>& p, int index,
                                           int row0, int col0) {
  using L = LargeConfig<kBits, kBlocks, kRows>;
  const int k0 = index * kStageK;
  // x: chunk i of the stage is K chunk c = i % 8 of tile row r = i / 8.
  for (int i = threadIdx.x; i < kRows * (kStageK / 8); i += kLargeThreads) {
    const int r = i / 8, c = i % 8;
    const int m = row0 + r;
    const bool ok = m < p.m;
    copy16_async(stage + 128 * r + 16 * (c ^ (r % 8)),
                 ok ? p.x + int64_t(m) * p.k + k0 + 8 * c : p.x, ok);
  }
  char* codes = stage + L::kXBytes;
  const int word_row0 = k0 / L::kPerWord;
  for (int i = threadIdx.x; i < L::kWordRows * (L::kColumns / 4); i += kLargeThreads) {
    const int r = i / (L::kColumns / 4), c = i % (L::kColumns / 4);
    const int col = col0 + 4 * c;
    const bool ok = col < p.n;
    copy16_async(codes + r * L::kCodeRowBytes + 16 * c,
                 ok ? p.codes + int64_t(word_row0 + r) * p.n + col : p.codes, ok);
  }
}

// One scale (or offset) per column, in both lanes of a pair; 0 past N.
template <typename T>
__device__ __forceinline__ uint32_t column_pair(const T* values, int64_t at, bool ok) {
  const uint32_t v = ok ? __ldg(reinterpret_cast<const unsigned short*>(values) + at) : 0u;
  return v * 0x00010001u;
}

template <typename T, int kBits, bool kSymmetric, int kBlocks, int kRows>
__global__ void __launch_bounds__(kLargeThreads, (LargeConfig<kBits, kBlocks, kRows>::kCtasPerSm))
    gemm_large_m_kernel(LargeParams<T> p) {
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
  const int row0 = blockIdx.x % p.row_tiles * kRows;
  const int col0 = blockIdx.x / p.row_tiles * L::kColumns;
  const int stages = p.k / kStageK;

  // This lane's two columns in block b (MMA rows g and g + 8), relative to col0.
  int column[kBlocks];
#pragma unroll
  for (int b = 0; b < kBlocks; ++b) column[b] = (group * kBlocks + b) * 64 + 16 * warp + g;

  if (stages == 0) {  // K = 0: y is zero (the wgmma loop below never runs)
    for (int i = threadIdx.x; i < kRows * L::kColumns; i += kLargeThreads) {
      const int m = row0 + i / L::kColumns, col = col0 + i % L::kColumns;
      if (m < p.m && col < p.n) p.y[int64_t(m) * p.n + col] = from_float<T>(0.f);
    }
    return;
  }
  // Left unset: the first wgmma overwrites them (see wgmma.cuh).
  float acc[kBlocks][kRows / 2];
  uint32_t a[2][kBlocks][4];
  uint32_t scale[kBlocks][2], offset[kBlocks][2];
  int scale_group = -1;

  // Stage j lives in slot j % kStages. Every iteration commits one group of
  // copies (empty past the end), so waiting for all but the newest
  // kStages - 3 groups is waiting for stage j.
#pragma unroll
  for (int i = 0; i < kStages - 2; ++i) {
    if (i < stages) {
      load_stage<T, kBits, kBlocks, kRows>(smem + i * L::kBytes, p, i, row0, col0);
    }
    commit_async();
  }
  for (int j = 0; j < stages; ++j) {
    wait_async<kStages - 3>();
    wgmma::fence_async_shared();
    // Stage j is visible to every thread, and both warpgroups are past the
    // wgmmas of stage j - 2, whose slot is refilled now.
    __syncthreads();
    const int next = j + kStages - 2;
    if (next < stages) {
      load_stage<T, kBits, kBlocks, kRows>(smem + (next % kStages) * L::kBytes, p, next, row0,
                                           col0);
    }
    commit_async();

    const char* stage = smem + (j % kStages) * L::kBytes;
    const uint32_t* words = reinterpret_cast<const uint32_t*>(stage + L::kXBytes);
    const uint32_t x_base = shared_address(stage);
#pragma unroll
    for (int step = 0; step < kStageK / 16; ++step) {
      const int k_row = j * kStageK + 16 * step;
      const int step_group = p.group_shift >= 31 ? 0 : k_row >> p.group_shift;
      if (step_group != scale_group) {  // groups have >= 32 rows: at most every other step
        scale_group = step_group;
#pragma unroll
        for (int b = 0; b < kBlocks; ++b) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int col = col0 + column[b] + 8 * h;
            const int64_t at = int64_t(step_group) * p.n + col;
            scale[b][h] = column_pair(p.scales, at, col < p.n);
            offset[b][h] = kSymmetric ? 0u : column_pair(p.offsets, at, col < p.n);
          }
        }
      }
      uint32_t(&frag)[kBlocks][4] = a[step % 2];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        // Rows 16 step + 8 half + 2t, + 1 of the stage: word row and code pair.
        const int row = 16 * step + 8 * half;
        const int word_row = row / L::kPerWord;
        const int pair = row % L::kPerWord / 2 + t;
#pragma unroll
        for (int b = 0; b < kBlocks; ++b) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t word = words[word_row * L::kColumns + column[b] + 8 * h];
            frag[b][2 * half + h] = Dq::pair(word, pair, as_pair<Pair>(scale[b][h]),
                                             as_pair<Pair>(offset[b][h]));
          }
        }
      }
      // B: rows 16 step .. + 15 of K, 32 bytes into every 128-byte row of x.
      const uint64_t desc = wgmma::descriptor_sw128(x_base + 32 * step);
      wgmma::fence();
#pragma unroll
      for (int b = 0; b < kBlocks; ++b) {
        wgmma::Mma<T>::mma(acc[b], frag[b], desc, j > 0 || step > 0);
      }
      wgmma::commit();
      wgmma::wait<1>();
    }
  }
  wgmma::wait<0>();

  // Accumulator i of block b: MMA row g + 8 (i / 2 % 2) (a column), MMA
  // column 8 (i / 4) + 2t + i % 2 (a row of x).
#pragma unroll
  for (int b = 0; b < kBlocks; ++b) {
#pragma unroll
    for (int i = 0; i < kRows / 2; ++i) {
      const int m = row0 + 8 * (i / 4) + 2 * t + i % 2;
      const int col = col0 + column[b] + 8 * (i / 2 % 2);
      if (m < p.m && col < p.n) p.y[int64_t(m) * p.n + col] = from_float<T>(acc[b][i]);
    }
  }
#else
  __trap();  // the handler launches this kernel only on sm_90
#endif
}

template <typename T, int kBits, bool kSymmetric, int kBlocks, int kRows>
cudaError_t launch(const SmallMProblem& problem, const uint32_t* codes, int device,
                   cudaStream_t stream) {
  using L = LargeConfig<kBits, kBlocks, kRows>;
  constexpr auto kernel = gemm_large_m_kernel<T, kBits, kSymmetric, kBlocks, kRows>;
  cudaError_t err = allow_shared_memory<kernel>(device, L::kSharedBytes);
  if (err != cudaSuccess) return err;
  const int row_tiles = (problem.m + kRows - 1) / kRows;
  const int column_tiles = (problem.n + L::kColumns - 1) / L::kColumns;
  const LargeParams<T> params{static_cast<const T*>(problem.x), codes,
                              static_cast<const T*>(problem.scales),
                              static_cast<const T*>(problem.offsets), static_cast<T*>(problem.y),
                              problem.m, problem.k, problem.n, problem.group_shift, row_tiles};
  kernel<<<row_tiles * column_tiles, kLargeThreads, L::kSharedBytes, stream>>>(params);
  return cudaGetLastError();
}

// The tile: 256 columns x 128 rows (the least operand traffic per MMA) when
// that makes about one full wave of CTAs, else 128 x 64 (four times the CTAs).
template <typename T, int kBits, bool kSymmetric>
cudaError_t launch_tile(const SmallMProblem& p, const uint32_t* codes, int device,
                        cudaStream_t stream) {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t big_tiles = int64_t((p.n + 255) / 256) * ((p.m + 127) / 128);
  if (big_tiles >= sms * 9 / 10) {
    return launch<T, kBits, kSymmetric, 2, 128>(p, codes, device, stream);
  }
  return launch<T, kBits, kSymmetric, 1, 64>(p, codes, device, stream);
}

template <typename T>
cudaError_t launch_type(const SmallMProblem& p, const uint32_t* codes, int bits, bool symmetric,
                        int device, cudaStream_t stream) {
  if (bits == 4) {
    return symmetric ? launch_tile<T, 4, true>(p, codes, device, stream)
                     : launch_tile<T, 4, false>(p, codes, device, stream);
  }
  return symmetric ? launch_tile<T, 2, true>(p, codes, device, stream)
                   : launch_tile<T, 2, false>(p, codes, device, stream);
}

ffi::Error gemm_large_m_impl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::U32> codes,
                             ffi::AnyBuffer scales, ffi::AnyBuffer offsets,
                             ffi::Result<ffi::AnyBuffer> y, int32_t bits, int64_t group_size,
                             bool symmetric) {
  WeightShape w;
  ffi::Error error = weight_shape(codes.dimensions(), scales.dimensions(),
                                  offsets.dimensions(), bits, group_size, w);
  if (error.failure()) return error;
  if (bits != 2 && bits != 4) return ffi::Error::InvalidArgument("gemm: bits must be 2 or 4");
  SmallMProblem p;
  error = small_m_problem(x, scales, offsets, y, w, kStageK, INT32_MAX, p);
  if (error.failure()) return error;
  if (p.n % 8 != 0) return ffi::Error::InvalidArgument("gemm (large M): needs N % 8 == 0");
  int device = 0, major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return launch_result(err);
  if (major != 9) {
    return ffi::Error::InvalidArgument("gemm (large M): the wgmma kernel needs an sm_90 GPU");
  }
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();
  return launch_result(x.element_type() == ffi::BF16
                           ? launch_type<__nv_bfloat16>(p, codes.typed_data(), w.bits, symmetric,
                                                        device, stream)
                           : launch_type<__half>(p, codes.typed_data(), w.bits, symmetric, device,
                                                 stream));
}

}  // namespace
}  // namespace jax_lowbit

// Symmetric weights pass their scales in the offsets slot; it is not read.
XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitGemmLargeMCuda, jax_lowbit::gemm_large_m_impl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<bool>("symmetric"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
