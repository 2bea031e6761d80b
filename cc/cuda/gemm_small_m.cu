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
#include <string>

#include "cuda/convert.cuh"
#include "cuda/gemm_args.h"
#include "cuda/handlers.h"
#include "cuda/m_tiles.cuh"
#include "cuda/mma_fragments.cuh"
#include "format.h"
#include "weight_shape.h"

namespace jax_lowbit {
namespace {

namespace ffi = xla::ffi;

constexpr int kWarps = 16;
constexpr int kThreads = kWarps * 32;
constexpr int kColumns = 32;  // output columns per CTA

constexpr int kSmallMMaxRows = 32;  // this file's kernel
constexpr int kMaxRows = 64;        // with the mid-M kernel (gemm_mid_m.cu)



// Up to 16 rows two CTAs share an SM, so one CTA's dequantize, MMAs and
// reduction overlap the other's loads (with one, every SM idled its DRAM
// queue between CTAs). 17 to 32 rows need one CTA's 128 registers a lane.
template <int kMTiles>
constexpr int kCtasPerSm = kMTiles <= 2 ? 2 : 1;

template <typename T, int kBits, int kMTiles, bool kSymmetric>
__global__ void __launch_bounds__(kThreads, kCtasPerSm<kMTiles>)
    gemm_small_m_kernel(const T* __restrict__ x, const uint32_t* __restrict__ codes,
                        const T* __restrict__ scales, const T* __restrict__ offsets,
                        T* __restrict__ y, int m_rows, int k, int n, int group_shift) {
  using Act = Activation<T>;
  using Pair = typename Act::Pair;
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
      // Per-column scale and offset, each broadcast to both lanes of a pair.
      const uint32_t scale[4] = {broadcast_low(s[u].x), broadcast_high(s[u].x),
                                 broadcast_low(s[u].y), broadcast_high(s[u].y)};
      const uint32_t offset[4] = {broadcast_low(o[u].x), broadcast_high(o[u].x),
                                  broadcast_low(o[u].y), broadcast_high(o[u].y)};
      const uint32_t word[4] = {w[u].x, w[u].y, w[u].z, w[u].w};
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        const int ca = 2 * p, cb = 2 * p + 1;  // MMA rows g and g + 8
#pragma unroll
        for (int h = 0; h < kHalves; ++h) {
          const uint32_t a[4] = {
              Dq::pair(word[ca], 2 * h, as_pair<Pair>(scale[ca]), as_pair<Pair>(offset[ca])),
              Dq::pair(word[cb], 2 * h, as_pair<Pair>(scale[cb]), as_pair<Pair>(offset[cb])),
              Dq::pair(word[ca], 2 * h + 1, as_pair<Pair>(scale[ca]), as_pair<Pair>(offset[ca])),
              Dq::pair(word[cb], 2 * h + 1, as_pair<Pair>(scale[cb]), as_pair<Pair>(offset[cb]))};
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            Act::mma(acc[mt][p], a, xv[u][mt][2 * h], xv[u][mt][2 * h + 1]);
          }
        }
      }
    }
  }

  // Deterministic split-K: partial sums of every warp, added in warp order,
  // one M tile (8 rows) at a time to keep shared memory at 16 KB.
  __shared__ float partial[kWarps][8][kColumns];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const int c = 4 * g + 2 * p;  // accumulator rows g, g + 8 -> columns c, c + 1
      const int r = 2 * t;          // accumulator columns 2t, 2t + 1 -> rows r, r + 1
      partial[warp][r][c] = acc[mt][p][0];
      partial[warp][r + 1][c] = acc[mt][p][1];
      partial[warp][r][c + 1] = acc[mt][p][2];
      partial[warp][r + 1][c + 1] = acc[mt][p][3];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < 8 * kColumns; i += kThreads) {
      const int m = mt * 8 + i / kColumns;
      const int col = strip + i % kColumns;
      if (m < m_rows && col < n) {
        float sum = 0.f;
#pragma unroll
        for (int wi = 0; wi < kWarps; ++wi) sum += partial[wi][i / kColumns][i % kColumns];
        y[int64_t(m) * n + col] = from_float<T>(sum);
      }
    }
    __syncthreads();
  }
}

template <typename T, int kBits, int kMTiles, bool kSymmetric>
cudaError_t launch_gemm(const GemmArgs& args, cudaStream_t stream) {
  const int blocks = (args.n + kColumns - 1) / kColumns;
  gemm_small_m_kernel<T, kBits, kMTiles, kSymmetric><<<blocks, kThreads, 0, stream>>>(
      static_cast<const T*>(args.x), args.codes, static_cast<const T*>(args.scales),
      static_cast<const T*>(args.offsets), static_cast<T*>(args.y), args.m, args.k, args.n,
      args.group_shift);
  return cudaGetLastError();
}

