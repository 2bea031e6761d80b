// Pieces of the tensor-core GEMM kernels that turn packed codes into MMA
// fragments: the m16n8k16 instruction (and the 2:4 sparse m16n8k32 one) per
// activation type, the magic-number conversion of a code pair, the streaming
// load of the code words, and for int8 activations the m16n8k32 s8
// instruction with the codes' signed bytes; ldmatrix for operands that
// need a transpose on the way to registers.
#ifndef JAX_LOWBIT_CUDA_MMA_FRAGMENTS_CUH_
#define JAX_LOWBIT_CUDA_MMA_FRAGMENTS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace jax_lowbit {

// The two activation types differ only in their magic number and the type
// names in the MMA instruction.
#define JAX_LOWBIT_MMA_M16N8K16(TYPE)                                                  \
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4],     \
                                             uint32_t b0, uint32_t b1) {                \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE                 \
                 ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"         \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                       \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));       \
  }

// 2:4 sparse A (16 x 32, two kept values of every 4 k-slots in each A
// register), dense B (32 x 8). `e` holds the kept k-slots of each chunk of 4
// as nibbles (i0 | i1 << 2); the sparsity selector kSelector names the lanes
// 4g + 2 kSelector (k-slots 0-15) and 4g + 2 kSelector + 1 (16-31) whose `e`
// the instruction reads, for MMA rows g (low 16 bits) and g + 8 (high).
// ::ordered_metadata promises i0 < i1, which the format guarantees.
#define JAX_LOWBIT_MMA_SP_M16N8K32(TYPE)                                                  \
  template <int kSelector>                                                                \
  static __device__ __forceinline__ void mma_sp(float (&c)[4], const uint32_t (&a)[4],    \
                                                const uint32_t (&b)[4], uint32_t e) {     \
    asm volatile("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32." TYPE "."   \
                 TYPE ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, "              \
                 "{%0,%1,%2,%3}, %12, %13;\n"                                             \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                         \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),      \
                   "r"(b[2]), "r"(b[3]), "r"(e), "n"(kSelector));                         \
  }

// 2:4 metadata of a lane with nothing to load (past N or K): a valid nibble
// in every position (0b0000 and the other repeated rows are undefined
// behaviour for mma.sp), rows 0 and 1.
constexpr uint32_t kNoMetadata = 0x44444444u;

template <typename T>
struct Activation;

template <>
struct Activation<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x4300;  // bf16 128.0: one mantissa ulp is 1
  JAX_LOWBIT_MMA_M16N8K16("bf16")
  JAX_LOWBIT_MMA_SP_M16N8K32("bf16")
};

template <>
struct Activation<__half> {
  using Pair = __half2;
  static constexpr uint32_t kMagic = 0x6400;  // fp16 1024.0: one mantissa ulp is 1
  JAX_LOWBIT_MMA_M16N8K16("f16")
  JAX_LOWBIT_MMA_SP_M16N8K32("f16")
};

#undef JAX_LOWBIT_MMA_M16N8K16
#undef JAX_LOWBIT_MMA_SP_M16N8K32

template <typename Pair>
__device__ __forceinline__ Pair as_pair(uint32_t bits) {
  return *reinterpret_cast<Pair*>(&bits);
}
template <typename Pair>
__device__ __forceinline__ uint32_t as_bits(Pair v) {
  return *reinterpret_cast<uint32_t*>(&v);
}

// A 16-bit lane of a 32-bit word, copied to both lanes.
__device__ __forceinline__ uint32_t broadcast_low(uint32_t v) { return __byte_perm(v, 0, 0x1010); }
__device__ __forceinline__ uint32_t broadcast_high(uint32_t v) { return __byte_perm(v, 0, 0x3232); }

// The scales (or offsets) of four adjacent columns, one 16-bit value each in
// an 8-byte load, each broadcast to both lanes of a pair: what the two
// weights of a code pair of that column are multiplied by.
__device__ __forceinline__ void broadcast_columns(uint2 v, uint32_t (&out)[4]) {
  out[0] = broadcast_low(v.x);
  out[1] = broadcast_high(v.x);
  out[2] = broadcast_low(v.y);
  out[3] = broadcast_high(v.y);
}

// Streaming load: weights are read once, so they should not evict x from L2.
__device__ __forceinline__ uint4 load_streaming(const uint4* p) { return __ldcs(p); }

// A streaming load of 8 bytes where a warp's loads cover half of each
// 128-byte line they touch and a neighbouring CTA reads the other half: the
// L2::128B hint has L2 fetch the whole line from DRAM at once. int_matmul's
// rows of b: the suite at M = 1 and 16 2% faster (docs/perf.md v18; L2::256B
// gained nothing more); the 2:4 metadata rows of the small-M kernel: the
// suite at M = 1 and 16 1-3% faster (v22).
__device__ __forceinline__ uint2 load_streaming_half_line(const uint2* p) {
  uint2 v;
  asm volatile("ld.global.cs.L2::128B.v2.u32 {%0, %1}, [%2];\n"
               : "=r"(v.x), "=r"(v.y)
               : "l"(p));
  return v;
}

template <typename T, int kBits, bool kSymmetric>
struct Dequantizer {
  using Pair = typename Activation<T>::Pair;
  static constexpr uint32_t kMask = ((1u << kBits) - 1u) * 0x00010001u;
  static constexpr uint32_t kMagic2 = Activation<T>::kMagic * 0x00010001u;
  // magic (+ 2^(bits-1) for the signed grid) in both lanes: subtracting it is exact.
  static constexpr uint32_t kBias2 =
      (Activation<T>::kMagic + (kSymmetric ? (1u << (kBits - 1)) : 0u)) * 0x00010001u;

  // Weights of code pair `pair` (rows 2*pair, 2*pair + 1) of `word`.
  static __device__ __forceinline__ uint32_t pair(uint32_t word, int pair_index, Pair scale,
                                                  Pair offset) {
    // (shifted & mask) | magic as one lop3 (0xEA: a & b | c); ptxas left it as
    // two in the wgmma kernel, where dequantization bounds the issue rate.
    uint32_t lanes;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n"
        : "=r"(lanes)
        : "r"(word >> (pair_index * kBits)), "n"(kMask), "n"(kMagic2));
    const Pair codes = __hsub2(as_pair<Pair>(lanes), as_pair<Pair>(kBias2));
    return as_bits(kSymmetric ? __hmul2(codes, scale) : __hfma2(codes, scale, offset));
  }

  // The A fragment of MMA rows g and g + 8 = columns 2p and 2p + 1 of a
  // lane's four code words: code pair 2h of each in registers 0 and 1, pair
  // 2h + 1 in registers 2 and 3. `scale` and `offset` hold the four columns'
  // values, each in both lanes.
  static __device__ __forceinline__ void fragment(uint32_t (&a)[4], const uint32_t (&word)[4],
                                                  const uint32_t (&scale)[4],
                                                  const uint32_t (&offset)[4], int p, int h) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int column = 2 * p + r % 2;
      a[r] = pair(word[column], 2 * h + r / 2, as_pair<Pair>(scale[column]),
                  as_pair<Pair>(offset[column]));
    }
  }
};

