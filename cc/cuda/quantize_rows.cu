// The pre-pass of matmul(x, qw, act_bits=8): each row of x (bf16, fp16 or
// f32) becomes int8 with its scale s = absmax / 127 and the per-group sums t
// of its int8 values (docs/formats.md, "Quantized activations"; the rounding
// is cc/act_quant.h). One CTA per row: a pass for the absmax, a second pass
// (from L1/L2) that quantizes. K is a multiple of 4 in every packed format,
// so a thread takes four consecutive elements at a time with one load.
// For the wgmma kernel (act_quant_gemm_large_m.cu) xq's rows are stored
// interleaved: in each block of 32 elements, elements 8t .. 8t + 7 go where
// the s8 MMA's B fragment of lane t wants them for `bits`-bit codes
// (SignedCodes<bits>::b_fragment, the order the mma.sync kernel makes in
// registers; for int8 codes the two halves of odd t trade places). wgmma
// reads B from shared memory as it lies, so this lets its lanes take their
// K rows as whole code words (docs/formats.md).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "act_quant.h"
#include "cuda/convert.cuh"
#include "cuda/handlers.h"
#include "cuda/launch_status.h"
#include "cuda/mma_fragments.cuh"

namespace jax_lowbit {
namespace {

namespace ffi = xla::ffi;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Group sums live in shared memory, one int32 per group.
constexpr int64_t kMaxGroups = 48 * 1024 / sizeof(int32_t);

// Four consecutive elements as floats, one 8-byte (16-bit types) or 16-byte load.
__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  const float4 q = __ldg(reinterpret_cast<const float4*>(p));
  v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
}
template <typename T>
__device__ __forceinline__ void load4(const T* p, float (&v)[4]) {
  const uint2 q = __ldg(reinterpret_cast<const uint2*>(p));
  const T* h = reinterpret_cast<const T*>(&q);
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = to_float(h[i]);
}

// The maximum of a non-negative float over the CTA: non-negative floats order
// like their bit patterns, so the warps reduce them as unsigned integers.
__device__ float block_max(float v) {
  __shared__ uint32_t warp_max[kWarps];
  const uint32_t bits = __reduce_max_sync(0xffffffffu, __float_as_uint(v));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = bits;
  __syncthreads();
  uint32_t all = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) all = max(all, warp_max[w]);
  return __uint_as_float(all);
}

// quantize_activation(v, scale), the spec's true division v / scale, mostly
// without dividing. With inverse = 1 / scale (rounded), q0 = v * inverse is
// within 2^-16 of v / scale (|v / scale| <= 127, two roundings of relative
// error 2^-24), so where q0 lies more than 2^-15 from a half-integer, v /
// scale and its float rounding are on q0's side of it, and all three round to
// the same integer. Only elements nearer a half-integer (about 2^-14 of them)
// divide. The division (MUFU.RCP, four FFMA and FCHK an element) was most of
// the pre-pass's instructions (docs/perf.md v23). scale 0: inverse 0, q0 0.
__device__ __forceinline__ int32_t quantize_activation_by_inverse(float v, float scale,
                                                                  float inverse) {
  const float q0 = v * inverse;
  const float nearest = rintf(q0);
  if (0.5f - fabsf(q0 - nearest) <= 0x1p-15f) return quantize_activation(v, scale);
  return static_cast<int32_t>(fminf(fmaxf(nearest, -kActivationMax), kActivationMax));
}

// Elements i .. i + 3 of a row: their int8 values packed in a word, and their sum.
__device__ __forceinline__ uint32_t quantize4(const float (&v)[4], float scale, float inverse,
                                              int32_t& sum) {
  uint32_t packed = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int32_t q = quantize_activation_by_inverse(v[j], scale, inverse);
    packed |= (static_cast<uint32_t>(q) & 0xffu) << (8 * j);
    sum += q;
  }
  return packed;
}

