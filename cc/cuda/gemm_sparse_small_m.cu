// Fused y = x · dequant(W) for small M with 2:4 sparse int4 weights
// (docs/formats.md, "2:4 sparse int4"): bf16/fp16 activations, f32
// accumulation on sparse tensor cores, mma.sp m16n8k32.
//
// The plan of gemm_small_m.cu (read it first) carries over: weights are the A
// operand and x^T the B operand (y^T = W^T x^T; A = W^T, the 2:4 pattern runs
// along K as mma.sp wants it, and y is transposed back by the epilogue); a
// CTA owns 32 output columns and the whole of K, its 16 warps take K steps
// round-robin; codes are read in place with one 16-byte load per lane and
// turned into weights by the magic-number conversion; the warps' partial sums
// are added in a fixed order. What the sparsity changes:
//  * A step is 4 code word rows = 64 rows of K (a word holds 4 quads). Lane
//    (g, t) of a warp (g = lane / 4, t = lane % 4) loads the uint4 of code
//    words at word row 4s + t, columns 4g .. 4g+3 of the CTA's strip, and the
//    uint2 of metadata entries at metadata row 4s + t, the same columns: 8
//    lanes read 128 (64) contiguous bytes of one row.
//  * MMA k-slots 4c .. 4c+3 form chunk c (c = 0..7); an A register holds the
//    two kept values of one chunk. The hardware gives chunk c to lane c % 4
//    (registers 0 and 1, rows g and g + 8, for c < 4; registers 2 and 3 for
//    c >= 4). Which rows of K a chunk stands for is ours to choose as long as
//    B agrees: in MMA h (h = 0, 1) chunk t is quad 2h and chunk t + 4 quad
//    2h + 1 of lane t's own word. A quad's two kept codes sit at one offset
//    of the two 16-bit halves of the word, so each A register is one code pair
//    of a loaded word, converted exactly as in the dense kernel; the four
//    quads of the 16-byte load feed two MMAs per column pair.
//  * MMA rows g and g + 8 are columns 4g + 2p and 4g + 2p + 1 (p = 0, 1).
//  * Metadata: with sparsity selector h the MMA reads its chunks' kept k-slots
//    from lanes 2h (chunks 0-3) and 2h + 1 (chunks 4-7) of each group of four
//    lanes, one 32-bit register each: MMA row g in the low half, g + 8 in the
//    high half, chunk j of the half in nibble j. MMA (p, h) runs with selector
//    h, so the lane reading chunks 4c .. 4c+3 is t = 2h + c, and those chunks
//    are quad 2h + c = t of word rows 4s .. 4s+3: the nibbles of metadata row
//    4s + t, which is what lane t loaded. Its columns 4g + 2p, 4g + 2p + 1 are
//    adjacent uint16 entries, one 32-bit word of its load: every lane passes
//    word p to both MMAs of column pair p, lanes 0-1 hold what selector 0
//    reads and lanes 2-3 what selector 1 reads. Nothing is shuffled.
//  * B: lane (g, t) holds k-slots 8i + 2t, 8i + 2t + 1 (i = 0..3) of x row
//    m = g (+8 per M tile). k-slot 8i + 2t is position 2(t & 1) of chunk
//    2i + (t >> 1), so in MMA h the lane's pairs are rows
//    16 (t >> 1) + 2 (t & 1) + 8h + {0, 32, 4, 36} of the step's 64 rows of x.
//    Every lane takes two of the four rows of each quad, so no wide load
//    covers only its own activations; lanes t and t ^ 1 take the other two,
//    so they load 16-byte runs and trade pairs by shuffles (load_x).
//  * Loads: the weight and x loads of kUnroll steps (2 with one M tile) are
//    issued before any MMA, within 64 registers a lane up to 2 M tiles.
// Requires N % 4 == 0 and K % 64 == 0 (the dispatcher checks; other shapes
// take the dequantize + dot path), M <= 32. The handler at the end runs it
// for M <= 32 and sends 33 to 64 rows to the staged kernel (gemm_sparse_mid_m.cu).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/gemm_args.h"
#include "cuda/handlers.h"
#include "cuda/mma_fragments.cuh"
#include "cuda/small_m.cuh"
#include "cuda/sparse_gemm_target.h"
#include "format.h"
#include "weight_shape.h"

