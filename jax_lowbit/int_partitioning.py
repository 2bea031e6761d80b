"""SPMD partitioning of int_matmul (partitioning.py's rules, for an integer b).

b sharded on N: each device computes its columns (b_scale split like them).
b sharded on K: each device multiplies its K slice and the int32 partial
products are added with a psum before the float epilogue, so the sum stays
exact. a's leading dims (and a_scale's) stay as they are sharded.
"""

from __future__ import annotations

import jax.numpy as jnp

from jax_lowbit.int_primitives import IntEpilogue
from jax_lowbit.partitioning import batch_axes, batch_factors, dim_axes, psum_over, shard_count

_EXACT = IntEpilogue(False, False, jnp.dtype(jnp.int32))


def plan(impl, params: dict, mesh, arg_shapes):
    """(per-device function, result dims, operand dims) of int_matmul."""
    epilogue = params["epilogue"]
    a, b, *_ = arg_shapes
    k_axes, n_axes = dim_axes(b)
    for name, size, axes in zip("KN", b.shape, (k_axes, n_axes)):
        if size % shard_count(mesh, axes):
            raise ValueError(f"jax_lowbit: cannot run int_matmul on this sharding of b: "
                             f"{name}={size} does not split evenly into "
                             f"{shard_count(mesh, axes)} shards")
    batch = batch_axes(dim_axes(a), k_axes + n_axes)
    scale_dims = ([batch + [()]] if epilogue.a_scaled else []) + (
        [[n_axes]] if epilogue.b_scaled else [])

    def local_int_matmul(a, b, *scales):
        acc = psum_over(impl(a, b, epilogue=_EXACT), k_axes)
        return epilogue.apply(acc, scales)

    return local_int_matmul, batch + [n_axes], [batch + [k_axes], [k_axes, n_axes]] + scale_dims


def rule(params: dict, operand_types) -> str:
    """Shardy rule: a (..., K) and b (K, N) share K; a_scale's last dim has size 1."""
    epilogue = params["epilogue"]
    batch = batch_factors(len(operand_types[0].shape))
    scales = ([f"{batch}one"] if epilogue.a_scaled else []) + (["n"] if epilogue.b_scaled else [])
    return ", ".join([f"{batch}k", "k n"] + scales) + f" -> {batch}n"

