// CPU reference handler of int_matmul: y = a @ b of int8 operands with int32
// accumulation. int4 operands arrive widened to int8 (jax_lowbit/int_lowering.py
// says why); the float epilogue of scaled products is applied by the lowering.
#include "cpu/int_matmul.h"

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace jax_lowbit {
namespace {

namespace ffi = xla::ffi;

// Columns per panel: a (K, 256) panel of b (4 MiB at K = 16384) stays in cache
// while every row of a streams over it, and the loop over the panel vectorizes.
constexpr int64_t kPanelColumns = 256;

// Sums are taken in uint32, whose overflow wraps by definition (int32's is
// undefined), so the result is the int32 two's complement sum modulo 2^32,
// as XLA's int32 dot computes it. It is exact while |sum| < 2^31: int8
// products are at most 2^14 in magnitude, so for every K <= 2^17.
void int_matmul_rows(const int8_t* a, const int8_t* b, int64_t m_rows, int64_t k, int64_t n,
                     int32_t* y) {
  std::vector<uint32_t> acc(kPanelColumns);
  for (int64_t n0 = 0; n0 < n; n0 += kPanelColumns) {
    const int64_t width = std::min(kPanelColumns, n - n0);
    for (int64_t m = 0; m < m_rows; ++m) {
      std::fill(acc.begin(), acc.end(), 0u);
      const int8_t* a_row = a + m * k;
      for (int64_t kk = 0; kk < k; ++kk) {
        const int32_t av = a_row[kk];
        const int8_t* b_row = b + kk * n + n0;
        for (int64_t c = 0; c < width; ++c) acc[c] += static_cast<uint32_t>(av * b_row[c]);
      }
      for (int64_t c = 0; c < width; ++c) y[m * n + n0 + c] = static_cast<int32_t>(acc[c]);
    }
  }
}

ffi::Error int_matmul_impl(ffi::BufferR2<ffi::S8> a, ffi::BufferR2<ffi::S8> b,
                           ffi::Result<ffi::BufferR2<ffi::S32>> y) {
  const auto a_dims = a.dimensions();
  const auto b_dims = b.dimensions();
  const auto y_dims = y->dimensions();
  if (a_dims[1] != b_dims[0]) {
    return ffi::Error::InvalidArgument("int_matmul: a is (M, K) with K=" +
                                       std::to_string(a_dims[1]) + " but b is (K, N) with K=" +
                                       std::to_string(b_dims[0]));
  }
  if (y_dims[0] != a_dims[0] || y_dims[1] != b_dims[1]) {
    return ffi::Error::InvalidArgument("int_matmul: y must have shape (M, N)");
  }
  int_matmul_rows(a.typed_data(), b.typed_data(), a_dims[0], a_dims[1], b_dims[1],
                  y->typed_data());
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_lowbit

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitIntMatmulCpu, jax_lowbit::int_matmul_impl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::BufferR2<xla::ffi::S8>>()
                                  .Arg<xla::ffi::BufferR2<xla::ffi::S8>>()
                                  .Ret<xla::ffi::BufferR2<xla::ffi::S32>>());