namespace jax_lowbit {
namespace {

namespace ffi = xla::ffi;

constexpr int kStepRows = kSparseKMultiple;  // rows of K per step: 4 code word rows
// The handler runs this kernel up to kSmallMMaxRows (32) rows, the staged
// kernel (gemm_sparse_mid_m.cu) 33 to 64. On the H100 with the sparse wgmma
// kernel off, this kernel beat the staged one at 16, 24 and 32 rows
// (docs/perf.md, v15).
constexpr int kMaxRows = 64;

// x of one step. The B registers of MMA h are rows 8h + {0, 32, 4, 36} from
// the lane's first row (see above). Lanes t and t ^ 1 (same g, same t >> 1)
// together need two 32-byte runs of x row m, rows 16 (t >> 1) + 0..15 and
// 32 + 16 (t >> 1) + 0..15 of the step, and each needs the even or the odd
// pairs of both. So lane t loads run t & 1 in two 16-byte loads (load_x),
// keeps its pairs and trades the others with t ^ 1, one shuffle per two pairs
// (x_fragments): 2 loads and 4 shuffles per M tile and step instead of 8
// dependent 32-bit loads. Rows of x past M read as zeros.
template <typename T, int kMTiles>
__device__ __forceinline__ void load_x(uint4 (&runs)[kMTiles][2], const T* __restrict__ x,
                                       int m_rows, int k, int step, bool step_ok) {
  const int g = threadIdx.x % 32 / 4;
  const int t = threadIdx.x % 4;
  const int row = step * kStepRows + 32 * (t & 1) + 16 * (t >> 1);
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    const int m = mt * 8 + g;
    const uint4* run = reinterpret_cast<const uint4*>(x + int64_t(m) * k + row);
    const bool ok = step_ok && m < m_rows;
    runs[mt][0] = ok ? __ldg(run) : make_uint4(0, 0, 0, 0);
    runs[mt][1] = ok ? __ldg(run + 1) : make_uint4(0, 0, 0, 0);
  }
}

// The B registers b[h][mt] of both MMAs of a step from the loaded runs.
template <int kMTiles>
__device__ __forceinline__ void x_fragments(uint32_t (&b)[2][kMTiles][4],
                                            const uint4 (&runs)[kMTiles][2]) {
  const int run = threadIdx.x & 1;  // the run this lane loaded; it needs pairs run + 2r of both
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    const uint4& lo = runs[mt][0];
    const uint4& hi = runs[mt][1];
    const uint32_t pair[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      // Pair run + 2r (rows 4r from the lane's first row) of our run; the
      // partner's pair of that index in its run arrives for the one it needs
      // from ours. Run 0's goes to register 2 (r % 2) of MMA r / 2, run 1's
      // to the register after it.
      const uint32_t mine = run ? pair[2 * r + 1] : pair[2 * r];
      const uint32_t theirs =
          __shfl_xor_sync(0xffffffffu, run ? pair[2 * r] : pair[2 * r + 1], 1);
      b[r / 2][mt][2 * (r % 2)] = run ? theirs : mine;
      b[r / 2][mt][2 * (r % 2) + 1] = run ? mine : theirs;
    }
  }
}

// The MMAs with sparsity selector kH of one step: both column pairs, every M
// tile. Scales and offsets are broadcast here, next to their use, so that
// registers hold the packed values across the step (fewer live registers).
template <typename T, int kMTiles, bool kSymmetric, int kH>
__device__ __forceinline__ void mma_step(float (&acc)[kMTiles][2][4],
                                         const uint32_t (&b)[kMTiles][4], const uint4& codes,
                                         uint2 scales, uint2 offsets, uint2 metadata) {
  using Dq = Dequantizer<T, kSparseBits, kSymmetric>;
  uint32_t scale[4], offset[4];
  broadcast_columns(scales, scale);
  broadcast_columns(offsets, offset);
  const uint32_t word[4] = {codes.x, codes.y, codes.z, codes.w};
  const uint32_t meta[2] = {metadata.x, metadata.y};  // columns (4g, 4g+1), (4g+2, 4g+3)
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    uint32_t a[4];
    Dq::fragment(a, word, scale, offset, p, kH);
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      Activation<T>::template mma_sp<kH>(acc[mt][p], a, b[mt], meta[p]);
    }
  }
}

