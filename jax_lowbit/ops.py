"""Public operations on QuantizedWeight."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_lowbit import act_quant_lowering, lowering  # noqa: F401  (registers the lowerings)
from jax_lowbit.act_quant_primitives import act_quant_matmul_p, check_act_bits
from jax_lowbit.primitives import WeightFormat, dequantize_p, matmul_p
from jax_lowbit.quantized_weight import QuantizedWeight
from jax_lowbit.validation import check_float_dtype, check_integer_group_scales


def _operands(qw: QuantizedWeight, caller: str):
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"{caller}: expected a QuantizedWeight, got {type(qw).__name__}")
    if (qw.sparsity is None) != (qw.metadata is None):
        raise ValueError(f"{caller}: a QuantizedWeight has metadata exactly when it has a "
                         f"sparsity, got sparsity={qw.sparsity!r} and metadata "
                         f"{'None' if qw.metadata is None else 'given'}")
    if qw.integer_group_scales:
        check_integer_group_scales(caller, qw.bits, qw.symmetric, qw.group_size, qw.sparsity,
                                   qw.scales.dtype)
    fmt = WeightFormat(tuple(qw.shape), qw.bits, qw.group_size, qw.symmetric, qw.sparsity,
                       qw.integer_group_scales)
    operands = (qw.codes, qw.scales) + tuple(a for a in (qw.offsets, qw.metadata) if a is not None)
    return operands, fmt


def dequantize(qw: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """The (K, N) weight of ``qw`` in ``dtype`` (float32, bfloat16 or float16)."""
    check_float_dtype("dequantize dtype", dtype)
    operands, fmt = _operands(qw, "dequantize")
    return dequantize_p.bind(*operands, fmt=fmt, dtype=jnp.dtype(dtype))


def matmul(x, qw: QuantizedWeight, *, act_bits=None) -> jax.Array:
    """``x @ qw.dequantize()`` with float32 accumulation, in x's dtype.

    Args:
      x: (..., K) array of dtype bfloat16, float16 or float32; any leading
        dims (none included) are rows of the product.
      qw: a QuantizedWeight of shape (K, N).
      act_bits: None (float x, weight-only) or 8: each row of x is quantized
        to int8 (absmax / 127 per row) and multiplied by the 4- or 8-bit codes
        on integer arithmetic, group by group (W8A8, W4A8; the exact
        arithmetic is in docs/formats.md). Its derivative is the
        straight-through estimate, that of the weight-only product.

    Returns:
      (..., N) array of x's dtype. Differentiable with respect to x (the
      weight is a constant: a tangent for its scales or offsets raises, even
      an explicit zero one; leave the weight out of the differentiated
      arguments or wrap it in ``jax.lax.stop_gradient``). Batches under
      ``jax.vmap`` without a loop.
    """
    operands, fmt = _operands(qw, "matmul")
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        x = jnp.asarray(x)
    check_float_dtype("matmul: x", x.dtype)
    if act_bits is not None:
        check_act_bits(act_bits)
        return act_quant_matmul_p.bind(x, *operands, fmt=fmt)
    return matmul_p.bind(x, *operands, fmt=fmt)