// A weight's integer group scales (docs/formats.md; act_bits=8 lowers such
// weights to the wgmma kernel's integer-scale form): from its float32 scales
// (G, N), each column's c = max_g scale / 16 and the multiples m = scale / c
// (integers 0..16) as uint8. CTAs past the M rows of the same launch derive
// them, 32 columns a CTA, 8 threads a column: as XLA ops (a reduction and a
// division, two launches of their own) they cost W4A8 g128 about 20 µs a
// suite pass at 256 rows (docs/perf.md v23). Null scales: nothing to derive.
struct IntegerScales {
  const float* scales;  // (G, N)
  float* column;        // (N,)
  uint8_t* multiples;   // (G, N)
  int groups, n;
};
constexpr int kSlices = 8;                         // threads a column
constexpr int kScaleColumns = kThreads / kSlices;  // columns a CTA: one warp's lanes

__device__ void derive_integer_scales(const IntegerScales& w, int block) {
  __shared__ float slice_max[kThreads];
  const int col = block * kScaleColumns + threadIdx.x % kScaleColumns;
  const int slice = threadIdx.x / kScaleColumns;
  float largest = 0.f;
  for (int g = slice; col < w.n && g < w.groups; g += kSlices) {
    largest = fmaxf(largest, w.scales[int64_t{g} * w.n + col]);
  }
  slice_max[threadIdx.x] = largest;
  __syncthreads();
  for (int i = 1; i < kSlices; ++i) {
    const int other = (slice + i) % kSlices;
    largest = fmaxf(largest, slice_max[other * kScaleColumns + threadIdx.x % kScaleColumns]);
  }
  if (col >= w.n) return;
  const float c = largest / 16.f;  // exact: a power of two
  if (slice == 0) w.column[col] = c;
  for (int g = slice; g < w.groups; g += kSlices) {
    const float m = c == 0.f ? 0.f : rintf(w.scales[int64_t{g} * w.n + col] / c);
    w.multiples[int64_t{g} * w.n + col] = static_cast<uint8_t>(fminf(fmaxf(m, 0.f), 16.f));
  }
}

// kInterleaveBits: 0 (xq in K order) or 4 / 8 (interleaved for such codes, see the header).
template <typename T, int kInterleaveBits>
__global__ void __launch_bounds__(kThreads)
    quantize_rows_kernel(const T* __restrict__ x, int8_t* __restrict__ xq,
                         float* __restrict__ scales, int32_t* __restrict__ group_sums,
                         int m_rows, int k, int group_rows, int groups,
                         const IntegerScales integer_scales) {
  if (int(blockIdx.x) >= m_rows) {
    derive_integer_scales(integer_scales, int(blockIdx.x) - m_rows);
    return;
  }
  // Interleaved, a thread takes the eight elements of one fragment lane.
  constexpr int kElements = kInterleaveBits ? 8 : 4;
  extern __shared__ int32_t sums[];
  const int m = blockIdx.x;
  const T* row = x + int64_t{m} * k;
  int8_t* out = xq + int64_t{m} * k;
  float absmax = 0.f;
  for (int i = 4 * threadIdx.x; i < k; i += 4 * kThreads) {
    float v[4];
    load4(row + i, v);
#pragma unroll
    for (int j = 0; j < 4; ++j) absmax = fmaxf(absmax, fabsf(v[j]));
  }
  const float scale = activation_scale(block_max(absmax));
  const float inverse = scale == 0.f ? 0.f : 1.f / scale;
  for (int g = threadIdx.x; g < groups; g += kThreads) sums[g] = 0;
  __syncthreads();
  for (int i = kElements * threadIdx.x; i < k; i += kElements * kThreads) {
    float v[4];
    load4(row + i, v);
    int32_t sum = 0;
    const uint32_t packed = quantize4(v, scale, inverse, sum);
    if constexpr (kInterleaveBits == 0) {
      *reinterpret_cast<uint32_t*>(out + i) = packed;
    } else {
      load4(row + i + 4, v);
      const uint2 lane_rows = make_uint2(packed, quantize4(v, scale, inverse, sum));
      uint32_t b[2];
      SignedCodes<kInterleaveBits>::b_fragment(lane_rows, b[0], b[1]);
      // Lane t = i % 32 / 8 of the block: its k slots 4t .. 4t + 3 and
      // 16 + 4t .. + 3, which trade places for odd t with int8 codes
      // (docs/formats.md).
      int8_t* block = out + (i & ~31) + i % 32 / 2;
      const int swap = SignedCodes<kInterleaveBits>::kOddLanesSwapHalves ? i / 8 % 2 : 0;
      *reinterpret_cast<uint32_t*>(block + 16 * swap) = b[0];
      *reinterpret_cast<uint32_t*>(block + 16 - 16 * swap) = b[1];
    }
    // Group sizes are multiples of kElements: the elements share one group.
    // Integer atomics add in any order to the same sum.
    atomicAdd(&sums[i / group_rows], sum);
  }
  __syncthreads();
  // Stored (G, M): the GEMM kernel reads the sums of one group for adjacent rows.
  for (int g = threadIdx.x; g < groups; g += kThreads) group_sums[int64_t{g} * m_rows + m] = sums[g];
  if (threadIdx.x == 0) scales[m] = scale;
}

