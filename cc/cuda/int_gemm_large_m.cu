// int_matmul above 16 rows on Hopper: y (M, N) int32 = a (M, K) int8 @
// b (K, N) int8, exact (sums wrap modulo 2^32 like XLA's int32 dot), on
// int8 warpgroup MMAs (wgmma s8, sm_90a), with a and b read in place.
//  * s8 wgmmas want both operands K-major; b is N-major (row-major (K, N)),
//    and a transposing pass over it would move 2 bytes a weight in HBM
//    before the product reads it. So b is the register operand A
//    (y^T = b^T a^T: MMA rows are columns of b, MMA columns are rows of a),
//    transposed on its way from shared memory to registers: ldmatrix.trans
//    moves 16-bit elements, here the byte pairs of two adjacent columns,
//    and one prmt per A register separates the two columns. a is the shared
//    memory operand B, K-major as it lies.
//  * A CTA is two consumer warpgroups and one producer warp. Each consumer
//    warpgroup owns 64 output columns (one m64 block) for kRows rows of a,
//    the wgmma N (128 or 256); the CTA's tile is 128 columns x kRows rows.
//    Warp w of a warpgroup owns its columns 16w .. 16w + 15: MMA row g is
//    column 16w + 2g, MMA row g + 8 is column 16w + 2g + 1.
//  * The producer warp's first lane asks for each stage's tiles by TMA:
//    kRows rows of a and 128 rows of b, 128 bytes each (one stage is 128 of
//    K), both in the 128-byte swizzle layout. A slot is refilled once every
//    consumer warp has arrived on its "empty" barrier, so the warpgroups
//    never wait for each other (no CTA barrier in the main loop).
//  * ldmatrix.x4.trans: lanes 8j .. 8j + 7 give the addresses of the 8
//    rows (K rows, 16 bytes: the warp's 16 columns) of matrix j, and lane
//    (g, t) gets from each matrix the byte pairs of its rows 2t and 2t + 1
//    at pair g. The A fragment wants K rows 4t .. 4t + 3 in register 0
//    (column 2g) and 1 (column 2g + 1), 16 + 4t .. in registers 2 and 3. So
//    matrices 0 and 1 hold K rows 0..15, matrices 2 and 3 rows 16..31, and
//    each of a pair holds two of every lane's four rows. Which two is chosen
//    so that the 8 rows of a matrix differ in row % 8: in the swizzle
//    layout their 16-byte chunks then lie in 8 different bank groups (no
//    bank conflicts). Lanes t = 2, 3 get their lower rows from matrix 1,
//    which the prmt selector (per lane) undoes.
//  * The first wgmma of the tile passes accumulate = 0 (no register writes,
//    which would serialize the wgmmas). Two A register sets: the set of step
//    s + 1 is loaded once the wgmma of step s - 1 is done, while step s's
//    runs.
// Requires K % 16 == 0 and N % 16 == 0 (TMA rows are multiples of 16 bytes);
// the lowering sends other shapes to XLA's integer dot. K rows past K and
// rows past M arrive as zeros; columns past N are not stored.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/handlers.h"
#include "cuda/int_gemm_target.h"
#include "cuda/kernel_attributes.h"
#include "cuda/launch_status.h"
#include "cuda/mma_fragments.cuh"
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"

