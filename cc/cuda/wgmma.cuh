// Hopper warpgroup MMA (wgmma, sm_90a) as the large-M GEMMs use it: A from
// registers (dequantized or widened weights), B from shared memory through a
// matrix descriptor, f32 or s32 accumulators. PTX ISA 9.7.15 describes the
// instructions.
#ifndef JAX_LOWBIT_CUDA_WGMMA_CUH_
#define JAX_LOWBIT_CUDA_WGMMA_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace jax_lowbit {
namespace wgmma {

// Register writes (A fragments, accumulators) must be fenced before a wgmma
// reads them; commit closes a group of issued wgmmas; wait<N> returns once at
// most N groups of this warpgroup are still running.
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Matrix descriptor of a K-major operand in the 128-byte swizzle layout:
// rows of 128 bytes (64 bf16/fp16 or 128 s8) stored one after the other, 16-byte chunk
// c of row r at chunk c ^ (r % 8), so that the 8 rows of a core-matrix column
// fall in 8 different bank groups. Groups of 8 rows are 1024 bytes apart (the
// "stride dimension byte offset"); the "leading dimension" field is unused
// with swizzling and set to 1. Fields are in 16-byte units; the swizzle
// pattern repeats every 1024 bytes, so tiles start 1024-byte aligned and a
// step along K inside the 128-byte rows just advances the start address.
__device__ __forceinline__ uint64_t descriptor_sw128(uint32_t shared_address) {
  return uint64_t((shared_address & 0x3FFFF) >> 4) | uint64_t(1) << 16 |
         uint64_t(1024 >> 4) << 32 | uint64_t(1) << 62;
}

// The 32 accumulator operands of m64n64: %0 .. %31 in the string.
#define JAX_LOWBIT_WGMMA_D32_STR \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define JAX_LOWBIT_WGMMA_D32_OUT(d, C) \
  C(d[0]), C(d[1]), C(d[2]), C(d[3]), C(d[4]), C(d[5]), C(d[6]), C(d[7]), \
  C(d[8]), C(d[9]), C(d[10]), C(d[11]), C(d[12]), C(d[13]), C(d[14]), C(d[15]), \
  C(d[16]), C(d[17]), C(d[18]), C(d[19]), C(d[20]), C(d[21]), C(d[22]), C(d[23]), \
  C(d[24]), C(d[25]), C(d[26]), C(d[27]), C(d[28]), C(d[29]), C(d[30]), C(d[31])
// The 64 accumulator operands of m64n128: %0 .. %63 in the string ((d + 32)[i]
// is d[32 + i]).
#define JAX_LOWBIT_WGMMA_D64_STR \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define JAX_LOWBIT_WGMMA_D64_OUT(d, C) \
  JAX_LOWBIT_WGMMA_D32_OUT(d, C), JAX_LOWBIT_WGMMA_D32_OUT((d + 32), C)

// The 128 accumulator operands of m64n256: %0 .. %127 in the string.
#define JAX_LOWBIT_WGMMA_D128_STR \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define JAX_LOWBIT_WGMMA_D128_OUT(d, C) \
  JAX_LOWBIT_WGMMA_D64_OUT(d, C), JAX_LOWBIT_WGMMA_D64_OUT((d + 64), C)

// D (64 x N) = A (64 x K, registers) x B (K x N, shared memory, K-major) +
// (accumulate ? D : 0), for N = 64, 128 and 256: bf16/fp16 operands with K =
// 16 and f32 D (A is the m16n8k16 A fragment per warp), or s8 operands with
// K = 32 and s32 D (the m16n8k32 s8 A fragment per warp). A and B are not
// negated, B is not transposed. The first MMA of a tile (of a group, for the
// s8 kernel) passes accumulate = 0 instead of zeroed accumulators: ptxas
// serializes every wgmma of a kernel whose accumulators other instructions
// write.
//
// The sparse form (SparseMma, wgmma.mma_async.sp) takes a 2:4 sparse A of
// 64 x 32 as its 64 x 16 kept values, in the registers and lanes of the
// dense k16 A fragment (register 0 of lane (g, t): row g, the two kept
// values of quad t, k-slots 4t .. 4t + 3; register 2: quad t + 4), and a
// metadata register: the nibbles (docs/formats.md) of rows g (bits 0-15) and
// g + 8 (16-31) for quads 0-3 (lanes with t even) or 4-7 (t odd) of the
// warp's 16 rows (PTX ISA 9.7.15.6). Selector 0 reads it from lanes 4g and
// 4g + 1; callers fill every lane by t % 2, so selector 1 would read the same.
//
// One overload: N columns, REGS accumulators (operands %0 .. REGS-1), then
// the A registers, the B descriptor, the accumulate flag and the metadata
// (operand numbers A_OPS, B_OP, P_OP, E_OP follow REGS). FORM is DENSE or
// SPARSE: FORM##_NAME is ".sp" for sparse forms, which also take a metadata
// argument (FORM##_PARAMETER) that FORM##_INPUT passes and
// FORM##_OPERANDS(E_OP) names with the selector; dense forms have none of
// these. SHAPE_TYPES ends the instruction name (k, D type, A and B types),
// SCALES follows the flag (bf16/fp16 take A and B scales and B's transpose;
// integer types do not), and C is the accumulators' register constraint.
#define JAX_LOWBIT_WGMMA_MMA(D_TYPE, C, FORM, SHAPE_TYPES, SCALES, N, REGS, A_OPS, B_OP, P_OP, \
                             E_OP)                                                             \
  static __device__ __forceinline__ void mma(D_TYPE (&d)[REGS], const uint32_t (&a)[4],       \
                                             uint64_t b,                                      \
                                             int accumulate JAX_LOWBIT_WGMMA_##FORM##_PARAMETER) { \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " P_OP ", 0;\n"                           \
                 "wgmma.mma_async" JAX_LOWBIT_WGMMA_##FORM##_NAME ".sync.aligned.m64n" #N      \
                 SHAPE_TYPES " {" JAX_LOWBIT_WGMMA_D##REGS##_STR "}, {" A_OPS "}, " B_OP       \
                 JAX_LOWBIT_WGMMA_##FORM##_OPERANDS(E_OP) ", p" SCALES ";\n}\n"               \
                 : JAX_LOWBIT_WGMMA_D##REGS##_OUT(d, C)                                       \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b),                        \
                   "r"(accumulate) JAX_LOWBIT_WGMMA_##FORM##_INPUT);                          \
  }
