"""QuantizedWeight: a packed low-bit weight as a JAX pytree."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.export
import jax.numpy as jnp

from jax_lowbit import formats


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A (K, N) weight stored as packed low-bit codes with per-group scales.

    Arrays are pytree leaves; the format (shape, bits, group size, symmetry,
    sparsity) is static aux data, so a QuantizedWeight can be a ``jax.jit`` argument,
    live in a Flax module and be saved with any pytree checkpointer.

    Attributes:
      codes: uint32 (K / P, N), P = 32 // bits codes per word (docs/formats.md);
        (K / 16, N) for 2:4 sparse weights, which store two codes per 4 rows.
      scales: (groups, N) in bfloat16, float16 or float32.
      offsets: (groups, N) like ``scales`` for asymmetric weights, None for
        symmetric ones. A weight dequantizes as ``code * scale + offset``
        (symmetric: ``(code - 2^(bits-1)) * scale``).
      shape: the logical (K, N).
      bits: 2, 4 or 8.
      group_size: rows of K per scale (32, 64, 128, 256) or -1 for all of K.
      symmetric: whether the grid is signed with no offset.
      metadata: uint16 (K / 16, N), the rows of the kept codes of a 2:4 sparse
        weight; None for dense ones.
      sparsity: "2:4" for a 2:4 sparse weight (int4 only), None for dense ones.
      integer_group_scales: whether every column's float32 group scales are
        integer multiples 0..16 of one scale per column, max_g scale / 16
        (``quantize(..., integer_group_scales=True)``, docs/formats.md); W4A8
        (``act_bits=8``) then multiplies on int8 tensor cores across groups.
    """

    codes: Any
    scales: Any
    offsets: Any
    shape: tuple[int, int]
    bits: int
    group_size: int
    symmetric: bool
    metadata: Any = None
    sparsity: str | None = None
    integer_group_scales: bool = False

    def tree_flatten(self):
        return (self.codes, self.scales, self.offsets, self.metadata), (
            self.shape,
            self.bits,
            self.group_size,
            self.symmetric,
            self.sparsity,
            self.integer_group_scales,
        )

    @classmethod
    def tree_unflatten(cls, aux, children):
        # No checks here: JAX rebuilds pytrees with placeholder leaves too.
        codes, scales, offsets, metadata = children
        return cls(codes, scales, offsets, *aux[:4], metadata, *aux[4:])

    @property
    def groups(self) -> int:
        """Number of scale rows: K / group_size (1 for group_size -1)."""
        return self.shape[0] // formats.group_rows(self.group_size, self.shape[0])

    @property
    def dtype(self):
        """The dtype of the scales (and offsets)."""
        return self.scales.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the packed arrays."""
        leaves = [a for a in (self.codes, self.scales, self.offsets, self.metadata)
                  if a is not None]
        return sum(int(leaf.size) * jnp.dtype(leaf.dtype).itemsize for leaf in leaves)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The (K, N) weight in ``dtype`` (float32, bfloat16 or float16)."""
        from jax_lowbit.ops import dequantize

        return dequantize(self, dtype)

    def __repr__(self):
        kind = "symmetric" if self.symmetric else "asymmetric"
        if self.sparsity is not None:
            kind += f", sparsity={self.sparsity!r}"
        if self.integer_group_scales:
            kind += ", integer group scales"
        # Leaves may be placeholders (shapes, specs) in a tree_map'd copy.
        scales = (jnp.dtype(self.scales.dtype).name if hasattr(self.scales, "dtype")
                  else repr(self.scales))
        return (f"QuantizedWeight(shape={self.shape}, bits={self.bits}, "
                f"group_size={self.group_size}, {kind}, scales={scales})")


# Lets jax.export serialize functions that take or return a QuantizedWeight.
# Blobs written before sparsity (integer_group_scales) existed have four (five) entries.
jax.export.register_pytree_node_serialization(
    QuantizedWeight,
    serialized_name="jax_lowbit.QuantizedWeight",
    serialize_auxdata=lambda aux: json.dumps(aux).encode(),
    deserialize_auxdata=lambda data: (lambda s, b, g, sym, sparsity=None, integer=False: (
        tuple(s), b, g, sym, sparsity, integer))(*json.loads(data)),
)
