// How fast can the small-M kernel's reads be? Reads each suite layer's packed
// int4 / int2 weight (i) contiguously, (ii) in gemm_small_m's pattern (a CTA
// owns 32 columns, lane (g, t) reads 16 bytes at word row 4 * step + t, warps
// take steps round-robin, 4 (int4) or 2 (int2) loads per lane in flight), then
// with the kernel's other parts added one at a time: the x and scale loads of
// each step, the in-CTA reduction through shared memory, and a synthetic ALU
// load per code word; and each layer's 2:4 sparse int4 g128 weight (codes,
// metadata, scales: 3/8 byte a weight and 2 bytes per 128) read contiguously.
// Not part of the package; docs/perf.md (v11, v15) quotes it.
//
//   nvcc -O3 -arch=sm_90a -o /tmp/read_pattern benchmarks/read_pattern.cu && /tmp/read_pattern
//
// Times are per kernel, CUDA events over 50 back-to-back launches (launch gaps
// included, as in the benchmark's GPU span), two weight copies in turn so
// that the weight never sits in L2.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

constexpr int kWarps = 16;

template <int kLoads>
__global__ void __launch_bounds__(512, 2) read_contiguous(const uint4* w, int64_t count,
                                                           uint32_t* out) {
  uint32_t acc = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += stride * kLoads) {
    uint4 v[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      v[u] = i + u * stride < count ? __ldcs(w + i + u * stride) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kLoads; ++u) acc += v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == 0x12345678u) out[threadIdx.x] = acc;  // keeps the loads
}

