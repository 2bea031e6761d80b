// CPU reference handlers for 2:4 sparse int4 weights. They read the kept codes
// and the metadata exactly as stored (docs/formats.md, "2:4 sparse int4") and
// write zeros at the pruned rows; scales, offsets, x and y are float32.
#include "cpu/sparse_handlers.h"

#include <algorithm>
#include <cstdint>
#include <string>

#include "cpu/panel_matmul.h"
#include "format.h"
#include "weight_shape.h"

namespace jax_lowbit {
namespace {

namespace ffi = xla::ffi;

// Writes rows [0, K) of columns [n0, n0 + width) of the dequantized weight to
// out[k * out_stride + (n - n0)].
void sparse_dequantize_columns(const uint32_t* codes, const uint16_t* metadata,
                               const float* scales, const float* offsets, const WeightShape& w,
                               int64_t n0, int64_t width, float* out, int64_t out_stride) {
  for (int64_t k = 0; k < w.k; ++k) std::fill_n(out + k * out_stride, width, 0.f);
  for (int64_t word_row = 0; word_row < w.k / kSparseRowsPerWord; ++word_row) {
    const int64_t group = word_row * kSparseRowsPerWord / w.group_rows;
    const uint32_t* word = codes + word_row * w.n + n0;
    const float* scale = scales + group * w.n + n0;
    const float* offset = offsets + group * w.n + n0;
    for (int j = 0; j < kQuadsPerSparseWord; ++j) {
      const int64_t quad = word_row * kQuadsPerSparseWord + j;
      const uint16_t* nibbles = metadata + sparse_metadata_row(quad) * w.n + n0;
      const int shift = sparse_metadata_shift(quad);
      for (int64_t c = 0; c < width; ++c) {
        const uint32_t nibble = (nibbles[c] >> shift) & 0xFu;
        // Kept code `which` of the quad is code 2j + which of its word.
        for (int which = 0; which < 2; ++which) {
          const int64_t row = 4 * quad + kept_row(nibble, which);
          out[row * out_stride + c] = dequantize_code(
              code_at(word[c], 2 * j + which, kSparseBits), scale[c], offset[c]);
        }
      }
    }
  }
}

// Metadata nibbles other than two distinct rows in increasing order describe
// no 2:4 pattern (docs/formats.md); refused here, undefined on the GPU.
ffi::Error check_metadata(const uint16_t* metadata, int64_t entries) {
  for (int64_t i = 0; i < entries; ++i) {
    for (int j = 0; j < 4; ++j) {
      const uint32_t nibble = (metadata[i] >> (4 * j)) & 0xFu;
      if (kept_row(nibble, 0) >= kept_row(nibble, 1)) {
        return ffi::Error::InvalidArgument(
            "metadata entry " + std::to_string(i) + " holds nibble " + std::to_string(nibble) +
            ", which is no 2:4 pattern (needs kept rows i0 < i1)");
      }
    }
  }
  return ffi::Error::Success();
}

ffi::Error sparse_dequantize_impl(ffi::Buffer<ffi::U32> codes, ffi::Buffer<ffi::U16> metadata,
                                  ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::F32> offsets,
                                  ffi::ResultBuffer<ffi::F32> out, int32_t bits,
                                  int64_t group_size) {
  WeightShape w;
  ffi::Error error =
      sparse_dequantize_shape(codes.dimensions(), metadata.dimensions(), scales.dimensions(),
                              offsets.dimensions(), out->dimensions(), bits, group_size, w);
  if (error.failure()) return error;
  error = check_metadata(metadata.typed_data(), metadata.element_count());
  if (error.failure()) return error;
  sparse_dequantize_columns(codes.typed_data(), metadata.typed_data(), scales.typed_data(),
                            offsets.typed_data(), w, 0, w.n, out->typed_data(), w.n);
  return ffi::Error::Success();
}

ffi::Error sparse_matmul_impl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> codes,
                              ffi::Buffer<ffi::U16> metadata, ffi::Buffer<ffi::F32> scales,
                              ffi::Buffer<ffi::F32> offsets, ffi::ResultBuffer<ffi::F32> y,
                              int32_t bits, int64_t group_size) {
  WeightShape w;
  ffi::Error error =
      sparse_weight_shape(codes.dimensions(), metadata.dimensions(), scales.dimensions(),
                          offsets.dimensions(), bits, group_size, w);
  if (error.failure()) return error;
  int64_t m_rows;
  error = matmul_shape(x.dimensions(), y->dimensions(), w.k, w.n, m_rows);
  if (error.failure()) return error;
  error = check_metadata(metadata.typed_data(), metadata.element_count());
  if (error.failure()) return error;
  panel_matmul(x.typed_data(), m_rows, w.k, w.n, y->typed_data(),
               [&](int64_t n0, int64_t width, float* out, int64_t out_stride) {
                 sparse_dequantize_columns(codes.typed_data(), metadata.typed_data(),
                                           scales.typed_data(), offsets.typed_data(), w, n0,
                                           width, out, out_stride);
               });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_lowbit

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitSparseDequantizeCpu, jax_lowbit::sparse_dequantize_impl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U16>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int64_t>("group_size"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitSparseMatmulCpu, jax_lowbit::sparse_matmul_impl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U16>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int64_t>("group_size"));
