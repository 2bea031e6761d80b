// Hopper warpgroup MMA (wgmma, sm_90a) as the large-M GEMM uses it: A from
// registers (dequantized weights), B from shared memory through a matrix
// descriptor, f32 accumulators. PTX ISA 9.7.15 describes the instructions.
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
// rows of 64 bf16/fp16 (128 bytes) stored one after the other, 16-byte chunk
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
#define JAX_LOWBIT_WGMMA_D32_OUT(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
// The 64 accumulator operands of m64n128: %0 .. %63 in the string.
#define JAX_LOWBIT_WGMMA_D64_STR \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define JAX_LOWBIT_WGMMA_D64_OUT(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

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
#define JAX_LOWBIT_WGMMA_D128_OUT(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
  "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
  "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
  "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
  "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
  "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
  "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
  "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
  "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])

// D (64 x N, f32) = A (64 x 16, registers, the m16n8k16 A fragment per warp)
// x B (16 x N, shared memory, K-major) + (accumulate ? D : 0), for N = 64,
// 128 and 256; A and B are not negated, B is not transposed. The first MMA of a tile
// passes accumulate = 0 instead of zeroed accumulators: ptxas serializes
// every wgmma of a kernel whose accumulators other instructions write.
// One overload: N columns, REGS accumulators (operands %0 .. REGS-1), then
// the A registers, the B descriptor and the accumulate flag, whose operand
// numbers (A_OPS, B_OP, P_OP) follow REGS.
#define JAX_LOWBIT_WGMMA_MMA(TYPE, N, REGS, A_OPS, B_OP, P_OP)                               \
  static __device__ __forceinline__ void mma(float (&d)[REGS], const uint32_t (&a)[4],       \
                                             uint64_t b, int accumulate) {                   \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " P_OP ", 0;\n"                           \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " {"        \
                 JAX_LOWBIT_WGMMA_D##REGS##_STR "}, {" A_OPS "}, " B_OP ", p, 1, 1, 0;\n}\n" \
                 : JAX_LOWBIT_WGMMA_D##REGS##_OUT(d)                                         \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));     \
  }
#define JAX_LOWBIT_WGMMA_RA(TYPE)                                                \
  JAX_LOWBIT_WGMMA_MMA(TYPE, 64, 32, "%32, %33, %34, %35", "%36", "%37")         \
  JAX_LOWBIT_WGMMA_MMA(TYPE, 128, 64, "%64, %65, %66, %67", "%68", "%69")        \
  JAX_LOWBIT_WGMMA_MMA(TYPE, 256, 128, "%128, %129, %130, %131", "%132", "%133")

template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  JAX_LOWBIT_WGMMA_RA("bf16")
};
template <>
struct Mma<__half> {
  JAX_LOWBIT_WGMMA_RA("f16")
};

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
