// Shape checks of a packed weight (codes, scales, offsets) shared by every
// handler, so that a malformed call is refused with an ffi::Error before any
// kernel reads memory.
#ifndef JAX_LOWBIT_WEIGHT_SHAPE_H_
#define JAX_LOWBIT_WEIGHT_SHAPE_H_

#include <cstdint>
#include <string>

#include "format.h"
#include "xla/ffi/api/ffi.h"

namespace jax_lowbit {

namespace ffi = xla::ffi;

struct WeightShape {
  int bits;
  int64_t k;           // rows of the logical (K, N) weight
  int64_t n;           // columns
  int64_t group_rows;  // rows of K per scale
  int64_t groups;      // K / group_rows
};

// Scales and offsets: (groups, N) for the K and N already in `s`. Fills the
// groups of `s` or returns the error that names what is wrong.
inline ffi::Error group_shape(ffi::AnyBuffer::Dimensions scales,
                              ffi::AnyBuffer::Dimensions offsets, int64_t group_size,
                              WeightShape& s) {
  if (scales.size() != 2 || offsets.size() != 2) {
    return ffi::Error::InvalidArgument("scales and offsets must be 2-D");
  }
  s.group_rows = group_size == -1 ? s.k : group_size;
  if (s.group_rows <= 0 || s.k % s.group_rows != 0) {
    return ffi::Error::InvalidArgument("group size " + std::to_string(group_size) +
                                       " does not divide K=" + std::to_string(s.k));
  }
  s.groups = s.k / s.group_rows;
  if (scales[0] != s.groups || scales[1] != s.n || offsets[0] != s.groups ||
      offsets[1] != s.n) {
    return ffi::Error::InvalidArgument("scales/offsets must have shape (groups, N) = (" +
                                       std::to_string(s.groups) + ", " +
                                       std::to_string(s.n) + ")");
  }
  return ffi::Error::Success();
}

// codes: uint32 (K / P, N); scales and offsets: (groups, N). Fills `s` or
// returns the error that names what is wrong.
inline ffi::Error weight_shape(ffi::AnyBuffer::Dimensions codes,
                               ffi::AnyBuffer::Dimensions scales,
                               ffi::AnyBuffer::Dimensions offsets, int64_t bits,
                               int64_t group_size, WeightShape& s) {
  if (!supported_bits(static_cast<int>(bits))) {
    return ffi::Error::InvalidArgument("unsupported bits " + std::to_string(bits));
  }
  if (codes.size() != 2) return ffi::Error::InvalidArgument("codes must be 2-D");
  s.bits = static_cast<int>(bits);
  s.k = codes[0] * codes_per_word(s.bits);
  s.n = codes[1];
  return group_shape(scales, offsets, group_size, s);
}

// 2:4 sparse int4: codes uint32 and metadata uint16, both (K / 16, N) with K a
// multiple of 64; scales and offsets (groups, N).
inline ffi::Error sparse_weight_shape(ffi::AnyBuffer::Dimensions codes,
                                      ffi::AnyBuffer::Dimensions metadata,
                                      ffi::AnyBuffer::Dimensions scales,
                                      ffi::AnyBuffer::Dimensions offsets, int64_t bits,
                                      int64_t group_size, WeightShape& s) {
  if (bits != kSparseBits) {
    return ffi::Error::InvalidArgument("2:4 sparse weights have 4-bit codes, got bits " +
                                       std::to_string(bits));
  }
  if (codes.size() != 2 || metadata.size() != 2 || metadata[0] != codes[0] ||
      metadata[1] != codes[1]) {
    return ffi::Error::InvalidArgument("codes and metadata must be 2-D of one shape");
  }
  s.bits = kSparseBits;
  s.k = codes[0] * kSparseRowsPerWord;
  s.n = codes[1];
  if (s.k % kSparseKMultiple != 0) {
    return ffi::Error::InvalidArgument("2:4 sparse weights need K % 64 == 0, got K=" +
                                       std::to_string(s.k));
  }
  return group_shape(scales, offsets, group_size, s);
}

// An error unless the dequantized output `out` is (K, N).
inline ffi::Error dequantized_shape(ffi::AnyBuffer::Dimensions out, const WeightShape& s) {
  if (out.size() != 2 || out[0] != s.k || out[1] != s.n) {
    return ffi::Error::InvalidArgument("dequantize: output must have shape (K, N)");
  }
  return ffi::Error::Success();
}

// weight_shape(), and an error unless the dequantized output `out` is (K, N).
inline ffi::Error dequantize_shape(ffi::AnyBuffer::Dimensions codes,
                                   ffi::AnyBuffer::Dimensions scales,
                                   ffi::AnyBuffer::Dimensions offsets,
                                   ffi::AnyBuffer::Dimensions out, int64_t bits,
                                   int64_t group_size, WeightShape& s) {
  ffi::Error error = weight_shape(codes, scales, offsets, bits, group_size, s);
  return error.failure() ? error : dequantized_shape(out, s);
}

// sparse_weight_shape(), and an error unless the dequantized output `out` is (K, N).
inline ffi::Error sparse_dequantize_shape(ffi::AnyBuffer::Dimensions codes,
                                          ffi::AnyBuffer::Dimensions metadata,
                                          ffi::AnyBuffer::Dimensions scales,
                                          ffi::AnyBuffer::Dimensions offsets,
                                          ffi::AnyBuffer::Dimensions out, int64_t bits,
                                          int64_t group_size, WeightShape& s) {
  ffi::Error error = sparse_weight_shape(codes, metadata, scales, offsets, bits, group_size, s);
  return error.failure() ? error : dequantized_shape(out, s);
}

// weight_shape(), and an error unless the codes widen to int8 for the
// integer product of matmul(x, qw, act_bits=8): 4- or 8-bit.
inline ffi::Error act_quant_weight_shape(ffi::AnyBuffer::Dimensions codes,
                                         ffi::AnyBuffer::Dimensions scales,
                                         ffi::AnyBuffer::Dimensions offsets, int64_t bits,
                                         int64_t group_size, WeightShape& s) {
  ffi::Error error = weight_shape(codes, scales, offsets, bits, group_size, s);
  if (error.failure()) return error;
  if (s.bits != 4 && s.bits != 8) {
    return ffi::Error::InvalidArgument("act_bits=8 products need 4- or 8-bit codes");
  }
  return ffi::Error::Success();
}

}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_WEIGHT_SHAPE_H_
