"""Sharding annotations of quantized layers, carried over from the float layers.

``nnx.with_partitioning`` (or ``kernel_metadata={"out_sharding": ...}``) puts
an ``out_sharding``, one mesh or logical axis name per dim, on a Variable;
``nnx.get_partition_spec`` reads it back and Flax places the value with it
under a mesh. A quantized layer gives its (K, N) kernel names to the packed
arrays, whose dims are the kernel's: codes and 2:4 metadata (packed rows, N)
and scales (groups, N) split along K where the kernel does
(jax_lowbit.partitioning runs either).
"""

from __future__ import annotations

from jax.sharding import NamedSharding, PartitionSpec

SHARDING_KEYS = ("out_sharding", "sharding_rules", "mesh")


def sharding_metadata(variable) -> dict:
    """The sharding annotations of an nnx Variable (empty for None or none set)."""
    if variable is None:
        return {}
    metadata = variable.get_metadata()
    return {key: metadata[key] for key in SHARDING_KEYS if metadata.get(key) is not None}


def _map_out_sharding(metadata, ndim: int, mapping) -> dict:
    """``metadata`` with ``mapping`` applied to its out_sharding's per-dim names."""
    sharding = metadata.get("out_sharding")
    if sharding is None:
        return dict(metadata)
    spec = sharding.spec if isinstance(sharding, NamedSharding) else sharding
    names = mapping(tuple(spec) + (None,) * (ndim - len(spec)))
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*names))
    else:
        sharding = PartitionSpec(*names) if isinstance(sharding, PartitionSpec) else names
    return {**metadata, "out_sharding": sharding}


def _merged(names: tuple):
    """The name of dims merged row-major into one: the major dim's when the others
    are unsplit (a split minor dim has no equivalent on the merged dim)."""
    return names[0] if all(name is None for name in names[1:]) else None


def kernel_2d(metadata, ndim: int) -> dict:
    """Kernel (K, *outputs) annotations for the (K, N) matrix it is reshaped to."""
    return _map_out_sharding(metadata, ndim, lambda names: (names[0], _merged(names[1:])))


def bias_1d(metadata, ndim: int) -> dict:
    """Bias (*outputs) annotations for the (N,) vector it is reshaped to."""
    return _map_out_sharding(metadata, ndim, lambda names: (_merged(names),))


def single_group_names(names: tuple) -> tuple:
    """Scale (1, N) names for a kernel's (K, N) names, group_size -1: one row,
    which no K split cuts."""
    return (None, names[1])


def single_group(metadata) -> dict:
    """Scale (1, N) annotations for group_size -1 (``single_group_names``)."""
    return _map_out_sharding(metadata, 2, single_group_names)


def dense_metadata(module) -> dict:
    """``kernel_metadata`` and ``bias_metadata`` for the QuantLinear that replaces
    a dense layer (``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``)."""
    kernel = module.kernel
    metadata = {"kernel_metadata": kernel_2d(sharding_metadata(kernel), kernel[...].ndim)}
    if module.bias is not None:
        metadata["bias_metadata"] = bias_1d(sharding_metadata(module.bias), module.bias[...].ndim)
    return metadata
