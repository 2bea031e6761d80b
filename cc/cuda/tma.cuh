// Tensor memory accelerator (TMA, sm_90) loads of 2-D tiles into shared
// memory, completed on an mbarrier: on the host the tensor map of a
// row-major array, on the device the barrier and copy instructions (PTX ISA
// 9.7.9.25 and 9.7.13.15). One thread asks for a whole tile, so the other
// threads spend no instructions on loads; rows and columns past the array's
// end arrive as zeros.
#ifndef JAX_LOWBIT_CUDA_TMA_CUH_
#define JAX_LOWBIT_CUDA_TMA_CUH_

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/cp_async.cuh"  // shared_address

namespace jax_lowbit {
namespace tma {

// --- host ---------------------------------------------------------------------

// cuTensorMapEncodeTiled from the driver the runtime uses (asked for once),
// so the extension needs no link to libcuda; null if the driver lacks it.
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                 const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                 const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                 CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

inline EncodeTiled encode_tiled() {
  static const EncodeTiled encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return EncodeTiled{nullptr};
    }
    return reinterpret_cast<EncodeTiled>(fn);
  }();
  return encode;
}

// The map of a row-major (rows x columns) array of 1-, 2- or 4-byte elements
// whose tiles are box_rows x box_columns; `swizzle_128` stores each tile row
// (then exactly 128 bytes) in the 128-byte swizzle layout that wgmma reads.
// False if the driver refuses (the caller reports it).
inline bool map_2d(CUtensorMap* map, const void* base, int element_bytes, uint64_t rows,
                   uint64_t columns, uint32_t box_rows, uint32_t box_columns, bool swizzle_128) {
  const EncodeTiled encode = encode_tiled();
  if (encode == nullptr) return false;
  const cuuint64_t dims[2] = {columns, rows};
  const cuuint64_t row_stride[1] = {columns * element_bytes};
  const cuuint32_t box[2] = {box_columns, box_rows};
  const cuuint32_t element_strides[2] = {1, 1};
  return encode(map,
                element_bytes == 4   ? CU_TENSOR_MAP_DATA_TYPE_UINT32
                : element_bytes == 2 ? CU_TENSOR_MAP_DATA_TYPE_UINT16
                                     : CU_TENSOR_MAP_DATA_TYPE_UINT8,
                2, const_cast<void*>(base), dims, row_stride, box, element_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE,
                swizzle_128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_NONE,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// --- device -------------------------------------------------------------------

// A barrier that `arrivals` arrivals complete (by default one: the thread
// asking for the loads, whose bytes complete it too); fence_init makes it
// visible to the TMA unit.
__device__ __forceinline__ void init_barrier(uint64_t* barrier, int arrivals = 1) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(barrier)),
               "r"(arrivals));
}
__device__ __forceinline__ void fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// Arrive and announce `bytes` of loads to come on the barrier's current phase.
__device__ __forceinline__ void expect_bytes(uint64_t* barrier, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(
                   shared_address(barrier)),
               "r"(bytes)
               : "memory");
}

// One arrival on the barrier's current phase (a consumer done with a slot).
__device__ __forceinline__ void arrive(uint64_t* barrier) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(shared_address(barrier))
               : "memory");
}

// The tile at (row, column) of `map` to `destination`, counted on `barrier`.
__device__ __forceinline__ void load_2d(void* destination, const CUtensorMap* map, int row,
                                        int column, uint64_t* barrier) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(shared_address(destination)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(column), "r"(row), "r"(shared_address(barrier))
      : "memory");
}

// Returns once the barrier's phase of parity `phase` has completed.
__device__ __forceinline__ void wait(uint64_t* barrier, uint32_t phase) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "retry:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra retry;\n"
      "}\n" ::"r"(shared_address(barrier)),
      "r"(phase)
      : "memory");
}

// A ring of `slots` stages in shared memory, each completed on its barrier
// (barriers[slot]); stage j lives in slot j % slots and completes phase
// j / slots of that barrier. `ahead` stages load ahead: stage i's slot is
// refilled (with stage i + slots) when stage i + slots - ahead begins, with
// the stages begun together with it. load(j) is called by one thread
// (`loader`; thread 0 for the first stages) and must ask for stage j's
// tiles on barriers[j % slots].
//
// Thread 0 initializes the barriers and asks for the first stages; every
// thread returns once the barriers are initialized.
template <typename Load>
__device__ __forceinline__ void start_ring(uint64_t* barriers, int slots, int ahead, int stages,
                                           Load&& load) {
  if (threadIdx.x == 0) {
    for (int i = 0; i < slots; ++i) init_barrier(barriers + i);
    fence_init();
    for (int i = 0; i < ahead && i < stages; ++i) load(i);
  }
  __syncthreads();
}

// Waits for stage j of a ring of `slots`, stage j in slot j % slots.
__device__ __forceinline__ void wait_stage(uint64_t* barriers, int slots, int j) {
  wait(barriers + j % slots, (j / slots) & 1);
}

// Begins stages j .. j + count - 1 (j < stages; of the others, those below
// `stages`): waits for them; then, every thread of the CTA being past its reads of
// stages j + ahead - slots .. + count - 1 (the caller's warps must have
// finished their wgmmas on them), thread `loader` refills their slots with
// stages j + ahead .. + count - 1. One CTA barrier for `count` stages.
template <typename Load>
__device__ __forceinline__ void begin_ring_stages(uint64_t* barriers, int slots, int ahead, int j,
                                                  int count, int stages, int loader,
                                                  Load&& load) {
  wait_stage(barriers, slots, j);
  for (int i = 1; i < count && j + i < stages; ++i) wait_stage(barriers, slots, j + i);
  __syncthreads();
  for (int i = 0; i < count; ++i) {
    if (threadIdx.x == loader && j + ahead + i < stages) load(j + ahead + i);
  }
}

// A ring of `slots` stages in shared memory that one producer thread fills
// and `consumer_warps` warps read (int_gemm_large_m.cu,
// act_quant_gemm_large_m.cu): stage j lives in slot j % slots; its "full"
// barrier completes when its loads have landed, its "empty" barrier when
// every consumer warp is done with it. No CTA barrier, so the consumers
// never wait for each other. The barriers are 2 * slots uint64s.
struct ProducerRing {
  uint64_t* full;
  uint64_t* empty;
  int slots;

  // Thread 0 initializes the barriers; every thread returns once they are.
  __device__ __forceinline__ void init(int consumer_warps) const {
    if (threadIdx.x == 0) {
      for (int i = 0; i < slots; ++i) {
        init_barrier(full + i);
        init_barrier(empty + i, consumer_warps);
      }
      fence_init();
    }
    __syncthreads();
  }
  // Producer: once stage j's slot is free (stage j - slots released),
  // announces `bytes` of loads; returns the barrier the loads complete on.
  __device__ __forceinline__ uint64_t* begin_fill(int j, uint32_t bytes) const {
    const int slot = j % slots;
    if (j >= slots) wait(empty + slot, (j / slots - 1) & 1);
    expect_bytes(full + slot, bytes);
    return full + slot;
  }
  // Consumer: returns once stage j's loads have landed.
  __device__ __forceinline__ void wait_full(int j) const {
    wait(full + j % slots, (j / slots) & 1);
  }
  // Consumer: one lane per warp, once the warp (and its wgmmas) are done with stage j.
  __device__ __forceinline__ void release(int j) const {
    if (threadIdx.x % 32 == 0) arrive(empty + j % slots);
  }
};

}  // namespace tma
}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_CUDA_TMA_CUH_
