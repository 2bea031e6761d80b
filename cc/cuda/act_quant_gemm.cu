// W8A8 / W4A8 GEMM on int8 tensor cores: y[m, n] = dtype(s[m] * sum_g term),
// the arithmetic of docs/formats.md ("Quantized activations"), with xq, s and
// the activations' group sums t from the quantize_rows pre-pass and the
// weight's packed codes read in place as the A operand of mma.m16n8k32 s8.
//
// Mapping (that of gemm_small_m.cu; the fragments are SignedCodes in
// mma_fragments.cuh):
//  * A CTA owns 32 output columns and 8 or 16 rows of x (one or two M tiles);
//    more rows take more CTAs, and the row blocks of a strip are consecutive
//    CTAs, so they run together and all but the first read its codes from
//    L2. Its 16 warps split K. A step is 32 rows of K: lane
//    (g, t) loads 16 bytes of code words (int4: one word row, int8: two) of
//    columns 4g .. 4g+3 and, for each M tile, the 8 activations xq of the
//    same K rows of row g of the tile.
//  * Group sums p are int32, exact. A warp takes runs of consecutive steps
//    that hold whole groups, round robin, so a group never leaves its warp:
//    after the group's last step the warp turns p into the group's float32
//    term (scale, and offset and t for asymmetric weights) and adds it to its
//    float32 sums, groups in increasing order. A batch (the steps whose loads
//    are in flight together) lies within one group; the scales of the group
//    it ends are loaded with its codes, so their latency hides behind the
//    same loads.
//  * Addresses: lanes past N or M read a valid column or row instead (their
//    sums are never stored), pointers advance by whole steps, and only steps
//    past K are masked: the kernel is latency-bound on few warps (ncu,
//    docs/perf.md v13), so address arithmetic is time.
//  * One group (group_size -1) has no group boundary: runs of kUnroll steps,
//    and the warps' int32 partial sums are added (exactly) in shared memory
//    before the single term is formed: the CPU handler's bits.
//  * Several groups: the warps' float32 sums are added in warp order.
//  * Epilogue: y = dtype(acc * s[m]).
// Requires K % 32 == 0 and N % 4 == 0 (the lowering pads N; other K take the
// integer-dot path).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "act_quant.h"
#include "cuda/act_quant_target.h"
#include "cuda/convert.cuh"
#include "cuda/handlers.h"
#include "cuda/launch_status.h"
#include "cuda/mma_fragments.cuh"
#include "weight_shape.h"

namespace jax_lowbit {
namespace {

namespace ffi = xla::ffi;

constexpr int kWarps = 16;
constexpr int kThreads = kWarps * 32;
constexpr int kColumns = 32;   // output columns per CTA
constexpr int kStepRows = 32;  // K rows of one m16n8k32 step

// Four scales (or offsets) of a lane's four columns, kept as loaded (8 or 16
// bytes) until the group's term needs them.
template <typename S>
struct Quad {
  static constexpr bool kWide = sizeof(S) == 4;
  std::conditional_t<kWide, uint4, uint2> raw;

