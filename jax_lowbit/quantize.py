"""Round-to-nearest quantization of a (K, N) float weight into the packed format."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_lowbit import formats
from jax_lowbit.hqq import optimize_zero_points
from jax_lowbit.quantized_weight import QuantizedWeight
from jax_lowbit.sparsity import compress_2_4
from jax_lowbit.validation import (as_weight_matrix, check_integer_group_scales,
                                   check_weight_format)


def _round_toward(value: jax.Array, dtype, direction: int) -> jax.Array:
    """Casts float32 ``value`` to ``dtype``, rounding up (+1) or down (-1).

    Directed rounding of the stored scale and offset keeps every weight of a
    group inside the grid, so no code is clamped and the error stays within
    half a step even for 8-bit codes with bfloat16 scales.

    The rounding is computed in float32 with ``reduce_precision`` and explicit
    ulps: XLA may drop a float32 -> bfloat16 -> float32 round trip as excess
    precision, which would silently turn this into round-to-nearest.
    """
    info = jnp.finfo(dtype)
    nearest = jax.lax.reduce_precision(value, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    _, exponent = jnp.frexp(nearest)
    ulp = jnp.ldexp(jnp.float32(1), exponent - 1 - info.nmant)
    missed = nearest < value if direction > 0 else nearest > value
    rounded = jnp.where(missed, nearest + direction * ulp, nearest)
    subnormal = float(info.smallest_subnormal)
    if subnormal >= float(jnp.finfo(jnp.float32).tiny):
        # float16's subnormals are float32 normals: below its smallest normal
        # the grid is a multiple of the smallest subnormal (frexp of a value
        # reduce_precision flushed to 0 would give a far too coarse step).
        steps = value / jnp.float32(subnormal)
        steps = jnp.ceil(steps) if direction > 0 else jnp.floor(steps)
        rounded = jnp.where(jnp.abs(value) < float(info.tiny), steps * jnp.float32(subnormal),
                            rounded)
    return rounded.astype(dtype)


def _round_nearest(value: jax.Array, dtype) -> jax.Array:
    """Casts float32 ``value`` to ``dtype``, rounding to nearest, through
    ``reduce_precision``: code rounding in the same jit must see the stored
    value, and XLA may drop a float32 -> bfloat16 -> float32 round trip as
    excess precision (on the H100 it did: ternary codes disagreed with their
    stored scales). Subnormals of ``dtype`` are left to the cast, which
    reduce_precision would flush."""
    info = jnp.finfo(dtype)
    nearest = jax.lax.reduce_precision(value, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return jnp.where(jnp.abs(value) < float(info.tiny), value, nearest).astype(dtype)


def group_grid(grouped: jax.Array, bits: int, *, symmetric: bool, scale_dtype,
               method: str = "rtn", ternary: bool = False):
    """(scales, offsets) of ``grouped`` weights (G, rows, N), each (G, N) in
    ``scale_dtype``; offsets None when symmetric. The rules of ``quantize``."""
    if ternary:
        return _round_nearest(jnp.mean(jnp.abs(grouped), axis=1), scale_dtype), None
    if symmetric:
        absmax = jnp.max(jnp.abs(grouped), axis=1)
        half = formats.symmetric_offset(bits)
        return _round_toward(absmax / (half - 0.5), scale_dtype, +1), None
    offsets = _round_toward(jnp.min(grouped, axis=1), scale_dtype, -1)
    offsets_f32 = offsets.astype(jnp.float32)
    high = jnp.max(grouped, axis=1)
    scales = _round_toward((high - offsets_f32) / ((1 << bits) - 1), scale_dtype, +1)
    if method == "hqq":
        scales_f32 = scales.astype(jnp.float32)
        safe = jnp.where(scales_f32 == 0, 1.0, scales_f32)
        zero_points = optimize_zero_points(grouped, scales_f32, -offsets_f32 / safe,
                                           (1 << bits) - 1)
        offsets = _round_nearest(-zero_points * scales_f32, scale_dtype)
    return scales, offsets


def integer_scale_grid(grouped: jax.Array) -> jax.Array:
    """float32 scales (G, N) of int4 symmetric ``grouped`` weights (G, rows, N)
    whose groups share one scale per column: ``c = absmax / 120`` of the column
    rounded up to bfloat16 precision, and group g's scale ``c * m`` with the
    integer ``m = ceil(group absmax / (7.5 c))`` in 0..16, exact in float32
    (docs/formats.md). The column's largest group gets m = 16, so ``c`` is
    ``max_g scale / 16``."""
    half_range = formats.symmetric_offset(4) - 0.5  # 7.5, as for every symmetric grid
    absmax = jnp.max(jnp.abs(grouped), axis=1)
    column_max = jnp.max(absmax, axis=0)
    column = _round_toward(column_max / (16 * half_range), jnp.bfloat16, +1).astype(jnp.float32)
    # The float32 quotient may have rounded down: one bfloat16 step more then
    # keeps 120 c >= absmax (exact products: c has 8 significant bits).
    step = jnp.ldexp(jnp.float32(1), jnp.frexp(column)[1] - 8)
    column = jnp.where(16 * half_range * column < column_max, column + step, column)
    safe = jnp.where(column == 0, 1.0, column)
    multiples = jnp.clip(jnp.ceil(absmax / (half_range * safe)), 0, 16)
    return column * multiples


def round_to_grid(grouped: jax.Array, scales, offsets, bits: int, *, ternary: bool = False):
    """Codes (float, 0 .. 2^bits - 1) of ``grouped`` weights (G, rows, N) rounded to
    nearest on the grid ``code * scale + offset`` of (G, N) ``scales``/``offsets``
    (offsets None: symmetric)."""
    scales_f32 = scales.astype(jnp.float32)
    if offsets is None:
        offsets_f32 = -formats.symmetric_offset(bits) * scales_f32
    else:
        offsets_f32 = offsets.astype(jnp.float32)
    # A zero scale means a constant group: every code 0 gives back the offset.
    safe = jnp.where(scales_f32 == 0, 1.0, scales_f32)
    codes = jnp.round((grouped - offsets_f32[:, None, :]) / safe[:, None, :])
    lowest = 1 if ternary else 0  # ternary: codes 1, 2, 3 are -1, 0, +1
    return jnp.clip(codes, lowest, (1 << bits) - 1)


def check_finite_grid(scales, offsets, scale_dtype) -> None:
    """Raises ValueError if concrete scales or offsets overflowed ``scale_dtype``."""
    if isinstance(scales, jax.core.Tracer):
        return
    stored = [scales] if offsets is None else [scales, offsets]
    if not all(bool(jnp.all(jnp.isfinite(a))) for a in stored):
        raise ValueError(
            f"quantize: the weight's range overflows {jnp.dtype(scale_dtype).name} "
            "scales; use scale_dtype=jnp.float32")


METHODS = ("rtn", "hqq")


# Jitted so that eager calls (quantize_model, one per layer) compile once per
# shape and format: HQQ's loop would otherwise be traced and compiled per call.
@functools.partial(jax.jit, static_argnames=("bits", "rows", "symmetric", "scale_dtype",
                                             "method", "ternary", "sparsity", "integer"))
def _packed_arrays(w, *, bits, rows, symmetric, scale_dtype, method, ternary, sparsity,
                   integer):
    """(packed codes, scales, offsets, 2:4 metadata) of a float32 (K, N) ``w``."""
    values, metadata = w, None
    if sparsity is not None:  # only the two kept values of every 4 rows are quantized
        values, metadata = compress_2_4(values)
        rows //= 2
    grouped = values.reshape(-1, rows, values.shape[1])
    if integer:
        scales, offsets = integer_scale_grid(grouped), None
    else:
        scales, offsets = group_grid(grouped, bits, symmetric=symmetric,
                                     scale_dtype=scale_dtype, method=method, ternary=ternary)
    codes = round_to_grid(grouped, scales, offsets, bits, ternary=ternary).reshape(values.shape)
    return formats.pack_codes(codes, bits), scales, offsets, metadata


def quantize(w, bits: int, group_size: int = 128, *, symmetric: bool = True,
             scale_dtype=jnp.bfloat16, method: str = "rtn",
             ternary: bool = False, sparsity: str | None = None,
             integer_group_scales: bool = False) -> QuantizedWeight:
    """Quantizes a (K, N) weight (Flax kernel layout) to ``bits``-bit codes.

    Groups of ``group_size`` consecutive rows of K (all of K for -1) share one
    scale per column. Symmetric: a signed grid ``-2^(b-1) .. 2^(b-1)-1`` times a
    scale, with the scale ``absmax / (2^(b-1) - 1/2)`` so both ends of the range
    are within half a step. Asymmetric: ``code * scale + offset`` with a float
    offset at the group minimum and codes ``0 .. 2^b - 1``. Codes are rounded
    to nearest; the scale is rounded up and the offset down into
    ``scale_dtype`` so that every weight stays inside the grid.

    Args:
      w: 2-D float array (K, N), (in_features, out_features).
      bits: 2, 4 or 8.
      group_size: 32, 64, 128, 256, or -1 for one group spanning K.
      symmetric: signed grid and a scale (True) or scale and offset (False).
      scale_dtype: storage dtype of scales and offsets: bfloat16 (default),
        float16 or float32.
      method: "rtn" (round to nearest, above) or "hqq" (asymmetric only): the
        same scales, with the offsets refined without data to minimize the l_p
        (p = 0.7) reconstruction error, then codes rounded to nearest on that
        grid (jax_lowbit/hqq.py). Extreme weights may then be clamped: the
        half-step bound holds for "rtn" only.
      ternary: weights -1, 0, +1 times a per-group scale (BitNet b1.58 style:
        scale = mean |w| of the group, codes round(w / scale) clipped to
        [-1, 1]). Needs bits=2 and symmetric=True; stored as int2 symmetric
        codes 1..3, so every int2 kernel serves it.
      sparsity: None (dense) or "2:4" (bits=4, K a multiple of 64): ``w`` is
        pruned to its 2 largest magnitudes in every 4 consecutive rows of each
        column (``prune_2_4``; a 2:4 ``w`` keeps all its nonzeros), and only
        the kept values are quantized and stored, with their positions in
        ``metadata``; scales and offsets are fitted to the kept values.
      integer_group_scales: int4 symmetric only, with scale_dtype=jnp.float32
        and groups (group_size not -1): each column's group scales are
        integer multiples 0..16 of one float32 scale ``c`` (absmax / 120 of
        the column, rounded up to bfloat16 precision): ``c * ceil(group
        absmax / (7.5 c))``, a step at most twice the float-scale one and
        still within half a step of every weight. Every path reads it as an
        ordinary float32-scale weight; ``matmul(x, qw, act_bits=8)`` on an
        sm_90 GPU then forms each column's int8 weights ``(code - 8) * m`` in
        registers and sums across groups on int8 tensor cores
        (QServe-style two-level scales; docs/formats.md, docs/perf.md v23).

    Returns:
      A QuantizedWeight. Under ``jax.jit`` the check for NaN/Inf in ``w``
      cannot run; non-finite weights then give non-finite scales.
    """
    w = as_weight_matrix(w, "quantize")
    k, n = (int(d) for d in w.shape)
    check_weight_format(k, bits, group_size, scale_dtype, sparsity)
    if method not in METHODS:
        raise ValueError(f"unsupported method={method!r}; supported: {METHODS}")
    if method == "hqq" and symmetric:
        raise ValueError("method='hqq' refines zero points: use symmetric=False")
    if ternary and (bits != 2 or not symmetric or method != "rtn"):
        raise ValueError("ternary=True needs bits=2, symmetric=True and method='rtn'")
    if integer_group_scales:  # (ternary needs bits=2, HQQ asymmetric weights: refused here too)
        check_integer_group_scales("quantize", bits, symmetric, group_size, sparsity,
                                   scale_dtype)
    if not isinstance(w, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError("quantize: w contains NaN or Inf")

    codes, scales, offsets, metadata = _packed_arrays(
        jnp.asarray(w, jnp.float32), bits=bits, rows=formats.group_rows(group_size, k),
        symmetric=symmetric, scale_dtype=jnp.dtype(scale_dtype), method=method,
        ternary=ternary, sparsity=sparsity, integer=bool(integer_group_scales))
    check_finite_grid(scales, offsets, scale_dtype)
    return QuantizedWeight(
        codes=codes,
        scales=scales,
        offsets=offsets,
        shape=(k, n),
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
        metadata=metadata,
        sparsity=sparsity,
        integer_group_scales=bool(integer_group_scales),
    )
