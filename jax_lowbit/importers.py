"""Import GPTQ, AWQ and HQQ checkpoints into QuantizedWeight without dequantizing.

GPTQ and AWQ store, per linear layer (K = in_features, N = out_features):
int32 words of packed codes, int32 words of packed integer zero points, and
float16 scales per (group, column); HQQ stores uint8-packed codes with float
scales and zero points. The imported weight keeps the codes and stores scales
and offsets (``-zero * scale``, exact) in float32, so ``dequantize`` computes
``scale * (code - zero)`` with one rounding, as the sources' formulas do.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jax_lowbit import formats
from jax_lowbit.quantized_weight import QuantizedWeight
from jax_lowbit.validation import check_weight_format

# AutoAWQ packs 8 int4 columns per word in this order (field i holds column ORDER[i]).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_int32(words, bits: int, axis: int, order=None) -> np.ndarray:
    """Integer fields of int32 ``words`` expanded along ``axis``: field i (bits
    ``i*bits``) of a word is element ``order[i]`` (default ``i``) of its block."""
    words = np.asarray(words).astype(np.uint32)
    per_word = 32 // bits
    fields = np.stack([(words >> np.uint32(bits * i)) & np.uint32((1 << bits) - 1)
                       for i in range(per_word)], axis=-1)
    if order is not None:
        fields = fields[..., np.argsort(order)]  # position j <- the field holding element j
    fields = np.moveaxis(fields, -1, axis + 1)
    shape = list(words.shape)
    shape[axis] *= per_word
    return fields.reshape(shape).astype(np.int64)


def _group_size(k: int, groups: int) -> int:
    if groups <= 0 or k % groups:
        raise ValueError(f"{groups} scale rows do not split K={k} into equal groups")
    rows = k // groups
    return -1 if groups == 1 else rows


def _build(codes, zeros, scales, bits: int, group_size: int) -> QuantizedWeight:
    k, n = codes.shape
    check_weight_format(k, bits, group_size, jnp.float32)
    if codes.min() < 0 or codes.max() >= (1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    scales32 = np.asarray(scales, np.float32)
    offsets = -np.asarray(zeros, np.float32) * scales32  # exact: |zero| < 2^9, 11-bit scales
    return QuantizedWeight(
        codes=formats.pack_codes(jnp.asarray(codes, jnp.uint32), bits),
        scales=jnp.asarray(scales32), offsets=jnp.asarray(offsets),
        shape=(k, n), bits=bits, group_size=group_size, symmetric=False)


def load_gptq(qweight, qzeros, scales, g_idx=None, *, bits: int = 4, zero_offset: int = 1):
    """A GPTQ layer (AutoGPTQ / GPTQ-for-LLaMa layout) as ``(QuantizedWeight, permutation)``.

    Args:
      qweight: int32 (K * bits / 32, N), codes packed along K, row ``k`` at bits
        ``bits * (k % (32 / bits))`` of word row ``k // (32 / bits)``.
      qzeros: int32 (G, N * bits / 32), zero points packed along N the same way.
      scales: float16 (G, N).
      g_idx: int (K,), the group of each row, or None for ``k // (K / G)``.
      bits: 2, 4 or 8.
      zero_offset: added to the stored zeros. 1 for the widespread format that
        stores ``zero - 1`` (AutoGPTQ before its v2 format), 0 otherwise.

    Returns:
      ``(weight, permutation)``. With act-order (``g_idx`` not sorted) the rows
      of K are reordered so that groups are contiguous: ``x @ W`` equals
      ``x[..., permutation] @ weight``. ``permutation`` is None when no
      reordering was needed.
    """
    codes = unpack_int32(qweight, bits, axis=0)
    zeros = unpack_int32(qzeros, bits, axis=1) + zero_offset
    scales = np.asarray(scales)
    k, n = codes.shape
    groups = scales.shape[0]
    if zeros.shape != (groups, n) or scales.shape != (groups, n):
        raise ValueError(f"qzeros/scales must describe ({groups}, {n}) groups, got "
                         f"{zeros.shape} and {scales.shape}")
    group_size = _group_size(k, groups)
    rows = k // groups
    contiguous = np.arange(k) // rows
    permutation = None
    if g_idx is not None:
        g_idx = np.asarray(g_idx).astype(np.int64)
        if g_idx.shape != (k,):
            raise ValueError(f"g_idx must have shape ({k},), got {g_idx.shape}")
        if not np.array_equal(g_idx, contiguous):
            permutation = np.argsort(g_idx, kind="stable")
            if not np.array_equal(g_idx[permutation], contiguous):
                raise ValueError("g_idx does not assign exactly K / G rows to every group")
            codes = codes[permutation]
    return _build(codes, zeros, scales, bits, group_size), permutation


def load_awq(qweight, qzeros, scales, *, bits: int = 4) -> QuantizedWeight:
    """An AWQ layer (AutoAWQ GEMM layout) as a QuantizedWeight.

    Args:
      qweight: int32 (K, N / 8), 8 int4 codes of consecutive columns per word
        in AWQ's interleaved order (0, 2, 4, 6, 1, 3, 5, 7).
      qzeros: int32 (G, N / 8), zero points packed the same way.
      scales: float16 (G, N).
    """
    if bits != 4:
        raise ValueError("AWQ checkpoints are 4-bit")
    codes = unpack_int32(qweight, bits, axis=1, order=AWQ_ORDER)
    zeros = unpack_int32(qzeros, bits, axis=1, order=AWQ_ORDER)
    scales = np.asarray(scales)
    if zeros.shape != scales.shape or scales.shape[1] != codes.shape[1]:
        raise ValueError(f"qzeros and scales must be (G, {codes.shape[1]}), got "
                         f"{zeros.shape} and {scales.shape}")
    return _build(codes, zeros, scales, bits, _group_size(codes.shape[0], scales.shape[0]))


def unpack_hqq_u8(packed, bits: int) -> np.ndarray:
    """HQQ's uint8 packing ("8bit_u8", "4bit_u8", "2bit_u8"): the rows are split
    into 8 / bits equal slices, slice j in the field at bits ``8 - bits*(j+1)``."""
    packed = np.asarray(packed).astype(np.uint8)
    slices = [(packed >> np.uint8(8 - bits * (j + 1))) & np.uint8((1 << bits) - 1)
              for j in range(8 // bits)]
    return np.concatenate(slices, axis=0).astype(np.int64)


def load_hqq(W_q, meta: dict) -> QuantizedWeight:  # noqa: N803  (HQQ's own name)
    """An HQQ layer (``HQQLinear``'s ``W_q`` and ``meta``) as a QuantizedWeight.

    ``meta`` needs: ``nbits`` (2, 4 or 8), ``group_size``, ``axis`` (only 1:
    groups of consecutive inputs; axis 0 groups strided elements, which this
    format cannot hold), ``shape`` ((N, K), torch's (out, in)), ``scale`` and
    ``zero`` ((N * K / group_size, 1)), and ``packing`` (e.g. "4bit_u8", or
    None for unpacked codes). ``dequantize(jnp.float32)`` equals HQQ's
    ``(W_q - zero) * scale`` evaluated in float32 bit for bit; HQQ in float16
    rounds ``W_q - zero`` first, so float16 results may differ by one ulp.
    """
    bits, group_size = int(meta["nbits"]), int(meta["group_size"])
    if int(meta.get("axis", 1)) != 1:
        raise ValueError("HQQ axis=0 groups strided weights; only axis=1 checkpoints import")
    n, k = (int(d) for d in meta["shape"])
    codes = np.asarray(W_q)
    if meta.get("packing"):
        codes = unpack_hqq_u8(codes, bits)
    rows = n * k // group_size
    codes = codes.reshape(rows, group_size)
    scale = np.asarray(meta["scale"], np.float32).reshape(rows)
    zero = np.asarray(meta["zero"], np.float32).reshape(rows)
    # Row r of the grouped tensor is column n = r // (K / g), group r % (K / g).
    groups = k // group_size
    codes = codes.reshape(n, k).T  # (K, N)
    to_grid = lambda a: a.reshape(n, groups).T  # (groups, N)  # noqa: E731
    return _build(codes, to_grid(zero), to_grid(scale), bits,
                  -1 if groups == 1 else group_size)


def load_bitnet(weight, weight_scale) -> QuantizedWeight:
    """A BitNet b1.58 layer (Hugging Face ``BitLinear`` layout) as a ternary QuantizedWeight.

    Args:
      weight: uint8 (ceil(N / 4), K): ternary values + 1 packed along the output
        dimension of torch's (out, in) weight, rows ``i*R .. (i+1)*R`` of the
        unpacked tensor in bits ``2i`` (R = rows of ``weight``).
      weight_scale: the layer's scalar; the weight is ``ternary / weight_scale``.

    Returns int2 symmetric codes (ternary + 2) with one float32 scale
    ``1 / weight_scale`` per column (group_size -1): ``dequantize(jnp.float32)``
    equals ``ternary / weight_scale`` in float32 bit for bit. Only the weight is
    imported: BitNet's int8 activation quantization is not applied by
    ``matmul`` (it multiplies bf16/fp16/f32 activations).
    """
    packed = np.asarray(weight).astype(np.uint8)
    ternary = np.concatenate([(packed >> np.uint8(2 * i)) & np.uint8(3) for i in range(4)],
                             axis=0).astype(np.int64) - 1
    if ternary.min() < -1 or ternary.max() > 1:
        raise ValueError("BitNet weight holds a field value 3: not a ternary checkpoint")
    n, k = ternary.shape  # 4 * rows outputs (a checkpoint pads N to a multiple of 4)
    scale = np.float32(1.0) / np.asarray(weight_scale, np.float32).reshape(())
    codes = (ternary + 2).T  # (K, N)
    check_weight_format(k, 2, -1, jnp.float32)
    return QuantizedWeight(
        codes=formats.pack_codes(jnp.asarray(codes, jnp.uint32), 2),
        scales=jnp.full((1, n), scale, jnp.float32), offsets=None,
        shape=(k, n), bits=2, group_size=-1, symmetric=True)
