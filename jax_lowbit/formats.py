"""The packed weight format (docs/formats.md): constants and the code packer.

One source of truth: the C++ handlers decode with ``cc/format.h``, which
follows the same rules; ``tests/spec_reference.py`` decodes from the written
spec and the tests check that all of them agree.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

SUPPORTED_BITS = (2, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256, -1)
SCALE_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
ACTIVATION_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)

# 2:4 sparse int4 (docs/formats.md): two kept codes per quad of 4 rows of K.
SPARSITY_PATTERNS = ("2:4",)
SPARSE_BITS = 4
# One block of metadata rows covers 4 code word rows of 16 rows of K each.
SPARSE_K_MULTIPLE = 64


def codes_per_word(bits: int) -> int:
    """Codes in one uint32 word: 16 for int2, 8 for int4, 4 for int8."""
    return 32 // bits


def packed_rows(k: int, bits: int, sparsity=None) -> int:
    """Rows of the ``codes`` array (and of ``metadata`` for 2:4): K / P, or K / (2P)
    when only two codes of every four rows are stored."""
    rows = k // codes_per_word(bits)
    return rows // 2 if sparsity else rows


def code_shift(j, bits: int):
    """Bit offset of code ``j`` (row ``w*P + j``) inside its word (an int, or
    an integer array of them elementwise).

    Rows 2i and 2i+1 sit at offset i*bits of the low and the high 16-bit half,
    so a kernel gets a pair of codes in the two 16-bit lanes with one shift
    and one mask (the bf16x2/half2 magic-number conversion).
    """
    return (j % 2) * 16 + (j // 2) * bits


def group_rows(group_size: int, k: int) -> int:
    """Rows of K that share one scale: ``group_size``, or K for -1."""
    return k if group_size == -1 else group_size


def _code_shifts(bits: int) -> jnp.ndarray:
    """code_shift(j, bits) for every code j of a word, as a (1, P, 1) uint32 array.

    Built from an iota rather than a numpy array: the lowerings trace these
    functions under custom_partitioning, which allows no captured constants.
    """
    return code_shift(lax.broadcasted_iota(jnp.uint32, (1, codes_per_word(bits), 1), 1), bits)


def symmetric_offset(bits: int) -> int:
    """Symmetric codes are stored offset-binary: w = (code - 2^(bits-1)) * scale."""
    return 1 << (bits - 1)


def pack_codes(codes: jnp.ndarray, bits: int) -> jnp.ndarray:
    """Packs unsigned codes (K, N) into uint32 words (K / P, N)."""
    k, n = codes.shape
    per_word = codes_per_word(bits)
    grouped = codes.astype(jnp.uint32).reshape(k // per_word, per_word, n)
    # Fields never overlap, so a sum of shifted codes is their bitwise or.
    return jnp.sum(grouped << _code_shifts(bits), axis=1, dtype=jnp.uint32)


def unpack_codes(words: jnp.ndarray, bits: int) -> jnp.ndarray:
    """The unsigned codes (K, N), uint32, of packed words (K / P, N): pack_codes inverted."""
    rows, n = words.shape
    fields = (words[:, None, :] >> _code_shifts(bits)) & np.uint32((1 << bits) - 1)
    return fields.reshape(rows * codes_per_word(bits), n)
