"""An independent numpy decoder written from docs/formats.md, used as the reference.

It shares no code with jax_lowbit: if the packer, the C++ handlers or the CUDA
kernels drift from the written spec, comparisons against this fail.
"""

import numpy as np


def decode_codes(words: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words (K/P, N) -> unsigned codes (K, N), per docs/formats.md."""
    words = np.asarray(words, dtype=np.uint64)
    per_word = 32 // bits
    rows, n = words.shape
    codes = np.empty((rows * per_word, n), np.int64)
    for j in range(per_word):
        # Row 2i+h of a word sits at bit 16*h + i*bits.
        shift = 16 * (j % 2) + (j // 2) * bits
        codes[j::per_word] = (words >> np.uint64(shift)) & np.uint64((1 << bits) - 1)
    return codes


def dequantize(words, scales, offsets, bits: int, group_size: int) -> np.ndarray:
    """The (K, N) float64 weight: code * scale + offset, offset = -2^(bits-1)*scale if None."""
    codes = decode_codes(np.asarray(words), bits)
    k = codes.shape[0]
    rows = k if group_size == -1 else group_size
    scales = np.asarray(scales, np.float64)
    offsets = (-(2.0 ** (bits - 1)) * scales if offsets is None
               else np.asarray(offsets, np.float64))
    return codes * np.repeat(scales, rows, axis=0) + np.repeat(offsets, rows, axis=0)


def decode_sparse_codes(words: np.ndarray, metadata: np.ndarray):
    """2:4 sparse int4: words and metadata (K/16, N) -> (codes (K, N), kept (K, N) bool).

    Quad q keeps its codes in rows 2q, 2q + 1 of the compressed int4 matrix;
    nibble j of metadata[r, n] is quad 16 (r // 4) + 4 j + r % 4, with the kept
    rows i0 (bits 0-1) < i1 (bits 2-3), per docs/formats.md.
    """
    compressed = decode_codes(words, 4)
    meta = np.asarray(metadata, np.int64)
    rows, n = meta.shape
    codes = np.zeros((rows * 16, n), np.int64)
    kept = np.zeros((rows * 16, n), bool)
    cols = np.arange(n)
    for r in range(rows):
        for j in range(4):
            q = 16 * (r // 4) + 4 * j + r % 4
            nibble = (meta[r] >> (4 * j)) & 0xF
            i0, i1 = nibble & 3, nibble >> 2
            assert np.all(i0 < i1), "invalid metadata nibble"
            for which, row in enumerate((i0, i1)):
                codes[4 * q + row, cols] = compressed[2 * q + which]
                kept[4 * q + row, cols] = True
    return codes, kept


def dequantize_sparse(words, metadata, scales, offsets, group_size: int) -> np.ndarray:
    """The (K, N) float64 weight of a 2:4 sparse int4 weight: zeros at the pruned rows."""
    codes, kept = decode_sparse_codes(np.asarray(words), np.asarray(metadata))
    k = codes.shape[0]
    rows = k if group_size == -1 else group_size
    scales = np.asarray(scales, np.float64)
    offsets = -8.0 * scales if offsets is None else np.asarray(offsets, np.float64)
    w = codes * np.repeat(scales, rows, axis=0) + np.repeat(offsets, rows, axis=0)
    return np.where(kept, w, 0.0)


def dequantize_weight(qw) -> np.ndarray:
    """dequantize() of a QuantizedWeight's arrays."""
    offsets = None if qw.offsets is None else np.asarray(qw.offsets, np.float64)
    if qw.sparsity == "2:4":
        return dequantize_sparse(np.asarray(qw.codes), np.asarray(qw.metadata),
                                 np.asarray(qw.scales, np.float64), offsets, qw.group_size)
    return dequantize(np.asarray(qw.codes), np.asarray(qw.scales, np.float64), offsets, qw.bits,
                      qw.group_size)
