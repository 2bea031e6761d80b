"""Checks shared by the CUDA kernel tests. Each kernel writes into a NaN-filled
buffer, so that an element it never writes shows up, and is compared with the
spec's weight (tests/spec_reference.py); which kernels a matmul lowers to is
read from its export for CUDA, on any machine."""

import re

import jax
import jax.numpy as jnp
import numpy as np

import jax_lowbit
from jax_lowbit._extension import target_names

import spec_reference


def _poisoned(fn, shape, dtype, *args, poison=jnp.nan):
    """Runs fn(*args) with its output in a donated buffer filled with ``poison``
    (NaN; for an integer output a value the kernel cannot produce); asserts
    that XLA wrote the output there and that no element is left poisoned."""
    buffer = jnp.full(shape, poison, dtype)
    pointer = buffer.unsafe_buffer_pointer()
    out = jax.jit(lambda p, *a: fn(*a), donate_argnums=0, keep_unused=True)(buffer, *args)
    assert out.unsafe_buffer_pointer() == pointer, (
        "XLA did not write the kernel's output into the poisoned buffer")
    if jnp.issubdtype(dtype, jnp.integer):
        got = np.asarray(out).astype(np.int64)
        assert not np.any(got == poison), "some elements were never written"
        return got
    got = np.asarray(out.astype(jnp.float32), np.float64)
    assert np.all(np.isfinite(got)), "some elements were never written"
    return got


def assert_kernel_dequantize(qw, dtype):
    """qw.dequantize(dtype) writes every element: the spec's weight rounded once to dtype."""
    got = _poisoned(lambda q: q.dequantize(dtype), qw.shape, dtype, qw)
    want = spec_reference.dequantize_weight(qw)
    rtol = {jnp.float32: 1e-6, jnp.bfloat16: 2 ** -8, jnp.float16: 2 ** -11}[dtype]
    np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-6)


def assert_kernel_matmul(x, qw):
    """matmul(x, qw) writes every element: x @ W with W rounded to x's dtype, as the
    fused kernels round it, within float32 accumulation of bf16/fp16 products."""
    got = _poisoned(jax_lowbit.matmul, x.shape[:-1] + (qw.shape[1],), x.dtype, x, qw)
    # Reference: weights rounded to x's dtype (as the kernel does), f64 products.
    w = np.asarray(jnp.asarray(spec_reference.dequantize_weight(qw), x.dtype).astype(jnp.float32),
                   np.float64)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    want = x64 @ w
    tol = (2 ** -7 if x.dtype == jnp.bfloat16 else 2 ** -10) * (np.abs(x64) @ np.abs(w)) + 1e-3
    assert np.all(np.abs(got - want) <= tol)


def _targets(exported) -> set:
    called = set(re.findall(r"custom_call @(\w+)", exported.mlir_module()))
    return called & set(target_names())


def cuda_targets(x_shape, x_dtype, qw, act_bits=None) -> set:
    """The jax_lowbit FFI targets that matmul of an (x_shape, x_dtype) x lowers to on CUDA."""
    return _targets(jax.export.export(
        jax.jit(lambda x, w: jax_lowbit.matmul(x, w, act_bits=act_bits)), platforms=["cuda"],
        disabled_checks=jax_lowbit.export_disabled_checks())(
            jax.ShapeDtypeStruct(x_shape, x_dtype), qw))


def int_matmul_cuda_targets(a_shape, n, dtype=jnp.int8) -> set:
    """The jax_lowbit FFI targets that int_matmul of an (a_shape) a and a (K, n) b
    lowers to on CUDA (none: XLA's integer dot)."""
    b = jax.ShapeDtypeStruct((a_shape[-1], n), dtype)
    return _targets(jax.export.export(
        jax.jit(jax_lowbit.int_matmul), platforms=["cuda"],
        disabled_checks=jax_lowbit.export_disabled_checks())(
            jax.ShapeDtypeStruct(a_shape, dtype), b))
