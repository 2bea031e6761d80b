// Fused y = x · dequant(W) for small M (decode): int4/int2 codes, bf16/fp16
// activations, f32 accumulation on mma.sync m16n8k16 tensor cores.
//
// The time is the weight bytes over HBM bandwidth, so the kernel streams the
// packed codes exactly as docs/formats.md stores them, 16 bytes per thread
// per load, and never stages them through shared memory.
//
// Mapping (weights are the A operand, x^T the B operand, so y^T = W^T x^T):
//  * A CTA owns 32 consecutive output columns and the whole of K; its warps
//    take K "steps" round-robin. A step is 4 word rows: lane (g, t) of a warp
//    (g = lane / 4, t = lane % 4) loads the uint4 at word row 4*step + t,
//    columns 4g .. 4g+3 of the CTA's strip: 8 lanes cover 128 contiguous
//    bytes of one word row, so a warp load is four full 128-byte lines.
//  * MMA rows are weight columns, MMA k-slots are rows of K. Which column and
//    which k a slot stands for is ours to choose as long as A and B agree:
//    row g is column 4g + 2p, row g + 8 is column 4g + 2p + 1 (p = 0, 1), and
//    lane t's k-slots (2t, 2t+1, 2t+8, 2t+9) are rows P*w + 4h + (0, 1, 2, 3)
//    of its own word w (h = 0 .. P/4 - 1). The format keeps rows 2i and 2i+1
//    in the two 16-bit halves at offset i*bits, so each A register is one
//    shift and mask of a word: pair 2h gives slots (2t, 2t+1), pair 2h + 1
//    gives (2t+8, 2t+9). Every code of the 16-byte load lands in a fragment.
//  * The matching B registers are x[m, P*w + 4h .. +1] and [.. +2 .. +3]: P
//    contiguous activations of row m = g (+8 per M tile), one 16-byte load
//    (32 for int2) from L2, shared by the two column pairs.
//  * Conversion by magic numbers: (code | 0x4300) as bf16 is 128 + code
//    (0x6400 = 1024 + code as fp16), so one lop3 gives two weights; one hsub2
//    removes the magic and the symmetric zero exactly, one hmul2 (hfma2 with
//    the offset for asymmetric weights) applies the scale: w rounds once, as
//    dequantize() to the activation dtype does.
//  * Deterministic reduction: each warp writes its partial sums to shared
//    memory and the CTA adds them in warp order, one M tile at a time.
// Requires N % 4 == 0 and K % (4 * P) == 0 (the dispatcher checks; other
// shapes take the dequantize + dot path), M <= 32. The handler at the end
// sends 33 to 64 rows to the mid-M kernel (gemm_mid_m.cu).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/dense_gemm_target.h"
#include "cuda/gemm_args.h"
#include "cuda/handlers.h"
#include "cuda/mma_fragments.cuh"
#include "cuda/small_m.cuh"
#include "format.h"
#include "weight_shape.h"

