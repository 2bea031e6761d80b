// The arithmetic of matmul(x, qw, act_bits=8) (docs/formats.md, "Quantized
// activations"), shared by the CPU handler and the CUDA kernels so that every
// implementation quantizes x and combines the exact integer group sums with
// the same float32 roundings.
#ifndef JAX_LOWBIT_ACT_QUANT_H_
#define JAX_LOWBIT_ACT_QUANT_H_

#include <cmath>
#include <cstdint>

#include "format.h"

namespace jax_lowbit {

// The int8 grid of x is symmetric, -127 .. 127 (-128 is never produced).
constexpr float kActivationMax = 127.f;

// float32 product and sum with one rounding each. nvcc would contract
// a * b + c into an fma, which rounds once for both; the host build compiles
// the CPU handler with -ffp-contract=off for the same reason.
LOWBIT_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

LOWBIT_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// float32's smallest normal, 2^-126.
constexpr float kSmallestNormal = 1.17549435e-38f;

// Per-row scale s = absmax / 127: a correctly rounded division on both sides
// (nvcc's default -prec-div=true). A subnormal s counts as 0 (the row as all
// zeros): XLA:CPU runs handlers with subnormals flushed to zero, the GPU does
// not, and this way no platform divides by one.
LOWBIT_HD float activation_scale(float absmax) {
  const float scale = absmax / kActivationMax;
  return scale < kSmallestNormal ? 0.f : scale;
}

// clip(round_half_even(x / s), -127, 127); an all-zero row (s == 0) gives 0.
// rintf rounds half to even in the default rounding mode.
LOWBIT_HD int32_t quantize_activation(float x, float scale) {
  if (scale == 0.f) return 0;
  const float q = rintf(x / scale);
  return static_cast<int32_t>(fminf(fmaxf(q, -kActivationMax), kActivationMax));
}

// What group g contributes to y[m, n] / s[m]: p = sum xq * (code - 2^(bits-1))
// and t = sum xq over the group's rows (t is read for asymmetric weights only).
// p + 2^(bits-1) t = sum xq * code is formed in uint32 so that a sum past int32
// wraps modulo 2^32 instead of being undefined.
LOWBIT_HD float group_term(int32_t p, int32_t t, int bits, bool symmetric, float scale,
                           float offset) {
  if (symmetric) return mul_rn(static_cast<float>(p), scale);
  const int32_t codes_dot =
      static_cast<int32_t>(static_cast<uint32_t>(p) + (static_cast<uint32_t>(t) << (bits - 1)));
  return add_rn(mul_rn(static_cast<float>(codes_dot), scale),
                mul_rn(static_cast<float>(t), offset));
}

}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_ACT_QUANT_H_
