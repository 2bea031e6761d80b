// CPU reference handlers. They read the packed arrays exactly as stored (the
// format of docs/formats.md); scales, offsets, x and y are float32, the
// lowering converts other dtypes around the call.
#include "cpu/handlers.h"

#include <cstdint>

#include "cpu/panel_matmul.h"
#include "format.h"
#include "weight_shape.h"

namespace jax_lowbit {
namespace {

namespace ffi = xla::ffi;

// Writes rows [0, K) of columns [n0, n0 + width) of the dequantized weight to
// out[k * out_stride + (n - n0)].
void dequantize_columns(const uint32_t* codes, const float* scales, const float* offsets,
                        const WeightShape& w, int64_t n0, int64_t width, float* out,
                        int64_t out_stride) {
  const int per_word = codes_per_word(w.bits);
  for (int64_t word_row = 0; word_row < w.k / per_word; ++word_row) {
    const int64_t k0 = word_row * per_word;
    const int64_t group = k0 / w.group_rows;
    const uint32_t* word = codes + word_row * w.n + n0;
    const float* scale = scales + group * w.n + n0;
    const float* offset = offsets + group * w.n + n0;
    for (int j = 0; j < per_word; ++j) {
      float* row = out + (k0 + j) * out_stride;
      for (int64_t c = 0; c < width; ++c) {
        row[c] = dequantize_code(code_at(word[c], j, w.bits), scale[c], offset[c]);
      }
    }
  }
}

ffi::Error dequantize_impl(ffi::Buffer<ffi::U32> codes, ffi::Buffer<ffi::F32> scales,
                           ffi::Buffer<ffi::F32> offsets, ffi::ResultBuffer<ffi::F32> out,
                           int32_t bits, int64_t group_size) {
  WeightShape w;
  ffi::Error shape_error = dequantize_shape(codes.dimensions(), scales.dimensions(),
                                            offsets.dimensions(), out->dimensions(), bits,
                                            group_size, w);
  if (shape_error.failure()) return shape_error;
  dequantize_columns(codes.typed_data(), scales.typed_data(), offsets.typed_data(), w, 0, w.n,
                     out->typed_data(), w.n);
  return ffi::Error::Success();
}

ffi::Error matmul_impl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> codes,
                       ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::F32> offsets,
                       ffi::ResultBuffer<ffi::F32> y, int32_t bits, int64_t group_size) {
  WeightShape w;
  ffi::Error shape_error = weight_shape(codes.dimensions(), scales.dimensions(),
                                        offsets.dimensions(), bits, group_size, w);
  if (shape_error.failure()) return shape_error;
  int64_t m_rows;
  shape_error = matmul_shape(x.dimensions(), y->dimensions(), w.k, w.n, m_rows);
  if (shape_error.failure()) return shape_error;
  panel_matmul(x.typed_data(), m_rows, w.k, w.n, y->typed_data(),
               [&](int64_t n0, int64_t width, float* out, int64_t out_stride) {
                 dequantize_columns(codes.typed_data(), scales.typed_data(),
                                    offsets.typed_data(), w, n0, width, out, out_stride);
               });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_lowbit

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitDequantizeCpu, jax_lowbit::dequantize_impl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int64_t>("group_size"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitMatmulCpu, jax_lowbit::matmul_impl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int64_t>("group_size"));