template <typename T, int kMTiles, bool kSymmetric>
__global__ void __launch_bounds__(kThreads, kCtasPerSm<kMTiles>)
    gemm_sparse_small_m_kernel(const T* __restrict__ x, const uint32_t* __restrict__ codes,
                               const uint16_t* __restrict__ metadata,
                               const T* __restrict__ scales, const T* __restrict__ offsets,
                               T* __restrict__ y, int m_rows, int k, int n, int group_shift) {
  // Steps whose loads are in flight together, within the registers a lane has
  // (64 when two CTAs share an SM; x takes 8 of them per M tile and step).
  constexpr int kUnroll = kMTiles == 1 ? 2 : 1;
  constexpr int kStride = kWarps * kUnroll;  // steps of one CTA iteration

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int strip = blockIdx.x * kColumns;
  const int col0 = strip + 4 * g;
  const bool col_ok = col0 < n;
  const int steps = k / kStepRows;

  float acc[kMTiles][2][4] = {};

  for (int base = warp; base < steps; base += kStride) {
    uint4 w[kUnroll];
    uint2 e[kUnroll];
    uint2 s[kUnroll];
    uint2 o[kUnroll];
    uint4 xr[kUnroll][kMTiles][2];  // the step's runs of x (load_x)
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int step = base + u * kWarps;
      const int word_row = 4 * step + t;  // code word row and metadata row alike
      const bool ok = step < steps && col_ok;
      const int64_t widx = int64_t(word_row) * n + col0;
      const int64_t sidx = int64_t((word_row * kSparseRowsPerWord) >> group_shift) * n + col0;
      w[u] = ok ? load_streaming(reinterpret_cast<const uint4*>(codes + widx))
                : make_uint4(0, 0, 0, 0);
      // Out of range, the codes are 0 and the scales 0, so the weights are 0;
      // their metadata must still be valid nibbles (0x4: rows 0, 1).
      e[u] = ok ? load_streaming_half_line(reinterpret_cast<const uint2*>(metadata + widx))
                : make_uint2(kNoMetadata, kNoMetadata);
      s[u] = ok ? __ldg(reinterpret_cast<const uint2*>(scales + sidx)) : make_uint2(0, 0);
      o[u] = (ok && !kSymmetric) ? __ldg(reinterpret_cast<const uint2*>(offsets + sidx))
                                 : make_uint2(0, 0);
      load_x<T, kMTiles>(xr[u], x, m_rows, k, step, step < steps);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      // MMA h takes quads 2h, 2h + 1 of the words and selector h; consecutive
      // MMAs go to different accumulators (p inside h) so they need not wait
      // on each other.
      uint32_t xb[2][kMTiles][4];
      x_fragments<kMTiles>(xb, xr[u]);
      mma_step<T, kMTiles, kSymmetric, 0>(acc, xb[0], w[u], s[u], o[u], e[u]);
      mma_step<T, kMTiles, kSymmetric, 1>(acc, xb[1], w[u], s[u], o[u], e[u]);
    }
  }

  reduce_and_store<T, kMTiles>(acc, y, m_rows, n, strip);
}

// Launches the kernel for one activation type, M-tile count and symmetry.
struct SparseGemmLaunch {
  SmallMProblem p;
  const uint32_t* codes;
  const uint16_t* metadata;
  cudaStream_t stream;

  template <typename T, int kMTiles, bool kSymmetric>
  cudaError_t run() const {
    const int blocks = (p.n + kColumns - 1) / kColumns;
    gemm_sparse_small_m_kernel<T, kMTiles, kSymmetric><<<blocks, kThreads, 0, stream>>>(
        static_cast<const T*>(p.x), codes, metadata, static_cast<const T*>(p.scales),
        static_cast<const T*>(p.offsets), static_cast<T*>(p.y), p.m, p.k, p.n, p.group_shift);
    return cudaGetLastError();
  }
};

ffi::Error gemm_sparse_small_m_impl(cudaStream_t stream, ffi::AnyBuffer x,
                                    ffi::Buffer<ffi::U32> codes, ffi::Buffer<ffi::U16> metadata,
                                    ffi::AnyBuffer scales, ffi::AnyBuffer offsets,
                                    ffi::Result<ffi::AnyBuffer> y, int32_t bits,
                                    int64_t group_size, bool symmetric) {
  SmallMProblem p;
  GemmArgs args;
  const ffi::Error error = sparse_gemm_problem(x, codes, metadata, scales, offsets, y, bits,
                                               group_size, kStepRows, kMaxRows, p, args);
  if (error.failure()) return error;
  const auto dtype = x.element_type();
  if (p.m <= kSmallMMaxRows) {
    return launch_small_m(SparseGemmLaunch{p, codes.typed_data(), metadata.typed_data(), stream},
                          p, dtype, symmetric);
  }
  if (p.n == 0) return ffi::Error::Success();
  const uint16_t* meta = metadata.typed_data();
  return launch_result(
      dtype == ffi::BF16
          ? launch_gemm_sparse_mid_m<__nv_bfloat16>(args, meta, symmetric, stream)
          : launch_gemm_sparse_mid_m<__half>(args, meta, symmetric, stream));
}

}  // namespace
}  // namespace jax_lowbit

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitSparseGemmSmallMCuda, jax_lowbit::gemm_sparse_small_m_impl,
                              jax_lowbit::sparse_gemm_binding(),
                              {xla::ffi::Traits::kCmdBufferCompatible});