// --- int8 activations: mma.m16n8k32 s8 x s8 -> s32 ------------------------------
//
// Fragments (PTX ISA, lane = 4 g + t): A register 0 holds row g, k-slots
// 4t .. 4t+3; register 1 row g + 8, the same slots; registers 2 and 3 the same
// rows at k-slots 16 + 4t .. 16 + 4t + 3. B register 0 holds column g (an
// activation row) at k-slots 4t .. 4t+3, register 1 at 16 + 4t .. 16 + 4t + 3.
// The accumulator is laid out as in m16n8k16. Which logical row of K a slot
// stands for is the kernel's choice as long as A and B agree; both depend on
// t alone, so each lane's slots are rows of its own code words.
__device__ __forceinline__ void mma_s8(int32_t (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                       uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Signed s8 A fragments straight from the packed words of one 32-row K step.
// A lane (g, t) reads columns col0 .. col0 + 3 (MMA p = 0, 1 takes columns
// 2p and 2p + 1 as rows g and g + 8) and eight rows of K, 32 s + 8 t .. + 7;
// `b_fragment` puts the lane's eight activations xq[m, 32 s + 8 t .. + 7]
// (one 8-byte load, natural order) into the same row order with one prmt
// per register. The int32 sums are (1 << kProductShift) * sum xq * (code - 2^(bits-1)).
template <int kBits>
struct SignedCodes;

template <>
struct SignedCodes<8> {
  static constexpr int kLoads = 2;  // 16-byte code loads per lane and step
  static constexpr int kProductShift = 0;
  // Word rows 8s + 2t and 8s + 2t + 1 hold K rows 32s + 8t + (0..3) and (4..7).
  static __device__ __forceinline__ int64_t word_row(int step, int t, int load) {
    return 8 * int64_t{step} + 2 * t + load;
  }
  // In the wgmma kernel's shared memory, lanes of odd t load their two word
  // rows in the other order (no bank conflict), so the pre-pass stores their
  // activations' two halves swapped (docs/formats.md); int4 lanes load one.
  static constexpr bool kOddLanesSwapHalves = true;
  // A word's bytes are rows 0, 2, 1, 3 (docs/formats.md); flipping each
  // byte's top bit turns offset-binary code into two's complement code - 128.
  static __device__ __forceinline__ void a_fragment(const uint4 (&w)[kLoads], int p,
                                                    uint32_t (&a)[4]) {
    a[0] = word_of(w[0], 2 * p) ^ 0x80808080u;
    a[1] = word_of(w[0], 2 * p + 1) ^ 0x80808080u;
    a[2] = word_of(w[1], 2 * p) ^ 0x80808080u;
    a[3] = word_of(w[1], 2 * p + 1) ^ 0x80808080u;
  }
  // Activation bytes 0, 2, 1, 3 and 4, 6, 5, 7.
  static __device__ __forceinline__ void b_fragment(uint2 x, uint32_t& b0, uint32_t& b1) {
    b0 = __byte_perm(x.x, x.y, 0x3120);
    b1 = __byte_perm(x.x, x.y, 0x7564);
  }
};

template <>
struct SignedCodes<4> {
  static constexpr int kLoads = 1;
  static constexpr int kProductShift = 4;
  // Word row 4s + t holds K rows 32s + 8t .. + 7.
  static __device__ __forceinline__ int64_t word_row(int step, int t, int) {
    return 4 * int64_t{step} + t;
  }
  static constexpr bool kOddLanesSwapHalves = false;
  // Nibbles at bits 0, 8, 16, 24 are rows 0, 4, 1, 5 and those at bits 4, 12,
  // 20, 28 rows 2, 6, 3, 7. Each is moved into the top half of its byte and
  // its top bit flipped: the byte is then 16 * (code - 8) as a signed s8, so
  // one and (after a shift) and one xor, a single lop3, convert four codes
  // with no sign extension. The products are 16x; the sums stay exact.
  // The and and the xor as one lop3 ((a & b) ^ c: lut 0x6A): written as C,
  // ptxas emits two, as a lop3 takes one immediate and it does not keep the
  // second constant in a register on its own.
  static __device__ __forceinline__ uint32_t high_nibbles(uint32_t word) {
    uint32_t out;
    asm("lop3.b32 %0, %1, %2, %3, 0x6A;\n"
        : "=r"(out)
        : "r"(word), "n"(0xF0F0F0F0u), "r"(0x80808080u));
    return out;
  }
  static __device__ __forceinline__ uint32_t low_nibbles(uint32_t word) {
    return high_nibbles(word << 4);
  }
  static __device__ __forceinline__ void a_fragment(const uint4 (&w)[kLoads], int p,
                                                    uint32_t (&a)[4]) {
    a[0] = low_nibbles(word_of(w[0], 2 * p));
    a[1] = low_nibbles(word_of(w[0], 2 * p + 1));
    a[2] = high_nibbles(word_of(w[0], 2 * p));
    a[3] = high_nibbles(word_of(w[0], 2 * p + 1));
  }
  // With integer group scales m0, m1 (0..16) of the lane's two columns, the
  // same k slots hold (code - 8) * m (-128..112), not 16 (code - 8): each
  // nibble is masked into its byte, one integer multiply-add per register
  // forms (code - 8) * m + 128 in all four bytes at once (0..248, so no
  // carry crosses a byte), and flipping the top bits makes the bytes signed.
  static __device__ __forceinline__ void a_fragment_scaled(const uint4 (&w)[kLoads], uint32_t m0,
                                                           uint32_t m1, uint32_t (&a)[4]) {
    const uint32_t bias0 = (128u - 8u * m0) * 0x01010101u, bias1 = (128u - 8u * m1) * 0x01010101u;
    a[0] = ((w[0].x & 0x0F0F0F0Fu) * m0 + bias0) ^ 0x80808080u;
    a[1] = ((w[0].y & 0x0F0F0F0Fu) * m1 + bias1) ^ 0x80808080u;
    a[2] = (((w[0].x >> 4) & 0x0F0F0F0Fu) * m0 + bias0) ^ 0x80808080u;
    a[3] = (((w[0].y >> 4) & 0x0F0F0F0Fu) * m1 + bias1) ^ 0x80808080u;
  }
  // Activation bytes 0, 4, 1, 5 and 2, 6, 3, 7.
  static __device__ __forceinline__ void b_fragment(uint2 x, uint32_t& b0, uint32_t& b1) {
    b0 = __byte_perm(x.x, x.y, 0x5140);
    b1 = __byte_perm(x.x, x.y, 0x7362);
  }
};

// A 4 x 4 byte transpose in registers: r[i] holds row i, columns 0..3 (byte c
// is column c); out[c] then holds column c, rows 0..3 (byte i is row i). This
// turns four row-major int8 rows of a (K, N) matrix into four A (or B) fragment
// registers of four K rows each. Eight prmt: the first four interleave
// rows 0/1 and 2/3 byte by byte (column pairs), the last four join the halves.
__device__ __forceinline__ void transpose_bytes_4x4(const uint32_t (&r)[4], uint32_t (&out)[4]) {
  const uint32_t r01_lo = __byte_perm(r[0], r[1], 0x5140);  // r0.c0 r1.c0 r0.c1 r1.c1
  const uint32_t r01_hi = __byte_perm(r[0], r[1], 0x7362);  // r0.c2 r1.c2 r0.c3 r1.c3
  const uint32_t r23_lo = __byte_perm(r[2], r[3], 0x5140);
  const uint32_t r23_hi = __byte_perm(r[2], r[3], 0x7362);
  out[0] = __byte_perm(r01_lo, r23_lo, 0x5410);
  out[1] = __byte_perm(r01_lo, r23_lo, 0x7632);
  out[2] = __byte_perm(r01_hi, r23_hi, 0x5410);
  out[3] = __byte_perm(r01_hi, r23_hi, 0x7632);
}

// ldmatrix.x4.trans of 16-bit elements from shared memory (sm_75+): four
// 8x8 matrices, row addresses from lanes 8j .. 8j + 7 for matrix j; lane
// (g, t) gets the elements of rows 2t and 2t + 1 at column g of each matrix
// (low half: row 2t), one register per matrix.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t shared_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address));
}

}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_CUDA_MMA_FRAGMENTS_CUH_
