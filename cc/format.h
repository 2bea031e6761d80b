// The packed weight format of docs/formats.md, shared by the CPU handlers and
// the CUDA kernels so that both decode codes exactly as the Python packer
// (jax_lowbit/formats.py) encodes them.
#ifndef JAX_LOWBIT_FORMAT_H_
#define JAX_LOWBIT_FORMAT_H_

#include <cstdint>

#if defined(__CUDACC__)
#define LOWBIT_HD __host__ __device__ __forceinline__
#else
#define LOWBIT_HD inline
#endif

namespace jax_lowbit {

// Codes of one column are packed along K into 32-bit words: P = 32 / bits
// codes per word, word w of column n holds rows k = w*P .. w*P + P - 1.
LOWBIT_HD constexpr int codes_per_word(int bits) { return 32 / bits; }

LOWBIT_HD constexpr bool supported_bits(int bits) {
  return bits == 2 || bits == 4 || bits == 8;
}

// Bit offset of code j (0 <= j < P) inside its word. The pair of rows
// (2i, 2i+1) sits at the same offset i*bits of the low and the high 16-bit
// half, so one shift and one mask bring both codes of a pair into the two
// 16-bit lanes that a bf16x2/half2 magic-number conversion wants.
LOWBIT_HD constexpr int code_shift(int j, int bits) {
  return (j & 1) * 16 + (j >> 1) * bits;
}

LOWBIT_HD uint32_t code_at(uint32_t word, int j, int bits) {
  return (word >> code_shift(j, bits)) & ((1u << bits) - 1u);
}

// Every format dequantizes with one fma: w = code * scale + offset. Symmetric
// weights store no offset; their offset is -2^(bits-1) * scale. One rounding,
// as an fma gives: nvcc contracts the expression into an fma; on the host the
// product (8-bit code x 24-bit scale) is exact in double, and so is the sum
// whenever it and the offset are within 2^21 of each other, which holds for
// every offset a grid makes (a few multiples of the scale), so the cast to
// float is the only rounding.
LOWBIT_HD float dequantize_code(uint32_t code, float scale, float offset) {
#if defined(__CUDA_ARCH__)
  return static_cast<float>(code) * scale + offset;
#else
  return static_cast<float>(static_cast<double>(code) * scale + offset);
#endif
}

// 2:4 sparse int4 (docs/formats.md): each quad of 4 rows of K keeps two codes,
// rows 2q and 2q + 1 of a compressed code matrix packed like dense int4, and
// their rows i0 < i1 in a nibble (i0 | i1 << 2) of the uint16 metadata.
constexpr int kSparseBits = 4;
constexpr int kQuadsPerSparseWord = 4;           // 8 kept codes
constexpr int kSparseRowsPerWord = 4 * kQuadsPerSparseWord;
constexpr int kSparseKMultiple = 4 * kSparseRowsPerWord;  // one block of metadata rows

// Metadata row and nibble shift of quad q: q = 16 s + 4 j + t sits in row
// 4 s + t at bit 4 j.
LOWBIT_HD int64_t sparse_metadata_row(int64_t quad) { return 4 * (quad / 16) + quad % 4; }
LOWBIT_HD int sparse_metadata_shift(int64_t quad) { return static_cast<int>(4 * ((quad / 4) % 4)); }

// Row within its quad of kept code `which` (0: i0, 1: i1) of a metadata nibble.
LOWBIT_HD int kept_row(uint32_t nibble, int which) { return (nibble >> (2 * which)) & 3; }

}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_FORMAT_H_
