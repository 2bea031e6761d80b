"""GPTQ (Frantar et al. 2022): quantization that compensates rounding errors
with calibration inputs.

Rows of K are rounded one at a time (on the grid of their group, computed
from the weights as updated so far); each row's rounding error is spread over
the rows not yet rounded, weighted by the inverse Hessian ``H = sum x^T x`` of
the layer's inputs, so that ``x @ W`` changes as little as possible on inputs
like the calibration ones. Where inputs have a few large channels (the
LayerNorm and GELU outputs of transformers), this keeps those channels' errors
out of the output. The result is an ordinary packed weight (docs/formats.md).

When the layers before this one are quantized too, its inputs ``x`` differ
from the float model's ``x_float``; given ``sum x^T x_float`` the rounding
targets the float model's outputs ``x_float @ W`` instead of ``x @ W``, so
each layer also compensates what the layers before it changed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_lowbit import formats
from jax_lowbit.quantize import check_finite_grid, group_grid, round_to_grid
from jax_lowbit.quantized_weight import QuantizedWeight
from jax_lowbit.validation import as_weight_matrix, check_weight_format

# Range fractions tried per group and column by the clip search: a narrower
# range clamps a few extreme weights and rounds the others more finely.
CLIP_FRACTIONS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def input_hessian(x, x_float=None) -> np.ndarray:
    """``sum x^T x`` (K, K), float64, over all rows of ``x`` (..., K): what
    ``gptq_quantize`` needs from a layer's calibration inputs. With ``x_float``
    (the same shape: the float model's inputs to the layer at the same
    positions), ``sum x^T x_float``, its ``float_cross``. Sums of several
    batches add up."""
    # Products in float32 (twice as fast as float64; GPTQ's damping dwarfs
    # its rounding), returned in float64 for the factorizations.
    x = np.asarray(x, np.float32)
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"input_hessian: x must have a last axis K > 0, got shape {x.shape}")
    x_float = x if x_float is None else np.asarray(x_float, np.float32)
    if x_float.shape != x.shape:
        raise ValueError(f"input_hessian: x_float must have the shape of x, "
                         f"got {x_float.shape} for {x.shape}")
    x, x_float = x.reshape(-1, x.shape[-1]), x_float.reshape(-1, x.shape[-1])
    return (x.T @ x_float).astype(np.float64)


def _dequantize(codes, scales, offsets, bits):
    """``code * scale + offset`` in float32 (offsets None: symmetric)."""
    scales = scales.astype(jnp.float32)
    offsets = (-formats.symmetric_offset(bits) * scales if offsets is None
               else offsets.astype(jnp.float32))
    return codes * scales + offsets


def _clip_searched_grid(block, importance, bits, symmetric, scale_dtype):
    """Grid (scales, offsets), each (1, N), of one group ``block`` (rows, N):
    per column, the range fraction of CLIP_FRACTIONS whose grid has the
    smallest importance-weighted squared error (all fractions at once)."""
    low, high = jnp.min(block, axis=0), jnp.max(block, axis=0)
    if symmetric:
        high = jnp.maximum(jnp.abs(low), jnp.abs(high))
        low = -high
    middle, half_range = (low + high) / 2, (high - low) / 2
    fractions = jnp.asarray(CLIP_FRACTIONS, jnp.float32)[:, None, None]
    clipped = jnp.clip(block, middle - fractions * half_range, middle + fractions * half_range)
    scales, offsets = group_grid(clipped, bits, symmetric=symmetric, scale_dtype=scale_dtype)
    codes = round_to_grid(jnp.broadcast_to(block, clipped.shape), scales, offsets, bits)
    restored = _dequantize(codes, scales[:, None, :],
                           None if offsets is None else offsets[:, None, :], bits)
    error = jnp.sum(importance[:, None] * (block - restored) ** 2, axis=1)  # (fractions, N)
    best = jnp.argmin(error, axis=0)[None]  # the first minimum: ties keep the full range
    return (jnp.take_along_axis(scales, best, axis=0),
            None if offsets is None else jnp.take_along_axis(offsets, best, axis=0))


@jax.jit
def _inverse_upper_factor(hessian):
    """Upper triangular U with U^T U = hessian^-1: row k of U spreads row k's
    rounding error (the inverse Hessian of the rows not rounded yet, without
    re-inverting). With J reversing the order and L the lower Cholesky factor
    of J H J, U = J L^-1 J: one factorization and one triangular solve."""
    lower = jnp.linalg.cholesky(hessian[::-1, ::-1])
    eye = jnp.eye(hessian.shape[0], dtype=hessian.dtype)
    return jax.scipy.linalg.solve_triangular(lower, eye, lower=True)[::-1, ::-1]


@functools.partial(jax.jit, static_argnames=("bits", "rows", "symmetric", "scale_dtype",
                                             "clip_search"))
def _gptq_codes(w, inverse_factor, importance, bits, rows, symmetric, scale_dtype, clip_search):
    """Codes (K, N), scales and offsets (G, N) of ``w`` (K, N), with
    ``inverse_factor`` the upper Cholesky factor of the damped inverse Hessian
    and ``importance`` (K,) the damped Hessian's diagonal."""
    k, n = w.shape
    groups = k // rows
    later_in_block = jnp.arange(rows)[None, :] > jnp.arange(rows)[:, None]

    def group_step(g, carry):
        w, codes, scales, offsets = carry
        start = g * rows
        block = jax.lax.dynamic_slice_in_dim(w, start, rows, axis=0)
        factor_rows = jax.lax.dynamic_slice_in_dim(inverse_factor, start, rows, axis=0)
        factor_block = jax.lax.dynamic_slice_in_dim(factor_rows, start, rows, axis=1)
        if clip_search:
            block_importance = jax.lax.dynamic_slice_in_dim(importance, start, rows)
            grid = _clip_searched_grid(block, block_importance, bits, symmetric, scale_dtype)
        else:
            grid = group_grid(block[None], bits, symmetric=symmetric, scale_dtype=scale_dtype)
        group_scales, group_offsets = grid

        def row_step(j, row_carry):
            block, block_codes, errors = row_carry
            row = block[j]
            row_codes = round_to_grid(row[None, None, :], group_scales, group_offsets, bits)[0, 0]
            quantized = _dequantize(row_codes, group_scales[0],
                                    None if group_offsets is None else group_offsets[0], bits)
            error = (row - quantized) / factor_block[j, j]
            # Spread the error over the rows of the group not rounded yet.
            block = block - jnp.where(later_in_block[j], factor_block[j], 0.0)[:, None] * error
            return block, block_codes.at[j].set(row_codes), errors.at[j].set(error)

        init = (block, jnp.zeros((rows, n), jnp.float32), jnp.zeros((rows, n), jnp.float32))
        _, block_codes, errors = jax.lax.fori_loop(0, rows, row_step, init)
        # And over the rows of later groups, in one product.
        after = (jnp.arange(k) >= start + rows)[:, None]
        # HIGHEST: a GPU would run float32 products in TF32 (10-bit mantissas).
        spread = jnp.matmul(factor_rows.T, errors, precision=jax.lax.Precision.HIGHEST)
        w = w - jnp.where(after, spread, 0.0)
        codes = jax.lax.dynamic_update_slice_in_dim(codes, block_codes, start, axis=0)
        scales = scales.at[g].set(group_scales[0])
        if offsets is not None:
            offsets = offsets.at[g].set(group_offsets[0])
        return w, codes, scales, offsets

    init = (w, jnp.zeros((k, n), jnp.float32), jnp.zeros((groups, n), scale_dtype),
            None if symmetric else jnp.zeros((groups, n), scale_dtype))
    _, codes, scales, offsets = jax.lax.fori_loop(0, groups, group_step, init)
    return codes, scales, offsets