struct RowsArgs {
  const void* x;
  int8_t* xq;
  float* scales;
  int32_t* group_sums;
  int m_rows, k, group_rows, groups;
  IntegerScales integer_scales;  // scales null: none
};

template <typename T, int kInterleaveBits>
cudaError_t launch(const RowsArgs& a, cudaStream_t stream) {
  const size_t shared_bytes = a.groups * sizeof(int32_t);
  const int scale_blocks =
      a.integer_scales.scales ? (a.integer_scales.n + kScaleColumns - 1) / kScaleColumns : 0;
  quantize_rows_kernel<T, kInterleaveBits>
      <<<a.m_rows + scale_blocks, kThreads, shared_bytes, stream>>>(
          static_cast<const T*>(a.x), a.xq, a.scales, a.group_sums, a.m_rows, a.k, a.group_rows,
          a.groups, a.integer_scales);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_order(const RowsArgs& a, int interleave_bits, cudaStream_t stream) {
  switch (interleave_bits) {
    case 4: return launch<T, 4>(a, stream);
    case 8: return launch<T, 8>(a, stream);
    default: return launch<T, 0>(a, stream);
  }
}

// The checks of both targets; fills `args` (integer_scales left empty) or
// names what is wrong.
ffi::Error rows_problem(ffi::AnyBuffer x, ffi::Result<ffi::Buffer<ffi::S8>> xq,
                        ffi::Result<ffi::Buffer<ffi::F32>> scales,
                        ffi::Result<ffi::Buffer<ffi::S32>> group_sums, int64_t group_rows,
                        int64_t interleave_bits, RowsArgs& args) {
  const auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("quantize_rows: x must be (M, K)");
  const int64_t m_rows = dims[0], k = dims[1];
  if (k % 4 != 0 || group_rows <= 0 || group_rows % 4 != 0 || k % group_rows != 0 ||
      k > INT32_MAX || m_rows > INT32_MAX) {
    return ffi::Error::InvalidArgument(
        "quantize_rows: K and the group size must be multiples of 4, the group size must "
        "divide K");
  }
  if (interleave_bits != 0 &&
      ((interleave_bits != 4 && interleave_bits != 8) || k % 32 != 0 || group_rows % 8 != 0)) {
    return ffi::Error::InvalidArgument(
        "quantize_rows: interleave_bits must be 0, 4 or 8; interleaved, K must be a multiple "
        "of 32 and the group size of 8");
  }
  const int64_t groups = k / group_rows;
  const auto xq_dims = xq->dimensions();
  const auto s_dims = scales->dimensions();
  const auto t_dims = group_sums->dimensions();
  if (xq_dims.size() != 2 || xq_dims[0] != m_rows || xq_dims[1] != k || s_dims.size() != 1 ||
      s_dims[0] != m_rows || t_dims.size() != 2 || t_dims[0] != groups || t_dims[1] != m_rows) {
    return ffi::Error::InvalidArgument(
        "quantize_rows: results must be xq (M, K), scales (M,) and group sums (G, M)");
  }
  if (groups > kMaxGroups) {
    return ffi::Error::InvalidArgument("quantize_rows: at most " + std::to_string(kMaxGroups) +
                                       " groups per row");
  }
  args = RowsArgs{x.untyped_data(),           xq->typed_data(),
                  scales->typed_data(),       group_sums->typed_data(),
                  static_cast<int>(m_rows),   static_cast<int>(k),
                  static_cast<int>(group_rows), static_cast<int>(groups),
                  IntegerScales{}};
  return ffi::Error::Success();
}

ffi::Error launch_rows(const RowsArgs& args, ffi::DataType type, int64_t interleave_bits,
                       cudaStream_t stream) {
  const int bits = static_cast<int>(interleave_bits);
  switch (type) {
    case ffi::F32:
      return launch_status(launch_order<float>(args, bits, stream), "quantize_rows");
    case ffi::BF16:
      return launch_status(launch_order<__nv_bfloat16>(args, bits, stream), "quantize_rows");
    case ffi::F16:
      return launch_status(launch_order<__half>(args, bits, stream), "quantize_rows");
    default: return ffi::Error::InvalidArgument("quantize_rows: x must be f32, bf16 or f16");
  }
}

ffi::Error quantize_rows_impl(cudaStream_t stream, ffi::AnyBuffer x,
                              ffi::Result<ffi::Buffer<ffi::S8>> xq,
                              ffi::Result<ffi::Buffer<ffi::F32>> scales,
                              ffi::Result<ffi::Buffer<ffi::S32>> group_sums, int64_t group_rows,
                              int64_t interleave_bits) {
  RowsArgs args;
  ffi::Error error = rows_problem(x, xq, scales, group_sums, group_rows, interleave_bits, args);
  if (error.failure()) return error;
  if (args.m_rows == 0) return ffi::Error::Success();
  return launch_rows(args, x.element_type(), interleave_bits, stream);
}

// The pre-pass, and in the same launch a weight's integer group scales
// (IntegerScales): weight_scales (G, N) float32 in, column (N,) float32 and
// multiples (G, N) uint8 out.
ffi::Error quantize_rows_integer_scales_impl(
    cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> weight_scales,
    ffi::Result<ffi::Buffer<ffi::S8>> xq, ffi::Result<ffi::Buffer<ffi::F32>> scales,
    ffi::Result<ffi::Buffer<ffi::S32>> group_sums, ffi::Result<ffi::Buffer<ffi::F32>> column,
    ffi::Result<ffi::Buffer<ffi::U8>> multiples, int64_t group_rows, int64_t interleave_bits) {
  RowsArgs args;
  ffi::Error error = rows_problem(x, xq, scales, group_sums, group_rows, interleave_bits, args);
  if (error.failure()) return error;
  const auto w_dims = weight_scales.dimensions();
  if (w_dims.size() != 2 || column->dimensions().size() != 1 ||
      column->dimensions()[0] != w_dims[1] || multiples->dimensions().size() != 2 ||
      multiples->dimensions()[0] != w_dims[0] || multiples->dimensions()[1] != w_dims[1] ||
      w_dims[0] > INT32_MAX || w_dims[1] > INT32_MAX) {
    return ffi::Error::InvalidArgument(
        "quantize_rows: weight scales (G, N) give column scales (N,) and multiples (G, N)");
  }
  args.integer_scales = IntegerScales{weight_scales.typed_data(), column->typed_data(),
                                      multiples->typed_data(), static_cast<int>(w_dims[0]),
                                      static_cast<int>(w_dims[1])};
  if (args.m_rows == 0 && args.integer_scales.n == 0) return ffi::Error::Success();
  return launch_rows(args, x.element_type(), interleave_bits, stream);
}

}  // namespace
}  // namespace jax_lowbit

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitQuantizeRowsCuda, jax_lowbit::quantize_rows_impl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S8>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Attr<int64_t>("group_rows")
                                  .Attr<int64_t>("interleave_bits"),
                              {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitQuantizeRowsIntegerScalesCuda,
                              jax_lowbit::quantize_rows_integer_scales_impl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S8>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::U8>>()
                                  .Attr<int64_t>("group_rows")
                                  .Attr<int64_t>("interleave_bits"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
