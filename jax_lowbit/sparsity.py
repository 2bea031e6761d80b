"""2:4 structured sparsity: pruning, and the kept values with their packed positions.

The layout is docs/formats.md's "2:4 sparse int4"; quantize(..., sparsity="2:4")
quantizes the kept values and packs their codes with the dense packer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_lowbit import formats
from jax_lowbit.validation import as_weight_matrix

QUAD = 4  # rows of K that share one 2:4 pattern
_QUADS_PER_METADATA = 4  # nibbles in one uint16 metadata entry


def _kept_rows(quads: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rows (i0 < i1) of the two largest magnitudes of each quad: (K/4, 4, N) -> 2 x (K/4, N).

    A stable sort on the negated magnitude puts the lower row first among equals.
    """
    order = jnp.argsort(-jnp.abs(quads), axis=1, stable=True)
    first, second = order[:, 0], order[:, 1]
    return jnp.minimum(first, second), jnp.maximum(first, second)


def prune_2_4(w) -> jax.Array:
    """Keeps the 2 largest magnitudes of every 4 consecutive rows of each column.

    Args:
      w: 2-D float array (K, N), K a multiple of 4.

    Returns:
      The pruned (K, N) array in w's dtype: in each column, every run of rows
      4q .. 4q+3 keeps its two largest values by magnitude (the lower row wins
      a tie) and has zeros in the other two. Traceable under jit.
    """
    w = as_weight_matrix(w, "prune_2_4")
    if w.shape[0] % QUAD != 0:
        raise ValueError(f"prune_2_4: K={w.shape[0]} must be a multiple of {QUAD}")
    return _prune(w)


@jax.jit  # one compilation per shape, not one per operation in eager calls
def _prune(w: jax.Array) -> jax.Array:
    k, n = w.shape
    quads = w.reshape(k // QUAD, QUAD, n)
    i0, i1 = _kept_rows(quads)
    rows = jnp.arange(QUAD)[None, :, None]
    kept = (rows == i0[:, None]) | (rows == i1[:, None])
    return jnp.where(kept, quads, jnp.zeros((), w.dtype)).reshape(k, n)


def _nibble_shifts() -> jax.Array:
    """The shift 4 j of nibble j of a metadata entry, as a (1, 4, 1, 1) [s, j, t, n]
    array from an iota: traced under custom_partitioning, which allows no captured
    constants (see formats._code_shifts)."""
    return 4 * lax.broadcasted_iota(jnp.uint16, (1, _QUADS_PER_METADATA, 1, 1), 1)


def pack_metadata(i0: jax.Array, i1: jax.Array) -> jax.Array:
    """Kept rows (K/4, N) of every quad -> uint16 metadata (K/16, N), docs/formats.md.

    Quad q = 16 s + 4 j + t has nibble i0 | i1 << 2 at bits 4j of entry 4s + t.
    """
    nibbles = (i0 | (i1 << 2)).astype(jnp.uint16)
    quads, n = nibbles.shape
    # [s, j, t, n]: quad 16 s + 4 j + t.
    blocks = nibbles.reshape(quads // 16, _QUADS_PER_METADATA, 4, n)
    # Nibbles never overlap, so a sum of shifted nibbles is their bitwise or.
    return jnp.sum(blocks << _nibble_shifts(), axis=1, dtype=jnp.uint16).reshape(quads // 4, n)


@jax.jit  # one compilation per shape, not one per operation in eager calls
def compress_2_4(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The kept values and their positions after prune_2_4.

    Args:
      w: (K, N) array, K a multiple of 64.

    Returns:
      (values, metadata): values (K/2, N) in w's dtype, rows 2q and 2q + 1
      holding quad q's kept values in row order; metadata (K/16, N) uint16
      as docs/formats.md packs the kept rows.
    """
    k, n = w.shape
    quads = w.reshape(k // QUAD, QUAD, n)
    i0, i1 = _kept_rows(quads)
    values = jnp.stack([jnp.take_along_axis(quads, i[:, None], axis=1)[:, 0] for i in (i0, i1)],
                       axis=1)
    return values.reshape(k // 2, n), pack_metadata(i0, i1)