  __device__ __forceinline__ void load(const S* p) {
    raw = __ldg(reinterpret_cast<const decltype(raw)*>(p));
  }
  __device__ __forceinline__ float operator[](int i) const {
    if constexpr (kWide) {
      return __uint_as_float(word_of(raw, i));
    } else {
      const uint32_t word = i < 2 ? raw.x : raw.y;
      const auto bits = static_cast<unsigned short>((i & 1) ? word >> 16 : word);
      if constexpr (std::is_same_v<S, __half>) return __half2float(__ushort_as_half(bits));
      else return __bfloat162float(__ushort_as_bfloat16(bits));
    }
  }
};

// The float32 sums of finished groups live in shared memory, not registers,
// so that a lane needs at most 64 registers and two CTAs (32 warps) share an
// SM: one CTA's reduction and start then overlap the other's loads, and twice
// the warps hide the loads' latency (one CTA of 16 warps issued 0.37
// instructions a cycle at M = 16, 10 cycles apart per warp, DRAM at 41%:
// docs/perf.md v13).
constexpr int kCtasPerSm = 2;

// A CTA takes one M tile (up to 8 rows) or two; more rows take more CTAs
// (four tiles a CTA, one CTA per SM, were 9% slower at 32 rows).
constexpr int kMaxMTiles = 2;

// CTAs along M: the row blocks of one column strip, consecutive in the grid.
template <int kMTiles>
__host__ __device__ __forceinline__ int row_blocks(int m) {
  return (m + 8 * kMTiles - 1) / (8 * kMTiles);
}

// Steps whose loads are in flight together: four 16-byte code loads a lane
// with one M tile, two with two tiles (the accumulators and activations take
// the registers).
template <int kBits, int kMTiles>
constexpr int kUnroll = (4 / kMTiles) / SignedCodes<kBits>::kLoads > 0
                            ? (4 / kMTiles) / SignedCodes<kBits>::kLoads
                            : 1;

// Calls f(p, i) for the 8 accumulator registers of a lane in one M tile:
// register i of MMA p is weight column 2p + i / 2 (MMA row g or g + 8) of
// activation row 2t + i % 2 of the tile.
template <typename F>
__device__ __forceinline__ void for_each_register(F&& f) {
#pragma unroll
  for (int p = 0; p < 2; ++p) {
#pragma unroll
    for (int i = 0; i < 4; ++i) f(p, i);
  }
}

// A warp's sums in shared memory: kRows rows of kColumns, each pair of rows
// one bank further (element (r, c) at r * kColumns + c + r / 2), so that the
// lanes adding accumulator register i of MMA p (row 2t + i % 2, column
// 4g + 2p + i / 2) hit 32 distinct banks (4g + t + const).
template <int kRows>
constexpr int kWarpSums = kRows * kColumns + kRows / 2;
__device__ __forceinline__ int sum_index(int row, int col) {
  return row * kColumns + col + row / 2;
}

template <typename S, int kBits, bool kSymmetric, int kMTiles>
__global__ void __launch_bounds__(kThreads, kCtasPerSm)
    act_quant_gemm_kernel(const ActQuantArgs args) {
  using Codes = SignedCodes<kBits>;
  constexpr int kSteps = kUnroll<kBits, kMTiles>;
  const S* scales = static_cast<const S*>(args.scales);
  const S* offsets = static_cast<const S*>(args.offsets);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  // The row blocks of one strip are consecutive CTAs, so they run together
  // and all but the first read the strip's codes from L2.
  const int blocks = row_blocks<kMTiles>(args.m);
  const int strip = int(blockIdx.x / blocks) * kColumns;
  const int col0 = strip + 4 * g;
  const int row0 = int(blockIdx.x % blocks) * (8 * kMTiles);
  const int steps = args.k / kStepRows;
  const bool one_group = args.groups == 1;
  const int group_steps = args.group_steps;
  const int group_shift = __ffs(group_steps) - 1;  // a power of two
  // A batch of steps has its loads in flight together and ends no group but
  // at its last step, so one set of scales serves it (groups of fewer steps
  // than kSteps get shorter batches).
  const int batch = one_group ? kSteps : min(group_steps, kSteps);
  const int run_steps = one_group ? kSteps : max(group_steps, kSteps);

  // Lanes past N read the last four columns and lanes past M the last row
  // instead: their sums are never stored, and no load needs a predicate but
  // for steps past K. Pointers advance by whole steps from these.
  const int col_read = min(col0, args.n - 4);  // N % 4 == 0
  const int64_t step_words = (Codes::word_row(1, 0, 0) - Codes::word_row(0, 0, 0)) * args.n;
  const uint32_t* codes_lane[Codes::kLoads];
#pragma unroll
  for (int l = 0; l < Codes::kLoads; ++l) {
    codes_lane[l] = args.codes + Codes::word_row(0, t, l) * args.n + col_read;
  }
  const int8_t* x_lane[kMTiles];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    x_lane[mt] = args.xq + int64_t{min(row0 + mt * 8 + g, args.m - 1)} * args.k + 8 * t;
  }

