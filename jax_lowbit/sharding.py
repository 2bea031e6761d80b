"""Tensor parallelism with quantized weights: placing a QuantizedWeight on a
mesh, and the row-parallel product left unreduced.

Column-parallel splits N: codes, scales, offsets and 2:4 metadata all on
their last axis. Row-parallel splits K: codes and metadata on the packed-row
axis, scales and offsets on the group axis, so every device holds whole
groups and whole words (2:4: whole blocks of metadata rows).
``jax_lowbit.matmul`` runs on such weights without gathering them
(partitioning.py); docs/sharding.md has the rules.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jax_lowbit.ops import matmul
from jax_lowbit.partitioning import shard_count, split_misfit
from jax_lowbit.quantized_weight import QuantizedWeight

MODES = ("column", "row")


def _axes(axis) -> tuple:
    return (axis,) if isinstance(axis, str) else tuple(axis)


def _check_weight(qw, caller: str) -> None:
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"{caller}: expected a QuantizedWeight, got {type(qw).__name__}")


def weight_specs(qw: QuantizedWeight, axis, mode: str) -> QuantizedWeight:
    """The PartitionSpecs of ``qw``'s arrays for column- or row-parallel use.

    Args:
      qw: the weight (only its format is read).
      axis: a mesh axis name, or a tuple of names, that splits the weight.
      mode: "column" splits N (outputs come out N-sharded); "row" splits K
        (each device multiplies its K slice; the partial products are summed).

    Returns:
      A QuantizedWeight whose leaves are PartitionSpecs (None for absent
      offsets and metadata; a 2:4 weight's metadata is split like its codes,
      whose rows it locates): usable as ``jax.jit`` in/out shardings with a
      mesh, or to build NamedShardings.
    """
    _check_weight(qw, "weight_specs")
    if mode not in MODES:
        raise ValueError(f"weight_specs: mode must be one of {MODES}, got {mode!r}")
    entry = axis if isinstance(axis, str) else tuple(axis)
    if mode == "column":
        codes = scales = PartitionSpec(None, entry)
    else:
        codes = PartitionSpec(entry, None)
        # A single group (group_size -1) is one scale row that every K shard needs.
        scales = PartitionSpec(None, None) if qw.group_size == -1 else codes
    return dataclasses.replace(qw, codes=codes, scales=scales,
                               offsets=None if qw.offsets is None else scales,
                               metadata=None if qw.metadata is None else codes)


def shard_weight(qw: QuantizedWeight, mesh, axis, mode: str) -> QuantizedWeight:
    """``qw`` placed on ``mesh`` with ``weight_specs(qw, axis, mode)``.

    Raises ValueError if the split would cut a group, a packed word or a 2:4
    block of metadata rows (row) or split N unevenly (column), naming the sizes
    involved.
    """
    _check_weight(qw, "shard_weight")
    unknown = [a for a in _axes(axis) if a not in mesh.axis_names]
    if unknown:
        raise ValueError(f"shard_weight: {unknown} not among the mesh axes {mesh.axis_names}")
    specs = weight_specs(qw, axis, mode)
    shards = shard_count(mesh, _axes(axis))
    k_shards, n_shards = (1, shards) if mode == "column" else (shards, 1)
    reason = split_misfit(*qw.shape, qw.bits, qw.group_size, k_shards, n_shards, qw.sparsity)
    if reason:
        raise ValueError(f"shard_weight: cannot split this weight {mode}-parallel over "
                         f"{shards} devices: {reason}")
    return jax.tree.map(lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec)), qw, specs)


def matmul_partial_sums(x, qw: QuantizedWeight, k_blocks: int) -> jax.Array:
    """The products of ``k_blocks`` equal slices of K, unreduced: for a row-parallel
    weight, the per-device partial products without the psum.

    ``result[i] = x[..., K_i] @ W[K_i]`` for the i-th of ``k_blocks`` slices of
    K, so ``result.sum(0) == matmul(x, qw)`` up to rounding. With K sharded
    over ``k_blocks`` devices (``shard_weight(..., mode="row")``), block i
    is computed where slice i lies and the result comes out sharded on its
    first axis, leaving the reduction to the caller: e.g. a sum under a
    sharding constraint on another axis becomes a reduce-scatter.

    Args:
      x: (..., K) array, as for ``matmul``.
      qw: a QuantizedWeight of shape (K, N).
      k_blocks: how many slices; each must hold whole groups and packed words
        (2:4: whole blocks of metadata rows).

    Returns:
      (k_blocks, ..., N) array of x's dtype. Differentiable with respect to x
      and batches under ``jax.vmap`` like ``matmul``. Each block is
      dequantized and multiplied by XLA's dot (on CUDA, not the fused small-M
      kernel).
    """
    _check_weight(qw, "matmul_partial_sums")
    k, n = qw.shape
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"matmul_partial_sums: x has shape {tuple(x.shape)}, its last "
                         f"dimension must equal the weight's K={k}")
    if isinstance(k_blocks, bool) or not isinstance(k_blocks, int) or k_blocks < 1:
        raise ValueError(f"matmul_partial_sums: k_blocks must be a positive int, got {k_blocks!r}")
    reason = split_misfit(k, n, qw.bits, qw.group_size, k_blocks, 1, qw.sparsity)
    if reason:
        raise ValueError(f"matmul_partial_sums: cannot cut K into {k_blocks} blocks: {reason}")
    x_blocks = jnp.moveaxis(x.reshape(x.shape[:-1] + (k_blocks, k // k_blocks)), -2, 0)
    per_block = qw.group_size != -1  # else one scale row, shared by all blocks

    def blocks(a, split):
        return a.reshape(k_blocks, -1, n) if split and a is not None else a

    block_weight = dataclasses.replace(
        qw, codes=blocks(qw.codes, True), scales=blocks(qw.scales, per_block),
        offsets=blocks(qw.offsets, per_block), metadata=blocks(qw.metadata, True),
        shape=(k // k_blocks, n))
    scale_axis = 0 if per_block else None
    in_axes = dataclasses.replace(
        block_weight, codes=0, scales=scale_axis,
        offsets=None if qw.offsets is None else scale_axis,
        metadata=None if qw.metadata is None else 0)
    return jax.vmap(matmul, in_axes=(0, in_axes))(x_blocks, block_weight)