namespace jax_lowbit {
namespace {

namespace ffi = xla::ffi;

// The mid-M kernel (gemm_mid_m.cu) takes 33 to 64 rows.
constexpr int kMaxRows = 64;

template <typename T, int kBits, int kMTiles, bool kSymmetric>
__global__ void __launch_bounds__(kThreads, kCtasPerSm<kMTiles>)
    gemm_small_m_kernel(const T* __restrict__ x, const uint32_t* __restrict__ codes,
                        const T* __restrict__ scales, const T* __restrict__ offsets,
                        T* __restrict__ y, int m_rows, int k, int n, int group_shift) {
  using Act = Activation<T>;
  using Dq = Dequantizer<T, kBits, kSymmetric>;
  constexpr int kPerWord = codes_per_word(kBits);
  constexpr int kHalves = kPerWord / 4;          // MMA k16 steps per word
  constexpr int kXWords = kPerWord / 2;          // x pairs per lane per M tile
  // Steps whose loads are in flight together, within the registers a lane
  // has (64 when two CTAs share an SM).
  constexpr int kLoadsPerLane = kBits == 4 ? 4 : 2;
  constexpr int kUnroll = kMTiles >= kLoadsPerLane ? 1 : kLoadsPerLane / kMTiles;
  constexpr int kStride = kWarps * kUnroll;      // steps of one CTA iteration

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int strip = blockIdx.x * kColumns;
  const int col0 = strip + 4 * g;
  const bool col_ok = col0 < n;
  const int steps = k / (4 * kPerWord);

  float acc[kMTiles][2][4] = {};

  for (int base = warp; base < steps; base += kStride) {
    uint4 w[kUnroll];
    uint2 s[kUnroll];
    uint2 o[kUnroll];
    uint32_t xv[kUnroll][kMTiles][kXWords];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int step = base + u * kWarps;
      const int word_row = 4 * step + t;
      const bool ok = step < steps && col_ok;
      const int64_t sidx = int64_t((word_row * kPerWord) >> group_shift) * n + col0;
      w[u] = ok ? load_streaming(reinterpret_cast<const uint4*>(codes + int64_t(word_row) * n + col0))
                : make_uint4(0, 0, 0, 0);
      s[u] = ok ? __ldg(reinterpret_cast<const uint2*>(scales + sidx)) : make_uint2(0, 0);
      o[u] = (ok && !kSymmetric) ? __ldg(reinterpret_cast<const uint2*>(offsets + sidx))
                                 : make_uint2(0, 0);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        const int m = mt * 8 + g;
        const bool x_ok = step < steps && m < m_rows;
        const uint4* xp = reinterpret_cast<const uint4*>(x + int64_t(m) * k + word_row * kPerWord);
#pragma unroll
        for (int v = 0; v < kXWords / 4; ++v) {
          const uint4 xq = x_ok ? __ldg(xp + v) : make_uint4(0, 0, 0, 0);
          xv[u][mt][4 * v + 0] = xq.x;
          xv[u][mt][4 * v + 1] = xq.y;
          xv[u][mt][4 * v + 2] = xq.z;
          xv[u][mt][4 * v + 3] = xq.w;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      uint32_t scale[4], offset[4];
      broadcast_columns(s[u], scale);
      broadcast_columns(o[u], offset);
      const uint32_t word[4] = {w[u].x, w[u].y, w[u].z, w[u].w};
#pragma unroll
      for (int p = 0; p < 2; ++p) {
#pragma unroll
        for (int h = 0; h < kHalves; ++h) {
          uint32_t a[4];
          Dq::fragment(a, word, scale, offset, p, h);
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            Act::mma(acc[mt][p], a, xv[u][mt][2 * h], xv[u][mt][2 * h + 1]);
          }
        }
      }
    }
  }

  reduce_and_store<T, kMTiles>(acc, y, m_rows, n, strip);
}

// Launches the kernel for one activation type, M-tile count and symmetry.
struct DenseGemmLaunch {
  GemmArgs a;
  cudaStream_t stream;

  template <typename T, int kMTiles, bool kSymmetric>
  cudaError_t run() const {
    return a.bits == 4 ? run_bits<T, 4, kMTiles, kSymmetric>()
                       : run_bits<T, 2, kMTiles, kSymmetric>();
  }

  template <typename T, int kBits, int kMTiles, bool kSymmetric>
  cudaError_t run_bits() const {
    const int blocks = (a.n + kColumns - 1) / kColumns;
    gemm_small_m_kernel<T, kBits, kMTiles, kSymmetric><<<blocks, kThreads, 0, stream>>>(
        static_cast<const T*>(a.x), a.codes, static_cast<const T*>(a.scales),
        static_cast<const T*>(a.offsets), static_cast<T*>(a.y), a.m, a.k, a.n, a.group_shift);
    return cudaGetLastError();
  }
};

ffi::Error gemm_small_m_impl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::U32> codes,
                             ffi::AnyBuffer scales, ffi::AnyBuffer offsets,
                             ffi::Result<ffi::AnyBuffer> y, int32_t bits, int64_t group_size,
                             bool symmetric) {
  SmallMProblem p;
  GemmArgs args;
  // A step of the small-M kernel is 4 word rows.
  const ffi::Error error = dense_gemm_problem(
      x, codes, scales, offsets, y, bits, group_size,
      [](int valid_bits) { return 4 * codes_per_word(valid_bits); }, kMaxRows, p, args);
  if (error.failure()) return error;
  const auto dtype = x.element_type();
  if (p.m <= kSmallMMaxRows) {
    return launch_small_m(DenseGemmLaunch{args, stream}, p, dtype, symmetric);
  }
  if (p.n == 0) return ffi::Error::Success();
  return launch_result(dtype == ffi::BF16
                           ? launch_gemm_mid_m<__nv_bfloat16>(args, symmetric, stream)
                           : launch_gemm_mid_m<__half>(args, symmetric, stream));
}

}  // namespace
}  // namespace jax_lowbit

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitGemmSmallMCuda, jax_lowbit::gemm_small_m_impl,
                              jax_lowbit::dense_gemm_binding(),
                              {xla::ffi::Traits::kCmdBufferCompatible});
