// What the two FFI targets of W8A8 / W4A8 products share: their signature,
// their argument checks and the output store. jax_lowbit_act_quant_gemm
// (act_quant_gemm.cu, mma.sync, sm_80+) and jax_lowbit_act_quant_gemm_large_m
// (act_quant_gemm_large_m.cu, wgmma, sm_90) read the same arrays: xq, s and
// t from the quantize_rows pre-pass and the weight's packed codes in place.
#ifndef JAX_LOWBIT_CUDA_ACT_QUANT_TARGET_H_
#define JAX_LOWBIT_CUDA_ACT_QUANT_TARGET_H_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda/convert.cuh"
#include "weight_shape.h"
#include "cuda/handlers.h"
#include "xla/ffi/api/ffi.h"

namespace jax_lowbit {

// The float types of outputs and of scales.
enum class FloatType { kF32, kBF16, kF16 };

inline FloatType float_type(xla::ffi::DataType type) {
  return type == xla::ffi::F32    ? FloatType::kF32
         : type == xla::ffi::BF16 ? FloatType::kBF16
                                  : FloatType::kF16;
}

struct ActQuantArgs {
  const int8_t* xq;           // (M, K)
  const float* x_scales;      // (M,)
  const int32_t* group_sums;  // (G, M)
  const uint32_t* codes;
  const void* scales;
  const void* offsets;
  void* y;  // (M, N)
  int m, k, n, groups;
  int group_steps;  // 32-row steps per group, a power of two (with more than one group)
  int bits;
  FloatType out_type;
  FloatType scale_type;  // as the offsets
};

// xq, x_scales, group_sums, codes, scales, offsets (symmetric weights pass
// their scales in the offsets slot; it is not read), y; attributes bits,
// group_size, symmetric.
inline auto act_quant_binding() {
  return with_gemm_output(xla::ffi::Ffi::Bind()
                              .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                              .Arg<xla::ffi::Buffer<xla::ffi::S8>>()
                              .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                              .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                              .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                              .Arg<xla::ffi::AnyBuffer>()
                              .Arg<xla::ffi::AnyBuffer>());
}

inline bool act_quant_float_type(xla::ffi::DataType type) {
  return type == xla::ffi::F32 || type == xla::ffi::BF16 || type == xla::ffi::F16;
}

// The checks of both targets: 4- or 8-bit codes of a well-formed weight,
// xq (M, K), x_scales (M,), group_sums (G, M), y (M, N), K a multiple of
// k_multiple, N of n_multiple, M at most max_rows, groups of 32 * 2^i rows.
// `name` starts each message. Fills `args` or names what is wrong.
inline xla::ffi::Error act_quant_problem(
    const char* name, xla::ffi::Buffer<xla::ffi::S8> xq, xla::ffi::Buffer<xla::ffi::F32> x_scales,
    xla::ffi::Buffer<xla::ffi::S32> group_sums, xla::ffi::Buffer<xla::ffi::U32> codes,
    xla::ffi::AnyBuffer scales, xla::ffi::AnyBuffer offsets,
    xla::ffi::Result<xla::ffi::AnyBuffer> y, int32_t bits, int64_t group_size, int k_multiple,
    int n_multiple, int64_t max_rows, ActQuantArgs& args) {
  namespace ffi = xla::ffi;
  auto invalid = [&](const char* what) {
    return ffi::Error::InvalidArgument(std::string(name) + ": " + what);
  };
  WeightShape w;
  ffi::Error shape_error = act_quant_weight_shape(codes.dimensions(), scales.dimensions(),
                                                  offsets.dimensions(), bits, group_size, w);
  if (shape_error.failure()) return shape_error;
  const auto scale_type = scales.element_type();
  if (!act_quant_float_type(scale_type) || offsets.element_type() != scale_type ||
      !act_quant_float_type(y->element_type())) {
    return invalid("scales and offsets must share f32, bf16 or f16; y must be one of them");
  }
  const auto xq_dims = xq.dimensions();
  const auto y_dims = y->dimensions();
  if (xq_dims.size() != 2) return invalid("xq must be 2-D");
  const int64_t m_rows = xq_dims[0];
  if (xq_dims[1] != w.k || x_scales.dimensions().size() != 1 ||
      x_scales.dimensions()[0] != m_rows || group_sums.dimensions().size() != 2 ||
      group_sums.dimensions()[0] != w.groups || group_sums.dimensions()[1] != m_rows ||
      y_dims.size() != 2 || y_dims[0] != m_rows || y_dims[1] != w.n) {
    return invalid("needs xq (M, K), x_scales (M,), group_sums (G, M) and y (M, N)");
  }
  const int64_t group_steps = w.group_rows / 32;
  if (w.k % k_multiple != 0 || w.n % n_multiple != 0 || w.k > INT32_MAX / 2 ||
      w.n > INT32_MAX / 2 || m_rows > max_rows ||
      (w.groups > 1 && (w.group_rows % 32 != 0 || (group_steps & (group_steps - 1))))) {
    return invalid(("needs K % " + std::to_string(k_multiple) + " == 0, N % " +
                    std::to_string(n_multiple) + " == 0, M <= " + std::to_string(max_rows) +
                    " and groups of 32 * 2^i rows")
                       .c_str());
  }
  args = ActQuantArgs{xq.typed_data(),       x_scales.typed_data(), group_sums.typed_data(),
                      codes.typed_data(),    scales.untyped_data(), offsets.untyped_data(),
                      y->untyped_data(),     static_cast<int>(m_rows),
                      static_cast<int>(w.k), static_cast<int>(w.n),
                      static_cast<int>(w.groups), static_cast<int>(group_steps),
                      static_cast<int>(w.bits), float_type(y->element_type()),
                      float_type(scale_type)};
  return ffi::Error::Success();
}

// p[i] as float32.
__device__ __forceinline__ float load_float(const void* p, int64_t i, FloatType type) {
  switch (type) {
    case FloatType::kF32: return static_cast<const float*>(p)[i];
    case FloatType::kBF16: return to_float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return to_float(static_cast<const __half*>(p)[i]);
  }
}

__host__ __device__ __forceinline__ int float_bytes(FloatType type) {
  return type == FloatType::kF32 ? 4 : 2;
}

// y[i] = v in the output's type (rounded to nearest even).
__device__ __forceinline__ void store_output(void* y, int64_t i, float v, FloatType type) {
  switch (type) {
    case FloatType::kF32: static_cast<float*>(y)[i] = v; break;
    case FloatType::kBF16: static_cast<__nv_bfloat16*>(y)[i] = from_float<__nv_bfloat16>(v); break;
    case FloatType::kF16: static_cast<__half*>(y)[i] = from_float<__half>(v); break;
  }
}

// y[i], y[i + 1] = v0, v1 as Out (rounded to nearest even), i even: one store.
template <typename Out>
__device__ __forceinline__ void store_output_pair(void* y, int64_t i, float v0, float v1) {
  struct alignas(2 * sizeof(Out)) Pair {
    Out v[2];
  };
  *reinterpret_cast<Pair*>(static_cast<Out*>(y) + i) = Pair{{from_float<Out>(v0), from_float<Out>(v1)}};
}

}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_CUDA_ACT_QUANT_TARGET_H_
