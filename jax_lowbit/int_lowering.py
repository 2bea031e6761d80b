"""Platform lowerings of int_matmul.

int4 operands are widened to int8 before the call. XLA:CPU does hand S4
buffers to FFI handlers, packed two per byte, but the FFI headers of the
jaxlib this is built against (xla/ffi/api/ffi.h) declare S4 one byte wide
(``ByteWidth``) and give it no native type (``Buffer<S4>::typed_data`` does
not compile), so the packed layout is not a contract of the FFI API. The
int8 copy is exact; it doubles the bytes of int4 operands.

CPU: the C++ handler computes the int32 product (cc/cpu/int_matmul.cc); the
float epilogue (IntEpilogue.apply) is elementwise XLA ops after the call.
CUDA: XLA's own integer dot, until the fused int8 tensor-core kernel lands
(issue #5); same epilogue.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.interpreters import mlir

from jax_lowbit import int_partitioning, partitioning
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


def _int_matmul_xla(a, b, *scales, epilogue: IntEpilogue):
    # Pending: a fused CUDA kernel on int8 tensor cores (issue #5) replaces this.
    return epilogue.apply(xla_integer_dot(a, b), scales)


def _register(fn, platform: str) -> None:
    # Sharded operands run where they lie (int_partitioning.py).
    lowering = partitioning.partitioned_lowering(int_matmul_p, fn, int_partitioning.plan,
                                                 int_partitioning.rule)
    mlir.register_lowering(int_matmul_p, lowering, platform=platform)


_register(_int_matmul_cpu, "cpu")
_register(_int_matmul_xla, "cuda")