namespace jax_lowbit {
namespace {

namespace ffi = xla::ffi;

constexpr int kConsumerThreads = 256;             // two warpgroups
constexpr int kThreads = kConsumerThreads + 32;   // and the producer warp
constexpr int kColumns = 128;                     // output columns per CTA
constexpr int kStageK = 128;                      // K rows per stage: one 128-byte row
constexpr int kMaxSharedBytes = 227 * 1024;       // per CTA on sm_90

template <int kRows>
struct IntStageLayout {
  static constexpr int kABytes = kRows * kStageK;
  static constexpr int kBBytes = kStageK * kColumns;
  static constexpr int kBytes = kABytes + kBBytes;  // a multiple of 1024 (swizzle alignment)
  static constexpr int kStages = (kMaxSharedBytes - 1024) / kBytes;
  static constexpr int kBarrierOffset = kStages * kBytes;
  static constexpr int kSharedBytes = kBarrierOffset + 2 * kStages * 8;
  static_assert(kBytes % 1024 == 0, "tiles start 1024-byte aligned");
};

struct IntMaps {
  CUtensorMap a, b;
};

template <int kRows>
__global__ void __launch_bounds__(kThreads, 1)
    int_gemm_large_m_kernel(const IntGemmArgs p, int row_tiles,
                            const __grid_constant__ IntMaps maps) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = IntStageLayout<kRows>;
  constexpr int kStages = L::kStages;
  constexpr int kStepK = 32;  // K rows per wgmma
  constexpr int kSteps = kStageK / kStepK;
  extern __shared__ __align__(1024) char smem[];
  uint64_t* barriers = reinterpret_cast<uint64_t*>(smem + L::kBarrierOffset);
  const tma::ProducerRing ring{barriers, barriers + kStages, kStages};

  const int row0 = blockIdx.x % row_tiles * kRows;
  const int col0 = blockIdx.x / row_tiles * kColumns;
  const int stages = (p.k + kStageK - 1) / kStageK;
  ring.init(kConsumerThreads / 32);

  if (threadIdx.x >= kConsumerThreads) {  // the producer warp
    if (threadIdx.x != kConsumerThreads) return;
    for (int j = 0; j < stages; ++j) {
      uint64_t* full = ring.begin_fill(j, L::kBytes);
      char* stage = smem + (j % kStages) * L::kBytes;
      tma::load_2d(stage, &maps.a, row0, j * kStageK, full);
      tma::load_2d(stage + L::kABytes, &maps.b, j * kStageK, col0, full);
    }
    return;
  }

  const int group = threadIdx.x / 128, warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  // This lane's ldmatrix row: matrix j = lane / 8, its row i = lane % 8. K
  // rows of matrix 0: {0, 1, 4, 5, 10, 11, 14, 15}, of matrix 1 the other
  // eight of 0..15 (rows 2t, 2t + 1 of each go to lane t); matrices 2 and 3
  // the same plus 16. Both sets hold every row % 8 once (see the header).
  const int i = lane % 8, j = lane / 8;
  const int pair_row = 4 * (i / 2) + i % 2 + ((i / 2 >= 2) ? 2 : 0);  // matrix 0's row i
  const int k_row = 16 * (j / 2) + (j % 2 == 0 ? pair_row : (pair_row ^ 2));
  // The warp's 16 columns are one 16-byte chunk of a 128-byte b row,
  // swizzled: chunk c of row r lies at chunk c ^ (r % 8).
  const int chunk = group * 4 + warp;
  const uint32_t ld_offset = L::kABytes + k_row * 128 + ((chunk ^ (k_row % 8)) << 4);
  // Lanes t = 0, 1 got K rows 4t, 4t + 1 in matrix 0 (the lower pair) and
  // 4t + 2, 4t + 3 in matrix 1; lanes t = 2, 3 the other way round. The
  // A register of column 2g takes byte 0 and 2 of each (the column's bytes),
  // that of column 2g + 1 bytes 1 and 3.
  const uint32_t select_even = t < 2 ? 0x6420 : 0x2064;
  const uint32_t select_odd = t < 2 ? 0x7531 : 0x3175;
  auto load_a = [&](uint32_t stage_address, int step, uint32_t(&frag)[4]) {
    uint32_t r[4];
    ldmatrix_x4_trans(r, stage_address + ld_offset + step * kStepK * 128);
    frag[0] = __byte_perm(r[0], r[1], select_even);
    frag[1] = __byte_perm(r[0], r[1], select_odd);
    frag[2] = __byte_perm(r[2], r[3], select_even);
    frag[3] = __byte_perm(r[2], r[3], select_odd);
  };

