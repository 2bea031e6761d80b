// CUDA dequantize of 2:4 sparse int4 weights (docs/formats.md): kept codes and
// metadata -> (K, N) weight in bf16, fp16 or f32, zeros at the pruned rows.
// One thread per code word (4 quads, 16 rows of one column): it loads the
// word, the metadata entry of each quad (4 metadata rows, one nibble of each)
// and writes its 16 rows; consecutive threads take consecutive columns, so
// every load and every row store of a warp is coalesced.
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

template <typename T>
__global__ void sparse_dequantize_kernel(const uint32_t* __restrict__ codes,
                                         const uint16_t* __restrict__ metadata,
                                         const float* __restrict__ scales,
                                         const float* __restrict__ offsets, int64_t n,
                                         int64_t group_rows, int64_t words, T* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < words;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t word_row = i / n;
    const int64_t col = i - word_row * n;
    const int64_t sidx = (word_row * kSparseRowsPerWord / group_rows) * n + col;
    const uint32_t word = codes[i];
    const float scale = scales[sidx];
    const float offset = offsets[sidx];
#pragma unroll
    for (int j = 0; j < kQuadsPerSparseWord; ++j) {
      const int64_t quad = word_row * kQuadsPerSparseWord + j;
      const uint32_t nibble =
          (metadata[sparse_metadata_row(quad) * n + col] >> sparse_metadata_shift(quad)) & 0xFu;
      // Quad j's kept codes are codes 2j and 2j + 1 of the word.
      const T kept0 =
          from_float<T>(dequantize_code(code_at(word, 2 * j, kSparseBits), scale, offset));
      const T kept1 =
          from_float<T>(dequantize_code(code_at(word, 2 * j + 1, kSparseBits), scale, offset));
      // Selects, not an indexed array: the row index is only known at run time.
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        out[(4 * quad + r) * n + col] = r == kept_row(nibble, 0)   ? kept0
                                        : r == kept_row(nibble, 1) ? kept1
                                                                   : from_float<T>(0.f);
      }
    }
  }
}

// Launches the kernel for one output type.
struct SparseDequantizeLaunch {
  DequantizeArgs a;
  const uint16_t* metadata;

  template <typename T>
  cudaError_t run() const {
    const int64_t words = (a.w.k / kSparseRowsPerWord) * a.w.n;
    if (words == 0) return cudaSuccess;
    sparse_dequantize_kernel<T><<<dequantize_blocks(words), kDequantizeThreads, 0, a.stream>>>(
        a.codes, metadata, a.scales, a.offsets, a.w.n, a.w.group_rows, words,
        static_cast<T*>(a.out));
    return cudaGetLastError();
  }
};

ffi::Error sparse_dequantize_impl(cudaStream_t stream, ffi::Buffer<ffi::U32> codes,
                                  ffi::Buffer<ffi::U16> metadata, ffi::Buffer<ffi::F32> scales,
                                  ffi::Buffer<ffi::F32> offsets, ffi::Result<ffi::AnyBuffer> out,
                                  int32_t bits, int64_t group_size) {
  WeightShape w;
  ffi::Error shape_error =
      sparse_dequantize_shape(codes.dimensions(), metadata.dimensions(), scales.dimensions(),
                              offsets.dimensions(), out->dimensions(), bits, group_size, w);
  if (shape_error.failure()) return shape_error;
  const DequantizeArgs args{codes.typed_data(), scales.typed_data(), offsets.typed_data(), w,
                            out->untyped_data(), stream};
  return launch_dequantize(out->element_type(),
                           SparseDequantizeLaunch{args, metadata.typed_data()});
}

}  // namespace
}  // namespace jax_lowbit

// No host synchronization or allocation: XLA may capture it in a CUDA graph.
XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitSparseDequantizeCuda, jax_lowbit::sparse_dequantize_impl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U16>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int64_t>("group_size"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
