"""The int_matmul primitive: integer a (..., K) times integer b (K, N).

Operands are ``(a, b, *scales)``; the static ``epilogue`` parameter says which
scales are present and the output dtype. This module holds the shape rules,
the epilogue arithmetic, batching and the refusal to differentiate;
int_lowering.py holds the platform lowerings.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import core as jax_core
from jax.extend import core
from jax.interpreters import ad, batching

from jax_lowbit import partitioning, validation
from jax_lowbit.primitives import _batch_axis

INT_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.int4))


@dataclasses.dataclass(frozen=True)
class IntEpilogue:
    """Which scales follow ``a`` and ``b`` among the operands, and the output dtype.

    Without scales the result is the int32 product. With scales it is
    ``out_dtype((float32(acc) * a_scale) * b_scale)``, every step in float32;
    a missing scale is 1.
    """

    a_scaled: bool
    b_scaled: bool
    out_dtype: np.dtype

    @property
    def scaled(self) -> bool:
        return self.a_scaled or self.b_scaled

    def split(self, scales):
        """(a_scale or None, b_scale or None) from the scale operands."""
        scales = iter(scales)
        a_scale = next(scales) if self.a_scaled else None
        b_scale = next(scales) if self.b_scaled else None
        return a_scale, b_scale

    def apply(self, acc, scales):
        """The epilogue on the int32 product ``acc`` (..., N)."""
        if not self.scaled:
            return acc
        y = acc.astype(jnp.float32)
        for scale in self.split(scales):
            if scale is not None:
                y = y * scale.astype(jnp.float32)
        return y.astype(self.out_dtype)


int_matmul_p = core.Primitive("jax_lowbit_int_matmul")


# --- shape rules -----------------------------------------------------------

def _check_operands(a, b) -> None:
    for name, x in (("a", a), ("b", b)):
        if x.dtype not in INT_DTYPES:
            raise TypeError(
                f"int_matmul: {name} must have dtype int8 or int4, got {x.dtype.name} "
                "(quantize float arrays to integers first, or use jax_lowbit.matmul for a "
                "float x and a QuantizedWeight)")
    if a.dtype != b.dtype:
        raise TypeError(
            f"int_matmul: a and b must have the same dtype (both int8 or both int4), got "
            f"a {a.dtype.name} and b {b.dtype.name}")
    if b.ndim != 2:
        raise ValueError(f"int_matmul: b must be 2-D (K, N), got shape {tuple(b.shape)}")
    if a.ndim < 1 or a.shape[-1] != b.shape[0]:
        raise ValueError(
            f"int_matmul: a has shape {tuple(a.shape)}, its last dimension must equal b's "
            f"K={b.shape[0]}")


def _check_scale(name: str, scale, shape: tuple) -> None:
    validation.check_float_dtype(f"int_matmul: {name}", scale.dtype)
    if tuple(scale.shape) != shape:
        raise ValueError(f"int_matmul: {name} must have shape {shape}, got {tuple(scale.shape)}")


def _check_out_dtype(epilogue: IntEpilogue) -> None:
    if epilogue.scaled:
        validation.check_float_dtype("int_matmul: out_dtype", epilogue.out_dtype)
    elif epilogue.out_dtype != jnp.int32:
        raise ValueError(
            f"int_matmul: without a_scale or b_scale the result is the exact int32 product; "
            f"out_dtype={epilogue.out_dtype.name} needs scales (or cast the result)")


def _int_matmul_abstract_eval(a, b, *scales, epilogue: IntEpilogue):
    _check_operands(a, b)
    a_scale, b_scale = epilogue.split(scales)
    if a_scale is not None:
        _check_scale("a_scale (one per row of a)", a_scale, tuple(a.shape[:-1]) + (1,))
    if b_scale is not None:
        _check_scale("b_scale (one per column of b)", b_scale, (b.shape[1],))
    _check_out_dtype(epilogue)
    return jax_core.ShapedArray(tuple(a.shape[:-1]) + (b.shape[1],), epilogue.out_dtype,
                                sharding=partitioning.product_result_sharding(a, b))


int_matmul_p.def_abstract_eval(_int_matmul_abstract_eval)
# Eager calls run the lowering through jit, compiled once per epilogue.
int_matmul_p.def_impl(jax.jit(int_matmul_p.bind, static_argnames=("epilogue",)))


# --- batching --------------------------------------------------------------

def _int_matmul_batch(args, dims, *, epilogue):
    a, b, *scales = args
    a_dim, b_dim, *scale_dims = dims
    a_scale, b_scale = epilogue.split(scales)
    a_scale_dim, b_scale_dim = epilogue.split(scale_dims)
    size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
    if b_dim is None and b_scale_dim is None:
        # The batch becomes a leading dim of a (and of a_scale): one call, no loop.
        a = _batch_axis(a, a_dim, 0, size)
        if a_scale is not None:
            a_scale = _batch_axis(a_scale, a_scale_dim, 0, size)
        operands = [s for s in (a_scale, b_scale) if s is not None]
        return int_matmul_p.bind(a, b, *operands, epilogue=epilogue), 0
    # A batch of b's: one call per member.
    batched = [d is not None for d in dims]
    members = [jnp.moveaxis(x, d, 0) for x, d in zip(args, dims) if d is not None]

    def member(slices):
        slices = iter(slices)
        operands = [next(slices) if is_batched else x for x, is_batched in zip(args, batched)]
        return int_matmul_p.bind(*operands, epilogue=epilogue)

    return jax.lax.map(member, members), 0


batching.primitive_batchers[int_matmul_p] = _int_matmul_batch


# --- differentiation ---------------------------------------------------------

_NOT_DIFFERENTIABLE = (
    "jax_lowbit.int_matmul is not differentiable: its integer operands have no tangents, and "
    "no derivative with respect to a_scale or b_scale is defined. Wrap the scales in "
    "jax.lax.stop_gradient, or differentiate a float computation instead")


def _int_matmul_jvp(primals, tangents, *, epilogue):
    # JAX calls a JVP rule only when some operand has a nonzero tangent.
    raise TypeError(_NOT_DIFFERENTIABLE)


ad.primitive_jvps[int_matmul_p] = _int_matmul_jvp
