// CUDA dequantize: packed codes -> (K, N) weight in bf16, fp16 or f32.
// One thread per 32-bit code word: it loads the word once and writes its P
// rows; consecutive threads take consecutive columns, so every load and every
// row store of a warp is coalesced.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/convert.cuh"
#include "cuda/dequantize_launch.cuh"
#include "cuda/handlers.h"
#include "format.h"
#include "weight_shape.h"

namespace jax_lowbit {
namespace {

namespace ffi = xla::ffi;

template <typename T, int kBits>
__global__ void dequantize_kernel(const uint32_t* __restrict__ codes,
                                  const float* __restrict__ scales,
                                  const float* __restrict__ offsets, int64_t n,
                                  int64_t group_rows, int64_t words, T* __restrict__ out) {
  constexpr int kPerWord = codes_per_word(kBits);
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < words;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t word_row = i / n;
    const int64_t col = i - word_row * n;
    const int64_t k0 = word_row * kPerWord;
    const int64_t sidx = (k0 / group_rows) * n + col;
    const uint32_t word = codes[i];
    const float scale = scales[sidx];
    const float offset = offsets[sidx];
#pragma unroll
    for (int j = 0; j < kPerWord; ++j) {
      out[(k0 + j) * n + col] = from_float<T>(dequantize_code(code_at(word, j, kBits), scale, offset));
    }
  }
}

// Launches the kernel for one output type.
struct DequantizeLaunch {
  DequantizeArgs a;

  template <typename T>
  cudaError_t run() const {
    const int64_t words = (a.w.k / codes_per_word(a.w.bits)) * a.w.n;
    if (words == 0) return cudaSuccess;
    const int64_t blocks = dequantize_blocks(words);
    T* out = static_cast<T*>(a.out);
    switch (a.w.bits) {
      case 2:
        dequantize_kernel<T, 2><<<blocks, kDequantizeThreads, 0, a.stream>>>(
            a.codes, a.scales, a.offsets, a.w.n, a.w.group_rows, words, out);
        break;
      case 4:
        dequantize_kernel<T, 4><<<blocks, kDequantizeThreads, 0, a.stream>>>(
            a.codes, a.scales, a.offsets, a.w.n, a.w.group_rows, words, out);
        break;
      default:
        dequantize_kernel<T, 8><<<blocks, kDequantizeThreads, 0, a.stream>>>(
            a.codes, a.scales, a.offsets, a.w.n, a.w.group_rows, words, out);
    }
    return cudaGetLastError();
  }
};

ffi::Error dequantize_impl(cudaStream_t stream, ffi::Buffer<ffi::U32> codes,
                           ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::F32> offsets,
                           ffi::Result<ffi::AnyBuffer> out, int32_t bits, int64_t group_size) {
  WeightShape w;
  ffi::Error shape_error = dequantize_shape(codes.dimensions(), scales.dimensions(),
                                            offsets.dimensions(), out->dimensions(), bits,
                                            group_size, w);
  if (shape_error.failure()) return shape_error;
  const DequantizeArgs args{codes.typed_data(), scales.typed_data(), offsets.typed_data(), w,
                            out->untyped_data(), stream};
  return launch_dequantize(out->element_type(), DequantizeLaunch{args});
}

}  // namespace
}  // namespace jax_lowbit

// No host synchronization or allocation: XLA may capture it in a CUDA graph.
XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitDequantizeCuda, jax_lowbit::dequantize_impl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int64_t>("group_size"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