template <typename T, int kBits, int kMTiles>
cudaError_t launch_symmetry(const GemmArgs& args, bool symmetric, cudaStream_t stream) {
  return symmetric ? launch_gemm<T, kBits, kMTiles, true>(args, stream)
                   : launch_gemm<T, kBits, kMTiles, false>(args, stream);
}

template <typename T, int kBits>
cudaError_t dispatch_tiles(const GemmArgs& args, bool symmetric, cudaStream_t stream) {
  return with_m_tiles(args.m, [&](auto tiles) {
    return launch_symmetry<T, kBits, decltype(tiles)::value>(args, symmetric, stream);
  });
}

template <typename T>
cudaError_t dispatch_bits(const GemmArgs& args, bool symmetric, cudaStream_t stream) {
  return args.bits == 4 ? dispatch_tiles<T, 4>(args, symmetric, stream)
                        : dispatch_tiles<T, 2>(args, symmetric, stream);
}

ffi::Error gemm_small_m_impl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::U32> codes,
                             ffi::AnyBuffer scales, ffi::AnyBuffer offsets,
                             ffi::Result<ffi::AnyBuffer> y, int32_t bits, int64_t group_size,
                             bool symmetric) {
  WeightShape w;
  ffi::Error shape_error = weight_shape(codes.dimensions(), scales.dimensions(),
                                        offsets.dimensions(), bits, group_size, w);
  if (shape_error.failure()) return shape_error;
  const auto dtype = x.element_type();
  if ((dtype != ffi::BF16 && dtype != ffi::F16) || scales.element_type() != dtype ||
      offsets.element_type() != dtype || y->element_type() != dtype) {
    return ffi::Error::InvalidArgument("gemm: x, scales, offsets and y must share bf16 or f16");
  }
  if (bits != 2 && bits != 4) return ffi::Error::InvalidArgument("gemm: bits must be 2 or 4");
  auto x_dims = x.dimensions();
  auto y_dims = y->dimensions();
  if (x_dims.size() != 2 || x_dims[1] != w.k || y_dims.size() != 2 || y_dims[0] != x_dims[0] ||
      y_dims[1] != w.n) {
    return ffi::Error::InvalidArgument("gemm: x must be (M, K) and y (M, N)");
  }
  const int per_word = codes_per_word(w.bits);
  if (x_dims[0] > kMaxRows || w.n % 4 != 0 || w.k % (4 * per_word) != 0 ||
      w.k > INT32_MAX / 2 || w.n > INT32_MAX / 2) {
    return ffi::Error::InvalidArgument(
        "gemm: needs M <= 64, N % 4 == 0 and K % (4 * codes per word) == 0");
  }
  // Groups are powers of two; one group spanning K has every row in group 0.
  int group_shift = 31;
  if (w.groups > 1) {
    group_shift = 0;
    while ((int64_t{1} << group_shift) < w.group_rows) ++group_shift;
    if ((int64_t{1} << group_shift) != w.group_rows) {
      return ffi::Error::InvalidArgument("gemm: group size must be a power of two");
    }
    if (w.group_rows < 32) {
      return ffi::Error::InvalidArgument("gemm: groups must have at least 32 rows");
    }
  }
  if (x_dims[0] == 0 || w.n == 0) return ffi::Error::Success();
  const GemmArgs args{x.untyped_data(), codes.typed_data(), scales.untyped_data(),
                      offsets.untyped_data(), y->untyped_data(), static_cast<int>(x_dims[0]),
                      static_cast<int>(w.k), static_cast<int>(w.n), w.bits, group_shift};
  cudaError_t err;
  if (args.m > kSmallMMaxRows) {
    err = dtype == ffi::BF16 ? launch_gemm_mid_m<__nv_bfloat16>(args, symmetric, stream)
                             : launch_gemm_mid_m<__half>(args, symmetric, stream);
  } else {
    err = dtype == ffi::BF16 ? dispatch_bits<__nv_bfloat16>(args, symmetric, stream)
                             : dispatch_bits<__half>(args, symmetric, stream);
  }
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("gemm kernel launch failed: ") +
                                cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_lowbit

// Symmetric weights pass their scales in the offsets slot; it is not read.
XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitGemmSmallMCuda, jax_lowbit::gemm_small_m_impl,
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
