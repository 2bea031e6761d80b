// CPU reference handler of matmul(x, qw, act_bits=8): quantizes each row of x
// to int8, multiplies by the signed codes with exact int32 sums per group and
// adds the groups' float32 terms in increasing order (docs/formats.md,
// "Quantized activations"; the arithmetic itself is cc/act_quant.h). x,
// scales, offsets and y are float32; the lowering converts other dtypes.
#include "cpu/act_quant_matmul.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "act_quant.h"
#include "format.h"
#include "weight_shape.h"

namespace jax_lowbit {
namespace {

namespace ffi = xla::ffi;

// Quantized rows of x: xq (M, K), the row scales s (M) and the group sums t (M, G).
struct QuantizedRows {
  std::vector<int8_t> values;
  std::vector<float> scales;
  std::vector<int32_t> group_sums;
};

QuantizedRows quantize_rows(const float* x, int64_t m_rows, const WeightShape& w) {
  QuantizedRows rows{std::vector<int8_t>(m_rows * w.k), std::vector<float>(m_rows),
                     std::vector<int32_t>(m_rows * w.groups, 0)};
  for (int64_t m = 0; m < m_rows; ++m) {
    const float* row = x + m * w.k;
    float absmax = 0.f;
    for (int64_t k = 0; k < w.k; ++k) absmax = std::max(absmax, std::fabs(row[k]));
    const float scale = activation_scale(absmax);
    rows.scales[m] = scale;
    for (int64_t k = 0; k < w.k; ++k) {
      const int32_t q = quantize_activation(row[k], scale);
      rows.values[m * w.k + k] = static_cast<int8_t>(q);
      rows.group_sums[m * w.groups + k / w.group_rows] += q;
    }
  }
  return rows;
}

// Columns per panel: the panel's signed codes (K x 64 bytes) stay in cache
// while every row of x streams over it.
constexpr int64_t kPanelColumns = 64;

// Signed codes code - 2^(bits-1) of columns [n0, n0 + width), (K, kPanelColumns).
void signed_code_panel(const uint32_t* codes, const WeightShape& w, int64_t n0, int64_t width,
                       std::vector<int8_t>& panel) {
  const int per_word = codes_per_word(w.bits);
  const int32_t zero = 1 << (w.bits - 1);
  panel.assign(w.k * kPanelColumns, 0);
  for (int64_t word_row = 0; word_row < w.k / per_word; ++word_row) {
    const uint32_t* word = codes + word_row * w.n + n0;
    for (int j = 0; j < per_word; ++j) {
      int8_t* row = panel.data() + (word_row * per_word + j) * kPanelColumns;
      for (int64_t c = 0; c < width; ++c) {
        row[c] = static_cast<int8_t>(static_cast<int32_t>(code_at(word[c], j, w.bits)) - zero);
      }
    }
  }
}

void panel_product(const QuantizedRows& rows, int64_t m_rows, const std::vector<int8_t>& panel,
                   const float* scales, const float* offsets, const WeightShape& w,
                   bool symmetric, int64_t n0, int64_t width, float* y) {
  for (int64_t m = 0; m < m_rows; ++m) {
    float acc[kPanelColumns] = {};
    for (int64_t g = 0; g < w.groups; ++g) {
      // uint32 sums wrap modulo 2^32 where int32 overflow would be undefined.
      uint32_t p[kPanelColumns] = {};
      for (int64_t k = g * w.group_rows; k < (g + 1) * w.group_rows; ++k) {
        const int32_t xv = rows.values[m * w.k + k];
        const int8_t* q = panel.data() + k * kPanelColumns;
        for (int64_t c = 0; c < kPanelColumns; ++c) p[c] += static_cast<uint32_t>(xv * q[c]);
      }
      const int32_t t = rows.group_sums[m * w.groups + g];
      for (int64_t c = 0; c < width; ++c) {
        const int64_t at = g * w.n + n0 + c;
        acc[c] = add_rn(acc[c], group_term(static_cast<int32_t>(p[c]), t, w.bits, symmetric,
                                           scales[at], offsets[at]));
      }
    }
    for (int64_t c = 0; c < width; ++c) y[m * w.n + n0 + c] = mul_rn(acc[c], rows.scales[m]);
  }
}

ffi::Error act_quant_matmul_impl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> codes,
                                 ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::F32> offsets,
                                 ffi::ResultBuffer<ffi::F32> y, int32_t bits, int64_t group_size,
                                 bool symmetric) {
  WeightShape w;
  ffi::Error shape_error = act_quant_weight_shape(codes.dimensions(), scales.dimensions(),
                                                  offsets.dimensions(), bits, group_size, w);
  if (shape_error.failure()) return shape_error;
  const auto x_dims = x.dimensions();
  const auto y_dims = y->dimensions();
  if (x_dims.size() != 2 || x_dims[1] != w.k || y_dims.size() != 2 || y_dims[0] != x_dims[0] ||
      y_dims[1] != w.n) {
    return ffi::Error::InvalidArgument("act_quant_matmul: x must be (M, K) and y (M, N), K=" +
                                       std::to_string(w.k));
  }
  const int64_t m_rows = x_dims[0];
  const QuantizedRows rows = quantize_rows(x.typed_data(), m_rows, w);
  std::vector<int8_t> panel;
  for (int64_t n0 = 0; n0 < w.n; n0 += kPanelColumns) {
    const int64_t width = std::min(kPanelColumns, w.n - n0);
    signed_code_panel(codes.typed_data(), w, n0, width, panel);
    panel_product(rows, m_rows, panel, scales.typed_data(), offsets.typed_data(), w, symmetric,
                  n0, width, y->typed_data());
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_lowbit

// Symmetric weights pass their scales in the offsets slot; it is not read.
XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitActQuantMatmulCpu, jax_lowbit::act_quant_matmul_impl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<bool>("symmetric"));