#define JAX_LOWBIT_WGMMA_RA(D_TYPE, C, FORM, SHAPE_TYPES, SCALES)                             \
  JAX_LOWBIT_WGMMA_MMA(D_TYPE, C, FORM, SHAPE_TYPES, SCALES, 64, 32, "%32, %33, %34, %35",    \
                       "%36", "%37", "%38")                                                   \
  JAX_LOWBIT_WGMMA_MMA(D_TYPE, C, FORM, SHAPE_TYPES, SCALES, 128, 64, "%64, %65, %66, %67",   \
                       "%68", "%69", "%70")                                                   \
  JAX_LOWBIT_WGMMA_MMA(D_TYPE, C, FORM, SHAPE_TYPES, SCALES, 256, 128,                        \
                       "%128, %129, %130, %131", "%132", "%133", "%134")
#define JAX_LOWBIT_WGMMA_DENSE_NAME ""
#define JAX_LOWBIT_WGMMA_DENSE_PARAMETER
#define JAX_LOWBIT_WGMMA_DENSE_INPUT
#define JAX_LOWBIT_WGMMA_DENSE_OPERANDS(E_OP) ""
#define JAX_LOWBIT_WGMMA_SPARSE_NAME ".sp"
#define JAX_LOWBIT_WGMMA_SPARSE_PARAMETER , uint32_t metadata
#define JAX_LOWBIT_WGMMA_SPARSE_INPUT , "r"(metadata)
#define JAX_LOWBIT_WGMMA_SPARSE_OPERANDS(E_OP) ", " E_OP ", 0"

template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  JAX_LOWBIT_WGMMA_RA(float, "+f", DENSE, "k16.f32.bf16.bf16", ", 1, 1, 0")
};
template <>
struct Mma<__half> {
  JAX_LOWBIT_WGMMA_RA(float, "+f", DENSE, "k16.f32.f16.f16", ", 1, 1, 0")
};
template <>
struct Mma<int8_t> {
  JAX_LOWBIT_WGMMA_RA(int32_t, "+r", DENSE, "k32.s32.s8.s8", "")
};

template <typename T>
struct SparseMma;
template <>
struct SparseMma<__nv_bfloat16> {
  JAX_LOWBIT_WGMMA_RA(float, "+f", SPARSE, "k32.f32.bf16.bf16", ", 1, 1, 0")
};
template <>
struct SparseMma<__half> {
  JAX_LOWBIT_WGMMA_RA(float, "+f", SPARSE, "k32.f32.f16.f16", ", 1, 1, 0")
};

#undef JAX_LOWBIT_WGMMA_DENSE_NAME
#undef JAX_LOWBIT_WGMMA_SPARSE_NAME
#undef JAX_LOWBIT_WGMMA_DENSE_PARAMETER
#undef JAX_LOWBIT_WGMMA_SPARSE_PARAMETER
#undef JAX_LOWBIT_WGMMA_DENSE_OPERANDS
#undef JAX_LOWBIT_WGMMA_DENSE_INPUT
#undef JAX_LOWBIT_WGMMA_SPARSE_OPERANDS
#undef JAX_LOWBIT_WGMMA_SPARSE_INPUT
#undef JAX_LOWBIT_WGMMA_RA
#undef JAX_LOWBIT_WGMMA_MMA
#undef JAX_LOWBIT_WGMMA_D32_STR
#undef JAX_LOWBIT_WGMMA_D32_OUT
#undef JAX_LOWBIT_WGMMA_D64_STR
#undef JAX_LOWBIT_WGMMA_D64_OUT
#undef JAX_LOWBIT_WGMMA_D128_STR
#undef JAX_LOWBIT_WGMMA_D128_OUT

}  // namespace wgmma
}  // namespace jax_lowbit

#endif  // JAX_LOWBIT_CUDA_WGMMA_CUH_
