"""The JAX primitives: dequantize and matmul of a packed weight.

Operands are ``(codes, scales[, offsets][, metadata])`` (``x`` first for
matmul), the format is the static ``fmt`` parameter. This module holds the shape rules, batching
and differentiation; lowering.py holds the platform lowerings.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import core as jax_core
from jax.extend import core
from jax.interpreters import ad, batching

from jax_lowbit import partitioning, validation


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """Static description of a packed weight (a primitive parameter)."""

    shape: tuple[int, int]
    bits: int
    group_size: int
    symmetric: bool
    sparsity: str | None = None
    integer_group_scales: bool = False

    def split(self, weight_operands):
        """(codes, scales, offsets or None, metadata or None) from the primitive's weight
        operands; the metadata of a sparse weight comes last."""
        codes, scales, *rest = weight_operands
        metadata = rest.pop() if self.sparsity else None
        return codes, scales, (rest[0] if rest else None), metadata

    def with_columns(self, n: int) -> "WeightFormat":
        return dataclasses.replace(self, shape=(self.shape[0], n))


dequantize_p = core.Primitive("jax_lowbit_dequantize")
matmul_p = core.Primitive("jax_lowbit_matmul")


# --- shape rules -----------------------------------------------------------

def _check_weight(weight_avals, fmt: WeightFormat) -> None:
    codes, scales, offsets, metadata = fmt.split(weight_avals)
    validation.check_packed_arrays(codes, scales, offsets, fmt.shape, fmt.bits,
                                   fmt.group_size, fmt.symmetric, fmt.sparsity, metadata)


def _dequantize_abstract_eval(*weight, fmt: WeightFormat, dtype):
    _check_weight(weight, fmt)
    validation.check_float_dtype("dequantize dtype", dtype)
    return jax_core.ShapedArray(fmt.shape, dtype,
                                sharding=partitioning.dequantize_result_sharding(weight[0]))


def _matmul_abstract_eval(x, *weight, fmt: WeightFormat):
    _check_weight(weight, fmt)
    validation.check_float_dtype("matmul: x", x.dtype)
    k, n = fmt.shape
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(
            f"matmul: x has shape {tuple(x.shape)}, its last dimension must equal the "
            f"weight's K={k}")
    return jax_core.ShapedArray(x.shape[:-1] + (n,), x.dtype,
                                sharding=partitioning.product_result_sharding(x, weight[0]))


dequantize_p.def_abstract_eval(_dequantize_abstract_eval)
matmul_p.def_abstract_eval(_matmul_abstract_eval)
# Eager calls run the lowering through jit, compiled once per format.
dequantize_p.def_impl(jax.jit(dequantize_p.bind, static_argnames=("fmt", "dtype")))
matmul_p.def_impl(jax.jit(matmul_p.bind, static_argnames=("fmt",)))


def contract(spec: str, a, b):
    """einsum with float32 accumulation, in full float32 precision for float32
    operands (GPUs would otherwise use TF32), cast back to ``a``'s dtype."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    y = jnp.einsum(spec, a, b, preferred_element_type=jnp.float32, precision=precision)
    return y.astype(a.dtype)


# --- batching --------------------------------------------------------------

def _batch_axis(a, bdim, axis: int, size: int):
    """Moves ``a``'s batch dim to ``axis``, broadcasting an unbatched ``a``."""
    if bdim is None:
        a = jnp.expand_dims(a, axis)
        return jnp.broadcast_to(a, a.shape[:axis] + (size,) + a.shape[axis + 1:])
    return jnp.moveaxis(a, bdim, axis)


