"""Platform lowerings of int_matmul.

int4 operands are widened to int8 before the call. XLA:CPU does hand S4
buffers to FFI handlers, packed two per byte, but the FFI headers of the
jaxlib this is built against (xla/ffi/api/ffi.h) declare S4 one byte wide
(``ByteWidth``) and give it no native type (``Buffer<S4>::typed_data`` does
not compile), so the packed layout is not a contract of the FFI API. The
int8 copy is exact; it doubles the bytes of int4 operands.

CPU: the C++ handler computes the int32 product (cc/cpu/int_matmul.cc); the
float epilogue (IntEpilogue.apply) is elementwise XLA ops after the call.
CUDA: int8 with 1 to 16 rows (KERNEL_MAX_ROWS), K and N multiples of 8: the
int8 tensor-core kernel (cc/cuda/int_gemm_small_m.cu), which reads b in place;
int8 with more rows, K and N multiples of 16, on sm_90 GPUs: the wgmma s8
kernel (cc/cuda/int_gemm_large_m.cu), also reading a and b in place;
everything else (int4, other shapes, other GPUs, a build without the CUDA
extension): XLA's own integer dot. Same epilogue after any of them.

int4 stays on XLA's dot on CUDA: the kernel cannot rely on an S4 layout the
FFI API does not promise (above), and a widening pass to int8 before the call
would move 2.5x the packed bytes of b (read as int4, written and read as
int8) before the kernel's own read.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jax_lowbit import _extension, int_partitioning, partitioning
from jax_lowbit.int_primitives import IntEpilogue, int_matmul_p


def _as_int8(x):
    return x.astype(jnp.int8)


def _int_matmul_cpu(a, b, *scales, epilogue: IntEpilogue):
    k, n = b.shape
    rows = _as_int8(a).reshape(math.prod(a.shape[:-1]), k)
    acc = jax.ffi.ffi_call("jax_lowbit_int_matmul",
                           jax.ShapeDtypeStruct((rows.shape[0], n), jnp.int32))(rows, _as_int8(b))
    return epilogue.apply(acc.reshape(a.shape[:-1] + (n,)), scales)


# XLA's GPU integer dot returned wrong sums at K = 7 on an H100 (jax 0.11.2;
# right at K = 1, 64, 1000): K is zero-padded to a multiple of this.
XLA_INT_DOT_K_MULTIPLE = 32


def xla_integer_dot(a, b):
    """Exact int32 ``a @ b`` by XLA's own integer dot, for use inside lowerings.

    Binding int_matmul_p there instead would nest its custom_partitioning in
    another lowering, which has no devices to partition over.
    """
    a, b = _as_int8(a), _as_int8(b)
    pad = -b.shape[0] % XLA_INT_DOT_K_MULTIPLE
    if pad:
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
        b = jnp.pad(b, [(0, pad), (0, 0)])
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())),
                               preferred_element_type=jnp.int32)


# The CUDA kernel's range: rows of a, and what K and N must be multiples of
# (its 8-byte loads of a's and b's rows).
# 17 to 64 rows ran slower on the kernel than XLA's int8 dot on an H100
# (32 rows: 225 vs 150 µs on the suite; 16 rows: 145 vs 151 µs; docs/perf.md).
KERNEL_MAX_ROWS = 16
KERNEL_K_MULTIPLE = 8
KERNEL_N_MULTIPLE = 8


# The wgmma kernel's range (sm_90): more rows than the small-M kernel takes,
# K and N multiples of 16 (its TMA loads need rows of a multiple of 16 bytes).
LARGE_M_MULTIPLE = 16


def int_kernel(dtype, rows: int, k: int, n: int) -> str | None:
    """The FFI target a CUDA int_matmul of ``rows`` rows of ``dtype`` runs, or None for XLA's dot."""
    if jnp.dtype(dtype) != jnp.int8 or not _extension.has_cuda() or k <= 0 or n <= 0:
        return None
    if 1 <= rows <= KERNEL_MAX_ROWS and k % KERNEL_K_MULTIPLE == 0 and n % KERNEL_N_MULTIPLE == 0:
        return "jax_lowbit_int_gemm_small_m"
    if (rows > KERNEL_MAX_ROWS and k % LARGE_M_MULTIPLE == 0 and n % LARGE_M_MULTIPLE == 0
            and _extension.cuda_devices_are_hopper()):
        return "jax_lowbit_int_gemm_large_m"
    return None


def _int_matmul_cuda(a, b, *scales, epilogue: IntEpilogue):
    k, n = b.shape
    rows = math.prod(a.shape[:-1])
    target = int_kernel(a.dtype, rows, k, n)
    if target is not None:
        # ffi_call, not int_matmul_p: this runs inside the partitioned lowering.
        acc = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows, n), jnp.int32))(
            a.reshape(rows, k), b)
        acc = acc.reshape(a.shape[:-1] + (n,))
    else:
        acc = xla_integer_dot(a, b)
    return epilogue.apply(acc, scales)


partitioning.register_partitioned_lowerings(
    int_matmul_p, int_partitioning.plan, int_partitioning.rule,
    cpu=_int_matmul_cpu, cuda=_int_matmul_cuda)
