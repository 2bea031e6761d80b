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


def dequantize_weight(qw) -> np.ndarray:
    """dequantize() of a QuantizedWeight's arrays."""
    return dequantize(np.asarray(qw.codes), np.asarray(qw.scales, np.float64),
                      None if qw.offsets is None else np.asarray(qw.offsets, np.float64),
                      qw.bits, qw.group_size)