  int32_t acc[kRows / 2];  // left unset: the first wgmma overwrites them
  uint32_t a[2][4];
  const uint32_t smem_base = shared_address(smem);
  ring.wait_full(0);
  load_a(smem_base, 0, a[0]);
  for (int s = 0; s < stages; ++s) {
    const uint32_t stage_address = smem_base + (s % kStages) * L::kBytes;
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      const int set = step % 2;
      wgmma::fence();
      // B: a's rows, K rows 32 step .. + 31: 32 bytes into every 128-byte row.
      wgmma::Mma<int8_t>::mma(acc, a[set], wgmma::descriptor_sw128(stage_address + kStepK * step),
                              s + step != 0);
      wgmma::commit();
      wgmma::wait<1>();  // the wgmma of the step before is done, and its A set free
      if (step == 0 && s > 0) ring.release(s - 1);
      if (step + 1 < kSteps) {
        load_a(stage_address, step + 1, a[1 - set]);
      } else if (s + 1 < stages) {
        ring.wait_full(s + 1);
        load_a(smem_base + ((s + 1) % kStages) * L::kBytes, 0, a[1 - set]);
      }
    }
  }
  wgmma::wait<0>();

  // Accumulators 4q + h and 4q + 2 + h are MMA rows g and g + 8 (columns
  // column and column + 1) at MMA column 8q + 2t + h (a row of a): one
  // 8-byte store each.
  const int column = col0 + group * 64 + 16 * warp + 2 * g;
  if (column >= p.n) return;  // N % 16 == 0: both columns or neither
#pragma unroll
  for (int q = 0; q < kRows / 8; ++q) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = row0 + 8 * q + 2 * t + h;
      if (m < p.m) {
        *reinterpret_cast<int2*>(p.y + int64_t(m) * p.n + column) =
            make_int2(acc[4 * q + h], acc[4 * q + 2 + h]);
      }
    }
  }
#else
  __trap();  // the handler launches this kernel only on sm_90
#endif
}

template <int kRows>
cudaError_t launch(const IntGemmArgs& p, int device, cudaStream_t stream) {
  using L = IntStageLayout<kRows>;
  constexpr auto kernel = int_gemm_large_m_kernel<kRows>;
  IntMaps maps;
  if (!tma::map_2d(&maps.a, p.a, 1, p.m, p.k, kRows, kStageK, true) ||
      !tma::map_2d(&maps.b, p.b, 1, p.k, p.n, kStageK, kColumns, true)) {
    return cudaErrorInvalidValue;
  }
  cudaError_t err = allow_shared_memory<kernel>(device, L::kSharedBytes);
  if (err != cudaSuccess) return err;
  const int row_tiles = (p.m + kRows - 1) / kRows;
  const int tiles = row_tiles * ((p.n + kColumns - 1) / kColumns);
  kernel<<<tiles, kThreads, L::kSharedBytes, stream>>>(p, row_tiles, maps);
  return cudaGetLastError();
}

ffi::Error int_gemm_large_m_impl(cudaStream_t stream, ffi::Buffer<ffi::S8> a,
                                 ffi::Buffer<ffi::S8> b, ffi::Result<ffi::Buffer<ffi::S32>> y) {
  constexpr const char* kName = "int_gemm_large_m";
  IntGemmArgs p;
  ffi::Error error = int_gemm_problem(kName, a, b, y, INT32_MAX / 2, 16, p);
  if (error.failure()) return error;
  int device = 0;
  error = current_sm90_device(kName, device);
  if (error.failure()) return error;
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();
  if (p.k == 0) {  // an empty sum
    return launch_status(cudaMemsetAsync(p.y, 0, size_t(p.m) * p.n * 4, stream), kName);
  }
  // 256 rows of a per tile where the tiles fill the SMs, 128 below.
  // (cudaErrorInvalidValue: the driver refused a TMA tensor map.)
  return launch_status(p.m >= 1024 ? launch<256>(p, device, stream)
                                   : launch<128>(p, device, stream),
                       kName);
}

}  // namespace
}  // namespace jax_lowbit

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitIntGemmLargeMCuda, jax_lowbit::int_gemm_large_m_impl,
                              jax_lowbit::int_gemm_binding(),
                              {xla::ffi::Traits::kCmdBufferCompatible});
