// int_matmul for 1 to 16 rows: y (M, N) int32 = a (M, K) int8 @ b (K, N) int8,
// exact (sums wrap modulo 2^32 like XLA's int32 dot), on int8 tensor cores
// (mma.m16n8k32 s8, sm_80+), with b read in place in its row-major layout.
//
// Why this shape: at small M the product is bound by reading b (K * N bytes,
// half of a bf16 weight's); a repack of b into fragment order would read and
// write it once more in HBM. So b is the MMA's A operand (y^T = b^T a^T: MMA
// rows are columns of b, MMA columns are rows of a) and its bytes are
// transposed in registers; a is the B operand, which with the K-slot order
// below needs no shuffling at all.
//  * A CTA works on 64 output columns (a strip) and all M rows at a time;
//    its 8 warps split the steps of the strip it takes into equal
//    consecutive shares, kUnroll 32-row steps at a time. Lane (g, t) loads
//    columns 8g .. 8g+7 (one 8-byte load) of K rows 8t .. 8t+7 of a step:
//    a warp's load instruction reads 4 rows x 64 contiguous bytes (full 32-byte
//    sectors), the whole step is 32 rows x 64 bytes.
//  * K-slot order (free, as long as A and B agree; both depend on t alone):
//    slots 4t .. 4t+3 are K rows 8t .. 8t+3 and slots 16+4t .. 16+4t+3 are
//    rows 8t+4 .. 8t+7. The B fragment of row m of a is then its 8 bytes
//    a[m, 8t .. 8t+7] as loaded: b0 = .x, b1 = .y, no prmt.
//  * The lane's 8 row words of each 4-column half go through a 4x4 byte
//    transpose (8 prmt, transpose_bytes_4x4) into column words: column c,
//    K rows 8t+4h .. +3. MMA j (0..3) takes columns 2j and 2j+1 of the lane's
//    eight as MMA rows g and g+8: 4 MMAs per M tile and step cover the 64
//    columns. 2 prmt per A register, against 4 mma per 8 loads: cheap.
//  * The (strip, step) work is spread evenly over the CTAs that run at once
//    (int_gemm_small_m_kernel below); CTAs that share a strip add their sums
//    in y with int32 atomics. Integer sums are associative, so every order
//    of addition gives the same bits.
//  * The int32 epilogue only: a_scale / b_scale / out_dtype are elementwise
//    XLA ops after the call (IntEpilogue.apply), as on CPU. At M <= 16 the
//    int32 result is at most 64 / K of b's bytes.
// Requires K % 8 == 0 (8-byte loads of a's rows), N % 8 == 0 (8-byte loads of
// b's rows) and M <= 16 (17 to 64 rows measured slower than XLA's integer dot
// on the H100: x read per 64-column strip, docs/perf.md); the lowering routes
// other shapes to XLA's integer dot.
// K % 32 != 0 is handled: rows past K are not loaded and count as zero.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/cluster_split.cuh"
#include "cuda/handlers.h"
#include "cuda/int_gemm_target.h"
#include "cuda/launch_status.h"
#include "cuda/mma_fragments.cuh"
#include "xla/ffi/api/ffi.h"

