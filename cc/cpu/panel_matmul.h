// y = x · W on the CPU for any packed format: W is dequantized one (K, 64)
// column panel at a time by the format's own function, and every row of x
// streams over the panel. The dense and the 2:4 sparse handlers share it.
#ifndef JAX_LOWBIT_CPU_PANEL_MATMUL_H_
#define JAX_LOWBIT_CPU_PANEL_MATMUL_H_

#include <algorithm>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace jax_lowbit {

namespace ffi = xla::ffi;

// Columns per panel: the dequantized (K, 64) panel stays in L2 while every row
// of x streams over it, and a 64-float accumulator row stays in registers.
constexpr int64_t kPanelColumns = 64;

// x must be (M, K) and y (M, N); sets m_rows.
inline ffi::Error matmul_shape(ffi::AnyBuffer::Dimensions x, ffi::AnyBuffer::Dimensions y,
                               int64_t k, int64_t n, int64_t& m_rows) {
  if (x.size() != 2 || x[1] != k) {
    return ffi::Error::InvalidArgument("matmul: x must have shape (M, K) with K=" +
                                       std::to_string(k));
  }
  m_rows = x[0];
  if (y.size() != 2 || y[0] != m_rows || y[1] != n) {
    return ffi::Error::InvalidArgument("matmul: y must have shape (M, N)");
  }
  return ffi::Error::Success();
}

// Threads only pay off when each gets a few million multiply-adds.
inline int thread_count(int64_t m_rows, int64_t k, int64_t n, int64_t panels) {
  const int64_t work = m_rows * k * n;
  const int64_t by_work = std::max<int64_t>(1, work / (int64_t{1} << 22));
  const int64_t hw = std::max(1u, std::thread::hardware_concurrency());
  return static_cast<int>(std::min({by_work, hw, panels}));
}

// y (M, N) = x (M, K) · W. `dequantize_columns(n0, width, out, out_stride)`
// writes rows [0, K) of W's columns [n0, n0 + width) to
// out[k * out_stride + (n - n0)].
template <typename DequantizeColumns>
void panel_matmul(const float* x, int64_t m_rows, int64_t k, int64_t n, float* y,
                  const DequantizeColumns& dequantize_columns) {
  const int64_t panels = (n + kPanelColumns - 1) / kPanelColumns;
  const int threads = thread_count(m_rows, k, n, panels);
  auto run = [&](int t) {
    std::vector<float> panel(static_cast<size_t>(k * kPanelColumns));
    for (int64_t p = t; p < panels; p += threads) {
      const int64_t n0 = p * kPanelColumns;
      const int64_t width = std::min(kPanelColumns, n - n0);
      dequantize_columns(n0, width, panel.data(), kPanelColumns);
      for (int64_t m = 0; m < m_rows; ++m) {
        float acc[kPanelColumns] = {};
        const float* x_row = x + m * k;
        for (int64_t r = 0; r < k; ++r) {
          const float xv = x_row[r];
          const float* row = panel.data() + r * kPanelColumns;
          for (int64_t c = 0; c < kPanelColumns; ++c) acc[c] += xv * row[c];
        }
        std::copy(acc, acc + width, y + m * n + n0);
      }
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(run, t);
  run(0);
  for (auto& th : pool) th.join();
}

}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_CPU_PANEL_MATMUL_H_