def _dequantize_stacked(weight, dims, fmt: WeightFormat, dtype, size: int):
    """Dequantizes a batch of weights to (size, K, N) with one call.

    Stacking the batch beside N, (rows, B, N) -> (rows, B*N), turns B weights
    into one weight of B*N columns: same groups, same codes per word.
    """
    k, n = fmt.shape
    folded = []
    for a, d in zip(weight, dims):
        a = _batch_axis(a, d, 1, size)
        folded.append(a.reshape(a.shape[0], size * n))
    w = dequantize_p.bind(*folded, fmt=fmt.with_columns(size * n), dtype=dtype)
    return jnp.moveaxis(w.reshape(k, size, n), 1, 0)


def _dequantize_batch(args, dims, *, fmt, dtype):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    return _dequantize_stacked(args, dims, fmt, dtype, size), 0


def _matmul_batch(args, dims, *, fmt):
    x, *weight = args
    x_dim, *weight_dims = dims
    if all(d is None for d in weight_dims):
        # Leading dims of x fold into M inside the kernel: one call, no loop.
        return matmul_p.bind(jnp.moveaxis(x, x_dim, 0), *weight, fmt=fmt), 0
    # A batch of weights (e.g. stacked experts): dequantize all in one call
    # and contract per batch member.
    size = next(a.shape[d] for a, d in zip(weight, weight_dims) if d is not None)
    w = _dequantize_stacked(weight, weight_dims, fmt, x.dtype, size)
    if x_dim is None:
        return contract("...k,bkn->b...n", x, w), 0
    return contract("b...k,bkn->b...n", jnp.moveaxis(x, x_dim, 0), w), 0


batching.primitive_batchers[dequantize_p] = _dequantize_batch
batching.primitive_batchers[matmul_p] = _matmul_batch


# --- differentiation ---------------------------------------------------------

_CONSTANT_WEIGHTS = (
    "jax_lowbit: differentiation with respect to a QuantizedWeight's scales or offsets is "
    "not supported (quantized weights are constants); differentiate with respect to the "
    "activations only, or wrap the weight in jax.lax.stop_gradient")


def _require_constant_weight(weight_tangents) -> None:
    if any(type(t) is not ad.Zero for t in weight_tangents):
        raise TypeError(_CONSTANT_WEIGHTS)


def _dequantize_jvp(primals, tangents, *, fmt, dtype):
    _require_constant_weight(tangents)
    w = dequantize_p.bind(*primals, fmt=fmt, dtype=dtype)
    return w, ad.Zero.from_primal_value(w)


def weight_only_tangent_jvp(primitive):
    """The JVP rule of a product ``primitive.bind(x, *weight, fmt=fmt)`` whose
    tangent is the weight-only product ``matmul_p`` of x's tangent: exact for
    matmul_p itself, the straight-through estimate for a product that
    quantizes x. matmul_p is linear in x and transposes for reverse mode."""

    def jvp(primals, tangents, *, fmt):
        x, *weight = primals
        x_dot, *weight_dots = tangents
        _require_constant_weight(weight_dots)
        y = primitive.bind(x, *weight, fmt=fmt)
        if type(x_dot) is ad.Zero:
            return y, ad.Zero.from_primal_value(y)
        return y, matmul_p.bind(x_dot, *weight, fmt=fmt)

    return jvp


def _matmul_transpose(cotangent, x, *weight, fmt):
    # matmul is linear in x only: x_bar = y_bar @ W^T.
    if any(ad.is_undefined_primal(a) for a in weight):
        raise TypeError(_CONSTANT_WEIGHTS)
    if type(cotangent) is ad.Zero:
        return (None,) + (None,) * len(weight)
    w = dequantize_p.bind(*weight, fmt=fmt, dtype=cotangent.dtype)
    x_bar = partitioning.transposed_product(functools.partial(contract, "...n,kn->...k"),
                                            cotangent, w, x.aval).astype(x.aval.dtype)
    return (x_bar,) + (None,) * len(weight)


ad.primitive_jvps[dequantize_p] = _dequantize_jvp
ad.primitive_jvps[matmul_p] = weight_only_tangent_jvp(matmul_p)
ad.primitive_transposes[matmul_p] = _matmul_transpose