// kXLoads: 16-byte x loads per step (lanes g == 0, as at M = 1; 0: no x or
// scale loads); kWork: dependent integer ops per code word; kReduce: the
// epilogue's shared-memory reduction.
template <int kLoads, int kXLoads, int kWork, bool kReduce>
__global__ void __launch_bounds__(512, 2) read_strips(const uint32_t* w, const uint4* x,
                                                      const uint2* scales, int rows, int n,
                                                      float* out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int col = blockIdx.x * 32 + 4 * g;
  const int steps = rows / 4;
  uint32_t acc[4] = {0, 0, 0, 0};
  for (int base = warp; base < steps; base += kWarps * kLoads) {
    uint4 v[kLoads];
    uint4 xv[kLoads][kXLoads > 0 ? kXLoads : 1];
    uint2 s[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int step = base + u * kWarps;
      const int row = 4 * step + t;
      const bool ok = step < steps;
      v[u] = ok ? __ldcs(reinterpret_cast<const uint4*>(w + int64_t(row) * n + col))
                : make_uint4(0, 0, 0, 0);
      if constexpr (kXLoads > 0) {
        s[u] = ok ? __ldg(scales + (int64_t(row / 16) * n + col) / 4) : make_uint2(0, 0);
#pragma unroll
        for (int j = 0; j < kXLoads; ++j) {
          xv[u][j] = ok && g == 0 ? __ldg(x + row * kXLoads + j) : make_uint4(0, 0, 0, 0);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      uint32_t word[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
      if constexpr (kXLoads > 0) {
        word[0] ^= s[u].x;
        word[1] ^= s[u].y;
#pragma unroll
        for (int j = 0; j < kXLoads; ++j) {
          word[0] += xv[u][j].x, word[1] += xv[u][j].y, word[2] += xv[u][j].z, word[3] += xv[u][j].w;
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        uint32_t a = acc[i];
#pragma unroll
        for (int r = 0; r < kWork; ++r) a = a * 3u + (word[i] >> r);
        acc[i] = a + word[i];
      }
    }
  }
  const uint32_t bits = acc[0] ^ acc[1] ^ acc[2] ^ acc[3];
  if constexpr (kReduce) {  // as reduce_and_store at one M tile
    __shared__ float partial[kWarps][8][32];
    partial[warp][g][t * 8] = __uint_as_float(bits & 0x3FFFFFFFu);
    __syncthreads();
    if (threadIdx.x < 256) {
      float sum = 0.f;
#pragma unroll
      for (int wi = 0; wi < kWarps; ++wi) sum += partial[wi][threadIdx.x / 32][threadIdx.x % 32];
      if (threadIdx.x < 32) out[blockIdx.x * 32 + threadIdx.x] = sum;
    }
    __syncthreads();
  } else if (bits == 0x12345678u) {
    out[threadIdx.x] = 1.f;
  }
}

template <typename Launch>
float kernel_us(Launch launch) {
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  launch(0);
  launch(1);
  constexpr int kReps = 50;
  cudaEventRecord(start);
  for (int r = 0; r < kReps; ++r) launch(r & 1);
  cudaEventRecord(stop);
  cudaEventSynchronize(stop);
  float ms = 0.f;
  cudaEventElapsedTime(&ms, start, stop);
  return ms * 1000.f / kReps;
}

// Reads `bytes` contiguously, two copies in turn.
float contiguous_us(size_t bytes, int sms, float* out) {
  uint4* w[2];
  for (auto& copy : w) {
    cudaMalloc(&copy, bytes);
    cudaMemset(copy, 1, bytes);
  }
  const float us = kernel_us([&](int i) {
    read_contiguous<4><<<2 * sms, 512>>>(w[i], bytes / 16, reinterpret_cast<uint32_t*>(out));
  });
  for (auto& copy : w) cudaFree(copy);
  return us;
}

template <int kBits>
void measure_layer(int k, int n, int sms, const uint4* x, float* out) {
  constexpr int kLoads = kBits == 4 ? 4 : 2;  // as gemm_small_m at M = 1
  constexpr int kXLoads = kBits == 4 ? 1 : 2;  // 8 or 16 activations per word
  const int rows = k / (32 / kBits);
  const size_t bytes = size_t(rows) * n * 4;
  const size_t scale_bytes = size_t(rows / 16 + 1) * n * 2;
  uint32_t* w[2];
  uint2* s[2];
  for (int i = 0; i < 2; ++i) {
    cudaMalloc(&w[i], bytes);
    cudaMemset(w[i], 1, bytes);
    cudaMalloc(&s[i], scale_bytes);
    cudaMemset(s[i], 1, scale_bytes);
  }
  const int ctas = n / 32;
  float us[5];
  us[0] = contiguous_us(bytes, sms, out);
  us[1] = kernel_us([&](int i) {
    read_strips<kLoads, 0, 0, false><<<ctas, 512>>>(w[i], x, s[i], rows, n, out);
  });
  us[2] = kernel_us([&](int i) {
    read_strips<kLoads, kXLoads, 0, false><<<ctas, 512>>>(w[i], x, s[i], rows, n, out);
  });
  us[3] = kernel_us([&](int i) {
    read_strips<kLoads, kXLoads, 0, true><<<ctas, 512>>>(w[i], x, s[i], rows, n, out);
  });
  us[4] = kernel_us([&](int i) {
    read_strips<kLoads, kXLoads, 8, true><<<ctas, 512>>>(w[i], x, s[i], rows, n, out);
  });
  printf("int%d %5d x %5d %6.1f MB |", kBits, k, n, bytes / 1e6);
  for (float u : us) printf(" %6.2f us (%4.0f GB/s) |", u, bytes / u / 1e3);
  printf("\n");
  for (int i = 0; i < 2; ++i) {
    cudaFree(w[i]);
    cudaFree(s[i]);
  }
}

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  float* out;
  uint4* x;
  cudaMalloc(&out, 28672 * sizeof(float));
  cudaMalloc(&x, 1 << 20);
  cudaMemset(x, 1, 1 << 20);
  printf("layer | contiguous | strips | + x, scale loads | + reduction | + ALU work 8\n");
  const int layers[][2] = {{4096, 6144}, {4096, 4096}, {4096, 28672}, {14336, 4096}};
  for (auto& l : layers) measure_layer<4>(l[0], l[1], sms, x, out);
  for (auto& l : layers) measure_layer<2>(l[0], l[1], sms, x, out);
  for (auto& l : layers) {
    const size_t bytes = size_t(l[0]) * l[1] * 3 / 8 + size_t(l[0] / 128) * l[1] * 2;
    const float us = contiguous_us(bytes, sms, out);
    printf("2:4 int4 %5d x %5d %6.1f MB | %6.2f us (%4.0f GB/s)\n", l[0], l[1], bytes / 1e6, us,
           bytes / us / 1e3);
  }
  const cudaError_t err = cudaDeviceSynchronize();
  printf("status: %s\n", cudaGetErrorString(err));
  return err == cudaSuccess ? 0 : 1;
}
