"""The act_quant_matmul primitive: ``matmul(x, qw, act_bits=8)`` (W8A8, W4A8).

Each row of x is quantized to int8 and multiplied on integer arithmetic by
the weight's codes (docs/formats.md, "Quantized activations"). Operands and
the static ``fmt`` are matmul_p's: ``(x, codes, scales[, offsets])``. This
module holds the shape rules, batching and the straight-through derivative;
act_quant_lowering.py holds the lowerings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core
from jax.interpreters import ad, batching

from jax_lowbit.primitives import WeightFormat, _matmul_abstract_eval, weight_only_tangent_jvp

ACT_BITS = (8,)
WEIGHT_BITS = (4, 8)  # codes that widen to int8 for the integer product

act_quant_matmul_p = core.Primitive("jax_lowbit_act_quant_matmul")


def check_act_bits(act_bits) -> None:
    """Raises ValueError unless ``act_bits`` is a supported activation width (8)."""
    integer = isinstance(act_bits, (int, np.integer)) and not isinstance(act_bits, bool)
    if not integer or act_bits not in ACT_BITS:  # not True, 8.0 or "8"
        raise ValueError(
            f"matmul: act_bits={act_bits!r} is not supported; use act_bits=8 (int8 activations, "
            "quantized per row) or act_bits=None (float activations, weight-only)")


def _abstract_eval(x, *weight, fmt: WeightFormat):
    out = _matmul_abstract_eval(x, *weight, fmt=fmt)
    if fmt.sparsity is not None:
        raise ValueError(
            f"matmul with act_bits=8 takes dense weights, got sparsity={fmt.sparsity!r}; use "
            "act_bits=None for sparse weights")
    if fmt.bits not in WEIGHT_BITS:
        raise ValueError(
            f"matmul with act_bits=8 needs 4- or 8-bit weights (int8 x int8 products), got "
            f"bits={fmt.bits}; use act_bits=None for {fmt.bits}-bit weights")
    return out


act_quant_matmul_p.def_abstract_eval(_abstract_eval)
# Eager calls run the lowering through jit, compiled once per format.
act_quant_matmul_p.def_impl(jax.jit(act_quant_matmul_p.bind, static_argnames=("fmt",)))


# --- batching --------------------------------------------------------------

def _batch(args, dims, *, fmt):
    x, *weight = args
    x_dim, *weight_dims = dims
    if all(d is None for d in weight_dims):
        # Leading dims of x are rows: one call, no loop.
        return act_quant_matmul_p.bind(jnp.moveaxis(x, x_dim, 0), *weight, fmt=fmt), 0
    # A batch of weights (e.g. stacked experts): one call per member.
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    members = [jnp.moveaxis(a, d, 0) if d is not None else jnp.broadcast_to(a, (size,) + a.shape)
               for a, d in zip(args, dims)]
    return jax.lax.map(lambda ops: act_quant_matmul_p.bind(*ops, fmt=fmt), members), 0


batching.primitive_batchers[act_quant_matmul_p] = _batch


# --- differentiation ---------------------------------------------------------

# Straight-through estimator: the rounding of x counts as the identity, so the
# tangent (and, transposed, the gradient y_bar @ dequantize(W)^T) is the
# weight-only product's.
ad.primitive_jvps[act_quant_matmul_p] = weight_only_tangent_jvp(act_quant_matmul_p)