namespace jax_lowbit {
namespace {

namespace ffi = xla::ffi;

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kColumns = 64;   // output columns per CTA: 8 per lane g
constexpr int kStepRows = 32;  // K rows of one m16n8k32 step
constexpr int kMaxRows = 16;  // 2 M tiles of 8 rows (the MMA's N); see int_lowering.py

// Steps a warp has in flight at once (8 eight-byte loads of b each, plus one
// of a per M tile), and CTAs per SM. The accumulators take 16 registers per
// M tile. Two CTAs (16 warps) share an SM in 128 registers a lane, with 4
// and 3 steps in flight for 1 and 2 tiles (ptxas 13.0: 119 and 122
// registers, no spills; 4 steps at 2 tiles spilled).
template <int kMTiles>
struct IntConfig {
  static constexpr int kUnroll = kMTiles == 1 ? 4 : 3;
  static constexpr int kCtasPerSm = 2;
};

// Shared-memory sums, row stride 65 (one bank per row) and columns 32..63
// one bank further: the lanes of a warp adding accumulator register r of MMA
// j (row 2t + r % 2 of an M tile, column 8g + 2j + r / 2) then hit 32
// distinct banks (2t + 8 (g % 4) + g / 4, mod 32).
constexpr int kSumStride = kColumns + 1;
__device__ __forceinline__ int sum_index(int row, int col) {
  return row * kSumStride + col + (col >> 5);
}

// The steps [begin, end) of one column strip (first column `strip`), added
// into the CTA's zeroed `sums`. The warps take equal consecutive shares of
// the steps, kUnroll at a time.
template <int kMTiles>
__device__ __forceinline__ void add_strip_steps(const IntGemmArgs& p, int strip, int begin,
                                                int end, int32_t* sums) {
  constexpr int kUnroll = IntConfig<kMTiles>::kUnroll;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int col0 = strip + 8 * g;
  const bool col_ok = col0 < p.n;  // N % 8 == 0: a lane's 8 columns are all in or all out
  const int warp_begin = begin + (end - begin) * warp / kWarps;
  const int warp_end = begin + (end - begin) * (warp + 1) / kWarps;

  int32_t acc[kMTiles][4][4] = {};
  for (int base = warp_begin; base < warp_end; base += kUnroll) {
    // All loads of the batch first, so kUnroll steps' DRAM round trips overlap.
    uint2 rows[kUnroll][8];
    uint2 xv[kUnroll][kMTiles];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int step = base + u;
      // Past the warp's range another warp or CTA counts the rows; past K
      // there are none.
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int row = step * kStepRows + 8 * t + i;
        const bool ok = step < warp_end && row < p.k && col_ok;
        rows[u][i] = ok ? load_streaming_half_line(reinterpret_cast<const uint2*>(
                              p.b + int64_t{row} * p.n + col0))
                        : make_uint2(0, 0);
      }
      const int kk = step * kStepRows + 8 * t;  // K % 8 == 0: all 8 in or all out
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        const int m = 8 * mt + g;
        const bool ok = step < warp_end && kk < p.k && m < p.m;
        xv[u][mt] = ok ? __ldg(reinterpret_cast<const uint2*>(p.a + int64_t{m} * p.k + kk))
                       : make_uint2(0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u >= warp_end) break;  // warp-uniform
      // words[h][q][i]: column 4q + i of the lane's 8, K rows 8t + 4h .. 8t + 4h + 3.
      uint32_t words[2][2][4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t lo_rows[4] = {rows[u][4 * h].x, rows[u][4 * h + 1].x,
                                     rows[u][4 * h + 2].x, rows[u][4 * h + 3].x};
        const uint32_t hi_rows[4] = {rows[u][4 * h].y, rows[u][4 * h + 1].y,
                                     rows[u][4 * h + 2].y, rows[u][4 * h + 3].y};
        transpose_bytes_4x4(lo_rows, words[h][0]);
        transpose_bytes_4x4(hi_rows, words[h][1]);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        // MMA rows g, g + 8 = columns 2j, 2j + 1; registers 0, 1 hold K slots
        // 4t.. (rows 8t..8t+3), registers 2, 3 slots 16+4t.. (rows 8t+4..8t+7).
        const int q = j / 2, i = 2 * (j % 2);
        const uint32_t frag[4] = {words[0][q][i], words[0][q][i + 1], words[1][q][i],
                                  words[1][q][i + 1]};
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) mma_s8(acc[mt][j], frag, xv[u][mt].x, xv[u][mt].y);
      }
    }
  }

  // The warps' sums meet in shared memory; int32 atomics wrap like the MMA's
  // own sums, and any order gives the same bits. Register r of MMA j, tile mt
  // is row 8 mt + 2t + r % 2 of a, column 8g + 2j + r / 2 of the strip.
  __syncthreads();  // the zeroed sums are visible
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        atomicAdd(&sums[sum_index(8 * mt + 2 * t + r % 2, 8 * g + 2 * j + r / 2)], acc[mt][j][r]);
      }
    }
  }
  __syncthreads();
}

// A product's units of work for int_gemm_small_m_kernel: its 32-row steps
// of K, and (strip pair, step) units.
struct StripPairWork {
  int steps;
  int64_t units;
};
__host__ __device__ inline StripPairWork strip_pair_work(const IntGemmArgs& p) {
  const int steps = (p.k + kStepRows - 1) / kStepRows;
  return {steps, int64_t{(p.n + 2 * kColumns - 1) / (2 * kColumns)} * steps};
}