  // Each warp's float32 sums of finished groups, and at the end the warps'
  // sums for the epilogue (int32 with one group, float32 bits otherwise).
  constexpr int kRows = 8 * kMTiles;
  __shared__ uint32_t sums[kWarps][kWarpSums<kRows>];
  if (!one_group) {
    for (int i = lane; i < kWarpSums<kRows>; i += 32) sums[warp][i] = 0;
    __syncwarp();
  }

  int32_t iacc[kMTiles][2][4] = {};
  // A finished group's int32 sums join the float32 sums as its term.
  const auto add_terms = [&](const Quad<S>& scale, const Quad<S>& offset,
                             const int32_t (&tsum)[kMTiles][2]) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      for_each_register([&](int p, int i) {
        const int c = 2 * p + i / 2;
        const float term = group_term(iacc[mt][p][i] >> Codes::kProductShift, tsum[mt][i % 2],
                                      kBits, kSymmetric, scale[c], offset[c]);
        uint32_t& sum = sums[warp][sum_index(mt * 8 + 2 * t + i % 2, 4 * g + c)];
        sum = __float_as_uint(add_rn(__uint_as_float(sum), term));
        iacc[mt][p][i] = 0;
      });
    }
  };

  for (int run = warp * run_steps; run < steps; run += kWarps * run_steps) {
    for (int base = run; base < run + run_steps && base < steps; base += batch) {
      uint4 words[kSteps][Codes::kLoads];
      uint2 xv[kSteps][kMTiles];
      const int64_t codes_offset = base * step_words;
      const int x_offset = base * kStepRows;
      // One test for a whole batch (the common case), not one per step.
      const bool whole = batch == kSteps && base + kSteps <= steps;
#pragma unroll
      for (int u = 0; u < kSteps; ++u) {
        const bool in_batch = whole || (u < batch && base + u < steps);
#pragma unroll
        for (int l = 0; l < Codes::kLoads; ++l) {
          const auto* p = reinterpret_cast<const uint4*>(codes_lane[l] + codes_offset +
                                                         u * step_words);
          words[u][l] = in_batch ? load_streaming(p) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          const auto* p = reinterpret_cast<const uint2*>(x_lane[mt] + x_offset + u * kStepRows);
          xv[u][mt] = in_batch ? __ldg(p) : make_uint2(0, 0);
        }
      }
      const bool ends_group = !one_group && ((base + batch) & (group_steps - 1)) == 0;
      const int group = (base + batch - 1) >> group_shift;
      Quad<S> scale = {};
      Quad<S> offset = {};
      int32_t tsum[kMTiles][2] = {};  // t of rows 2t, 2t + 1 of each tile
      if (ends_group) {
        scale.load(scales + int64_t{group} * args.n + col_read);
        if (!kSymmetric) offset.load(offsets + int64_t{group} * args.n + col_read);
#pragma unroll
        for (int mt = 0; mt < kMTiles && !kSymmetric; ++mt) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int m = min(row0 + mt * 8 + 2 * t + r, args.m - 1);
            tsum[mt][r] = __ldg(args.group_sums + int64_t{group} * args.m + m);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kSteps; ++u) {
        if (u >= batch) break;  // shorter batches of small groups
        uint32_t b[kMTiles][2];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) Codes::b_fragment(xv[u][mt], b[mt][0], b[mt][1]);
#pragma unroll
        for (int p = 0; p < 2; ++p) {
          uint32_t a[4];
          Codes::a_fragment(words[u], p, a);
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) mma_s8(iacc[mt][p], a, b[mt][0], b[mt][1]);
        }
      }
      if (ends_group) add_terms(scale, offset, tsum);
    }
  }

  // The warps' sums are added in warp order; with one group they are still
  // the int32 sums in registers.
  if (one_group) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      for_each_register([&](int p, int i) {
        sums[warp][sum_index(mt * 8 + 2 * t + i % 2, 4 * g + 2 * p + i / 2)] =
            static_cast<uint32_t>(iacc[mt][p][i]);
      });
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kRows * kColumns; i += kThreads) {
    const int r = i / kColumns;
    const int c = i % kColumns;
    const int m = row0 + r;
    const int col = strip + c;
    if (m >= args.m || col >= args.n) continue;
    float acc = 0.f;
    if (one_group) {
      uint32_t sum = 0;  // wraps modulo 2^32 like the spec's int32 sums
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += sums[w][sum_index(r, c)];
      const int32_t p = static_cast<int32_t>(sum) >> Codes::kProductShift;
      acc = add_rn(acc, group_term(p, kSymmetric ? 0 : args.group_sums[m], kBits, kSymmetric,
                                   to_float(scales[col]),
                                   kSymmetric ? 0.f : to_float(offsets[col])));
    } else {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) acc = add_rn(acc, __uint_as_float(sums[w][sum_index(r, c)]));
    }
    store_output(args.y, int64_t{m} * args.n + col, mul_rn(acc, args.x_scales[m]),
                 args.out_type);
  }
}

