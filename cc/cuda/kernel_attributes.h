// Per-device kernel attributes the launchers set once.
#ifndef JAX_LOWBIT_CUDA_KERNEL_ATTRIBUTES_H_
#define JAX_LOWBIT_CUDA_KERNEL_ATTRIBUTES_H_

#include <cuda_runtime.h>

#include <atomic>

namespace jax_lowbit {

constexpr int kMaxDevices = 64;

// A kernel gets more than 48 KB of dynamic shared memory only once its limit
// is raised, per device: done once per kernel and device.
template <auto kKernel>
cudaError_t allow_shared_memory(int device, int bytes) {
  static std::atomic<bool> done[kMaxDevices];
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  if (done[device].load(std::memory_order_relaxed)) return cudaSuccess;
  const cudaError_t err =
      cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess) done[device].store(true, std::memory_order_relaxed);
  return err;
}

}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_CUDA_KERNEL_ATTRIBUTES_H_
