// CPU reference handlers. They read the packed arrays exactly as stored (the
// format of docs/formats.md); scales, offsets, x and y are float32, the
// lowering converts other dtypes around the call.
#include "cpu/handlers.h"

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

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

// Columns per panel: the dequantized (K, 64) panel stays in L2 while every row
// of x streams over it, and a 64-float accumulator row stays in registers.
constexpr int64_t kPanelColumns = 64;

void matmul_panel(const float* x, const uint32_t* codes, const float* scales,
                  const float* offsets, const WeightShape& w, int64_t m_rows, int64_t n0,
                  std::vector<float>& panel, float* y) {
  const int64_t width = std::min(kPanelColumns, w.n - n0);
  panel.resize(static_cast<size_t>(w.k * kPanelColumns));
  dequantize_columns(codes, scales, offsets, w, n0, width, panel.data(), kPanelColumns);
  for (int64_t m = 0; m < m_rows; ++m) {
    float acc[kPanelColumns] = {};
    const float* x_row = x + m * w.k;
    for (int64_t k = 0; k < w.k; ++k) {
      const float xv = x_row[k];
      const float* p = panel.data() + k * kPanelColumns;
      for (int64_t c = 0; c < kPanelColumns; ++c) acc[c] += xv * p[c];
    }
    std::copy(acc, acc + width, y + m * w.n + n0);
  }
}

// Threads only pay off when each gets a few million multiply-adds.
int thread_count(int64_t m_rows, const WeightShape& w, int64_t panels) {
  const int64_t work = m_rows * w.k * w.n;
  const int64_t by_work = std::max<int64_t>(1, work / (int64_t{1} << 22));
  const int64_t hw = std::max(1u, std::thread::hardware_concurrency());
  return static_cast<int>(std::min({by_work, hw, panels}));
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
  auto x_dims = x.dimensions();
  auto y_dims = y->dimensions();
  if (x_dims.size() != 2 || x_dims[1] != w.k) {
    return ffi::Error::InvalidArgument("matmul: x must have shape (M, K) with K=" +
                                       std::to_string(w.k));
  }
  const int64_t m_rows = x_dims[0];
  if (y_dims.size() != 2 || y_dims[0] != m_rows || y_dims[1] != w.n) {
    return ffi::Error::InvalidArgument("matmul: y must have shape (M, N)");
  }
  const int64_t panels = (w.n + kPanelColumns - 1) / kPanelColumns;
  const int threads = thread_count(m_rows, w, panels);
  auto run = [&](int t) {
    std::vector<float> panel;
    for (int64_t p = t; p < panels; p += threads) {
      matmul_panel(x.typed_data(), codes.typed_data(), scales.typed_data(),
                   offsets.typed_data(), w, m_rows, p * kPanelColumns, panel,
                   y->typed_data());
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(run, t);
  run(0);
  for (auto& th : pool) th.join();
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