// Work is balanced over exactly the CTAs that run at once (stream-K): a
// grid of equal K splits ran the 14336-row layer as 7 splits of 64 strips,
// 448 CTAs for 264 places (docs/perf.md v19). The units of work are (strip
// pair, step); CTA pair c takes units [units * c / P, units * (c + 1) / P),
// its even CTA the pair's first strip and its odd CTA the second. Pairs,
// because a CTA reads half of each 128-byte line of b and the neighbouring
// strip's CTA the other half: walking K side by side, the two find each line
// in L2 (strips taken one by one made the 28672-column layer 1.6x slower).
// A strip whose steps several CTAs share is summed by int32 atomics in y.
// The CTAs zero y themselves first, and arrive at a grid barrier that
// they wait on only before they first write y (a cooperative launch keeps
// the whole grid resident): by then every CTA has long arrived. A memset
// before the launch cost about 1.1 µs a layer, a zeroing kernel with a
// programmatic dependent launch 0.9 (v19); summing through distributed
// shared memory instead needs whole strips per cluster, which left more
// SMs idle.
template <int kMTiles>
__global__ void __launch_bounds__(kThreads, IntConfig<kMTiles>::kCtasPerSm)
    int_gemm_small_m_kernel(const IntGemmArgs p, const bool shared_strips) {
  constexpr int kRows = 8 * kMTiles;
  __shared__ int32_t sums[kRows * kSumStride];

  const auto [steps, units] = strip_pair_work(p);
  const int cta_pairs = int(gridDim.x / 2);
  const int pair_index = int(blockIdx.x / 2);
  int64_t unit = units * pair_index / cta_pairs;
  const int64_t last = units * (pair_index + 1) / cta_pairs;
  const int rows = min(kRows, p.m);

  // Valid only in a cooperative launch: used only with shared strips.
  const cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  unsigned int zeroed = 0;  // the grid barrier's arrival token
  bool zeros_seen = !shared_strips;
  if (shared_strips) {
    const int64_t count = int64_t{p.m} * p.n;
    for (int64_t i = int64_t{blockIdx.x} * kThreads + threadIdx.x; i < count;
         i += int64_t{gridDim.x} * kThreads) {
      p.y[i] = 0;
    }
    zeroed = grid.barrier_arrive();
  }

  for (int i = threadIdx.x; i < kRows * kSumStride; i += kThreads) sums[i] = 0;
  while (unit < last) {
    const int begin = int(unit % steps);
    const int64_t left = last - unit;
    const int end = left < steps - begin ? begin + int(left) : steps;
    const int strip = int((unit / steps) * 2 + blockIdx.x % 2) * kColumns;
    unit += end - begin;
    if (strip >= p.n) continue;  // CTA-uniform: the last pair of an odd strip count
    add_strip_steps<kMTiles>(p, strip, begin, end, sums);

    // Row-major y: consecutive threads write consecutive columns of a row.
    const bool whole = begin == 0 && end == steps;
    if (!zeros_seen) {  // CTA-uniform; whole strips too, so no zero lands on a sum
      grid.barrier_wait(unsigned{zeroed});
      zeros_seen = true;
    }
    for (int i = threadIdx.x; i < rows * kColumns; i += kThreads) {
      const int row = i / kColumns, col = i % kColumns;
      if (strip + col >= p.n) continue;
      const int32_t sum = sums[sum_index(row, col)];
      int32_t* out = p.y + int64_t{row} * p.n + strip + col;
      // Unsigned, so the sum wraps modulo 2^32 without undefined behaviour.
      if (whole) {
        *out = sum;
      } else {
        atomicAdd(reinterpret_cast<uint32_t*>(out), static_cast<uint32_t>(sum));
      }
    }
    __syncthreads();  // every thread has read the sums
    for (int i = threadIdx.x; i < kRows * kSumStride; i += kThreads) sums[i] = 0;
  }
}

// Whether any CTA pair's range of units begins inside a strip pair, so that
// two CTAs add into one strip of y.
inline bool strips_shared(int64_t units, int steps, int cta_pairs) {
  for (int c = 1; c < cta_pairs; ++c) {
    if (units * c / cta_pairs % steps != 0) return true;
  }
  return false;
}

template <int kMTiles>
cudaError_t launch(const IntGemmArgs& p, cudaStream_t stream) {
  constexpr auto kKernel = int_gemm_small_m_kernel<kMTiles>;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const auto [steps, units] = strip_pair_work(p);
  // As many CTA pairs as run at once, each with at least a full batch of
  // steps for every warp.
  const int concurrent = concurrent_ctas<kKernel>(device, 1, kThreads, 0);
  const int64_t useful = units / (kWarps * IntConfig<kMTiles>::kUnroll);
  const int cta_pairs = int(std::max<int64_t>(1, std::min<int64_t>(concurrent / 2, useful)));
  const bool shared_strips = strips_shared(units, steps, cta_pairs);
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(2 * cta_pairs);
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  cudaLaunchAttribute cooperative = {};
  cooperative.id = cudaLaunchAttributeCooperative;
  cooperative.val.cooperative = 1;
  config.attrs = &cooperative;
  config.numAttrs = shared_strips ? 1 : 0;
  err = cudaLaunchKernelEx(&config, kKernel, p, shared_strips);
  return err != cudaSuccess ? err : cudaGetLastError();
}

ffi::Error int_gemm_small_m_impl(cudaStream_t stream, ffi::Buffer<ffi::S8> a,
                                 ffi::Buffer<ffi::S8> b, ffi::Result<ffi::Buffer<ffi::S32>> y) {
  IntGemmArgs p;
  const ffi::Error error = int_gemm_problem("int_gemm_small_m", a, b, y, kMaxRows, 8, p);
  if (error.failure()) return error;
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();
  // One 8-row M tile, or two.
  return launch_status(p.m <= 8 ? launch<1>(p, stream) : launch<2>(p, stream),
                       "int_gemm_small_m");
}

}  // namespace
}  // namespace jax_lowbit

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitIntGemmSmallMCuda, jax_lowbit::int_gemm_small_m_impl,
                              jax_lowbit::int_gemm_binding(),
                              {xla::ffi::Traits::kCmdBufferCompatible});