def gptq_quantize(w, hessian, bits: int, group_size: int = 128, *, symmetric: bool = False,
                  scale_dtype=jnp.bfloat16, damping: float = 0.1, act_order: bool = False,
                  clip_search: bool = True, float_cross=None):
    """Quantizes a (K, N) weight with GPTQ error compensation.

    Args:
      w: 2-D float array (K, N), (in_features, out_features).
      hessian: (K, K) ``sum x^T x`` over calibration inputs ``x`` of the layer
        (``input_hessian``). A few thousand tokens of text like the real
        inputs are plenty; with fewer than K rows, ``damping`` keeps it usable.
      bits, group_size, symmetric, scale_dtype: the format, as in
        ``jax_lowbit.quantize`` (asymmetric by default: it fits the weights
        that error compensation shifts better).
      damping: added to the Hessian's diagonal, as a fraction of its mean
        diagonal; larger trusts the calibration data less.
      act_order: round rows of K in the order of decreasing input energy
        (the Hessian's diagonal), so the large channels are rounded first and
        the others compensate. K is then stored in that order: the weight is
        applied as ``x[..., permutation] @ weight``.
      clip_search: per group and column, pick the grid's range among
        CLIP_FRACTIONS of the full range, minimizing the squared error weighted
        by the input energy of each row.
      float_cross: None, or (K, K) ``sum x^T x_float`` (``input_hessian(x,
        x_float)``) when the layer's inputs ``x`` (those of ``hessian``) come
        from a model whose earlier layers are quantized and ``x_float`` are the
        float model's at the same positions. The rounding then minimizes
        ``|x @ Q - x_float @ w|^2 + d |Q - w|^2`` (the float model's outputs
        as the target), ``d`` the damping added to the Hessian's diagonal,
        rather than ``|x @ (Q - w)|^2 + d |Q - w|^2``.

    Returns:
      ``(weight, permutation)``: a QuantizedWeight, and None or (with
      ``act_order``) an int array ``permutation`` of K to apply to ``x`` (as
      ``jax_lowbit.load_gptq`` returns; ``QuantLinear`` takes it as
      ``input_permutation``). Not traceable under ``jax.jit`` (the Hessian
      is prepared with numpy).
    """
    w = as_weight_matrix(w, "gptq_quantize")
    k, n = (int(d) for d in w.shape)
    check_weight_format(k, bits, group_size, scale_dtype)
    hessian = np.asarray(hessian, np.float64)
    if hessian.shape != (k, k):
        raise ValueError(f"gptq_quantize: hessian must be ({k}, {k}) for w of shape {(k, n)}, "
                         f"got {hessian.shape}")
    if not damping > 0:
        raise ValueError(f"gptq_quantize: damping must be > 0, got {damping}")
    if float_cross is not None:
        float_cross = np.asarray(float_cross, np.float64)
        if float_cross.shape != (k, k):
            raise ValueError(f"gptq_quantize: float_cross must be ({k}, {k}) like the hessian, "
                             f"got {float_cross.shape}")
    w = np.array(w, np.float64)
    if not all(np.all(np.isfinite(a)) for a in (w, hessian, float_cross) if a is not None):
        raise ValueError("gptq_quantize: w, hessian or float_cross contains NaN or Inf")

    hessian = hessian.copy()
    dead = np.diag(hessian) == 0  # inputs that were always 0: their rows do not matter
    hessian[dead, dead] = 1.0
    damping_term = damping * np.mean(np.diag(hessian))
    hessian[np.diag_indices(k)] += damping_term
    order = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(k)
    hessian, w, dead = hessian[np.ix_(order, order)], w[order], dead[order]
    inverse_factor = np.asarray(_inverse_upper_factor(jnp.asarray(hessian, jnp.float32)),
                                np.float64)
    if not np.all(np.isfinite(inverse_factor)):  # the Cholesky factorization failed
        raise ValueError("gptq_quantize: the damped hessian is not positive definite (in "
                         "float32); pass sum x^T x of real inputs, or a larger damping")
    if float_cross is not None:
        # The real-valued minimizer (H + d)^-1 (C w + d w) of that objective:
        # rounding towards it under the damped Hessian minimizes the same one.
        target = float_cross[np.ix_(order, order)] @ w + damping_term * w
        w = inverse_factor.T @ (inverse_factor @ target)
    w[dead] = 0.0

    rows = formats.group_rows(group_size, k)
    codes, scales, offsets = _gptq_codes(jnp.asarray(w, jnp.float32),
                                         jnp.asarray(inverse_factor, jnp.float32),
                                         jnp.asarray(np.diag(hessian), jnp.float32), bits=bits,
                                         rows=rows, symmetric=symmetric,
                                         scale_dtype=jnp.dtype(scale_dtype), clip_search=clip_search)
    check_finite_grid(scales, offsets, scale_dtype)
    weight = QuantizedWeight(codes=formats.pack_codes(codes, bits), scales=scales,
                             offsets=offsets, shape=(k, n), bits=bits, group_size=group_size,
                             symmetric=symmetric)
    return weight, (order if act_order else None)
