"""int_matmul: products of int8 or int4 matrices with exact int32 accumulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_lowbit import int_lowering  # noqa: F401  (registers the lowerings)
from jax_lowbit.int_primitives import IntEpilogue, int_matmul_p


def _as_array(x):
    return x if hasattr(x, "dtype") and hasattr(x, "shape") else jnp.asarray(x)


def int_matmul(a, b, *, a_scale=None, b_scale=None, out_dtype=None) -> jax.Array:
    """``a @ b`` of integer matrices, accumulated exactly in int32.

    Args:
      a: (..., K) array, int8 or int4; any leading dims (none included) are
        rows of the product.
      b: (K, N) array of the same dtype as ``a``.
      a_scale: optional per-row scale of ``a``, shape ``a.shape[:-1] + (1,)``
        (what ``jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127`` gives),
        dtype bfloat16, float16 or float32.
      b_scale: optional per-column scale of ``b``, shape (N,), same dtypes.
      out_dtype: with a scale, the result dtype (bfloat16, float16 or float32;
        default bfloat16). Without scales the result is int32 and out_dtype
        must be None or int32.

    Returns:
      (..., N) array. Without scales, the int32 product (exact while every
      sum fits in int32, e.g. any K <= 131072 for int8; larger sums wrap
      modulo 2^32 like XLA's int32 dot). With scales,
      ``out_dtype((float32(a @ b) * a_scale) * b_scale)`` computed in
      float32, a missing scale being 1. Batches under ``jax.vmap`` (a batch
      of ``a`` becomes rows of one call). Not differentiable: a tangent for a
      scale raises TypeError.
    """
    a, b = _as_array(a), _as_array(b)
    scales = [_as_array(s) for s in (a_scale, b_scale) if s is not None]
    if out_dtype is None:
        out_dtype = jnp.bfloat16 if scales else jnp.int32
    epilogue = IntEpilogue(a_scale is not None, b_scale is not None, jnp.dtype(out_dtype))
    return int_matmul_p.bind(a, b, *scales, epilogue=epilogue)