template <typename S, int kBits, bool kSymmetric, int kMTiles>
cudaError_t launch_gemm(const ActQuantArgs& args, cudaStream_t stream) {
  const int64_t ctas = int64_t{(args.n + kColumns - 1) / kColumns} * row_blocks<kMTiles>(args.m);
  if (ctas > INT32_MAX) return cudaErrorInvalidConfiguration;
  act_quant_gemm_kernel<S, kBits, kSymmetric, kMTiles>
      <<<unsigned(ctas), kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

template <typename S, int kBits, bool kSymmetric>
cudaError_t dispatch_tiles(const ActQuantArgs& args, cudaStream_t stream) {
  return args.m <= 8 ? launch_gemm<S, kBits, kSymmetric, 1>(args, stream)
                     : launch_gemm<S, kBits, kSymmetric, kMaxMTiles>(args, stream);
}

template <typename S>
cudaError_t dispatch_format(const ActQuantArgs& args, bool symmetric,
                            cudaStream_t stream) {
  if (args.bits == 8) {
    return symmetric ? dispatch_tiles<S, 8, true>(args, stream)
                     : dispatch_tiles<S, 8, false>(args, stream);
  }
  return symmetric ? dispatch_tiles<S, 4, true>(args, stream)
                   : dispatch_tiles<S, 4, false>(args, stream);
}

ffi::Error act_quant_gemm_impl(cudaStream_t stream, ffi::Buffer<ffi::S8> xq,
                               ffi::Buffer<ffi::F32> x_scales,
                               ffi::Buffer<ffi::S32> group_sums, ffi::Buffer<ffi::U32> codes,
                               ffi::AnyBuffer scales, ffi::AnyBuffer offsets,
                               ffi::Result<ffi::AnyBuffer> y, int32_t bits, int64_t group_size,
                               bool symmetric) {
  ActQuantArgs args;
  ffi::Error error =
      act_quant_problem("act_quant_gemm", xq, x_scales, group_sums, codes, scales, offsets, y,
                        bits, group_size, kStepRows, 4, INT32_MAX, args);
  if (error.failure()) return error;
  if (args.m == 0 || args.n == 0) return ffi::Error::Success();
  return launch_status(
      args.scale_type == FloatType::kF32    ? dispatch_format<float>(args, symmetric, stream)
      : args.scale_type == FloatType::kBF16 ? dispatch_format<__nv_bfloat16>(args, symmetric, stream)
                                            : dispatch_format<__half>(args, symmetric, stream),
      "act_quant_gemm");
}

}  // namespace
}  // namespace jax_lowbit

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitActQuantGemmCuda, jax_lowbit::act_quant_gemm_impl,
                              jax_lowbit::act_quant_binding(),
                              {xla::ffi::Traits::kCmdBufferCompatible});
