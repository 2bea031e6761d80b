"""SPMD partitioning: the lowering that lets XLA partition a primitive, and the
rules of the packed-weight primitives, matmul (act_bits None or 8) and
dequantize (int_matmul's are in int_partitioning.py).

An FFI custom call is opaque to XLA's partitioner: on sharded operands it
would all-gather them and run the whole product on every device. Each
platform lowering is therefore wrapped in ``custom_partitioning``, whose
rules give the partitioner (Shardy, or GSPMD) the per-device computation:

- x sharded on its leading (batch) dims: rows stay local.
- weight sharded on N (codes, scales, offsets, 2:4 metadata on their last
  axis): each device computes its columns; the output is N-sharded.
- weight sharded on K (codes and 2:4 metadata on the packed-row axis, scales
  and offsets on the group axis): each device multiplies its K slice, then a
  psum over those mesh axes adds the partial products (in the output dtype,
  as XLA does for its own sharded dots).

The codes' sharding decides: x, the scales and the metadata are resharded to
match it (x's K split like the weight's), never the other way round, so no
weight is ever gathered. A shard must hold whole groups and whole packed words
(2:4: whole blocks of metadata rows; ``split_misfit``). On meshes with
Explicit axes the result types carry the same shardings (``result_sharding``).

matmul with act_bits=8 (act_quant_matmul) has the same rules but for K: its
per-token scale is the absmax of a row of x over all of K, and the handlers
find it in the x they are given (none takes a scale from outside), so a K
split would change the result; it is an error (``act_quant_matmul_plan``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
from jax._src import dispatch
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec

from jax_lowbit import formats

if TYPE_CHECKING:
    from jax_lowbit.primitives import WeightFormat  # primitives.py imports this module

Axes = tuple  # the mesh axis names that split one array dimension, major first


def split_misfit(k: int, n: int, bits: int, group_size: int, k_shards: int,
                 n_shards: int, sparsity: str | None = None) -> str | None:
    """Why a (K, N) packed weight cannot be split into ``k_shards`` x ``n_shards``
    blocks that each hold whole packed words (2:4 sparse: whole blocks of
    metadata rows) and whole groups, or None if it can."""
    if sparsity:
        # Metadata rows 4s .. 4s+3 hold the quads of code word rows 4s .. 4s+3,
        # 64 rows of K (docs/formats.md): a shard must hold whole such blocks.
        blocks = k // formats.SPARSE_K_MULTIPLE
        if blocks % k_shards:
            return (f"K={k} has {blocks} blocks of {formats.SPARSE_K_MULTIPLE} rows (4 rows "
                    f"of {sparsity} sparse codes and the 4 metadata rows that locate them), "
                    f"which do not split evenly into {k_shards} shards (a block of metadata "
                    "rows would straddle two shards)")
    else:
        words = k // formats.codes_per_word(bits)
        if words % k_shards:
            return (f"K={k} packs into {words} words of {formats.codes_per_word(bits)} "
                    f"{bits}-bit codes, which do not split evenly into {k_shards} shards "
                    "(a packed word would straddle two shards)")
    groups = k // formats.group_rows(group_size, k)
    if group_size != -1 and groups % k_shards:
        return (f"K={k} has {groups} groups of {group_size} rows, which do not split evenly "
                f"into {k_shards} shards (a group would straddle two shards); shard K over "
                "fewer devices or quantize with a smaller group_size")
    if n % n_shards:
        return f"N={n} does not split evenly into {n_shards} shards"
    return None


# --- reading and writing shardings -------------------------------------------

def _spec_axes(spec, ndim: int) -> list[Axes]:
    spec = tuple(spec) + (None,) * (ndim - len(spec))
    return [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in spec]


def dim_axes(arg) -> list[Axes]:
    """The mesh axes splitting each dimension of a partitioner argument."""
    sharding = arg.sharding
    if sharding is None:
        return [()] * arg.ndim
    if not isinstance(sharding, NamedSharding):
        raise ValueError(
            "jax_lowbit: sharded operands need a NamedSharding over a Mesh (got "
            f"{type(sharding).__name__}); place them with jax.device_put(x, "
            "NamedSharding(mesh, spec)) or jax_lowbit.shard_weight")
    return _spec_axes(sharding.spec, arg.ndim)


def _entries(dims: list[Axes]) -> list:
    """PartitionSpec entries for the mesh axes of each dim."""
    return [None if not a else a[0] if len(a) == 1 else tuple(a) for a in dims]


def _named(mesh, dims: list[Axes]) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(*_entries(dims)))


def shard_count(mesh, axes: Axes) -> int:
    """Devices along ``axes`` of ``mesh``."""
    size = 1
    for name in axes:
        size *= mesh.shape[name]
    return size


def batch_axes(dims: list[Axes], taken: Axes) -> list[Axes]:
    """The mesh axes of an activation's leading dims (``dims`` without the last),
    less those the weight uses: an axis splits at most one dim of the output."""
    return [tuple(a for a in axes if a not in taken) for axes in dims[:-1]]


def batch_factors(rank: int) -> str:
    """Shardy factors of the leading dims of a rank-``rank`` activation."""
    return "".join(f"b{i} " for i in range(rank - 1))


def psum_over(y, axes: Axes):
    """Adds the partial products of the devices along ``axes`` (none: ``y``)."""
    return jax.lax.psum(y, axes) if axes else y


def explicit_sharding(aval) -> NamedSharding | None:
    """``aval``'s sharding if its mesh has Explicit axes (then it is part of the
    type), else None."""
    return aval.sharding if aval.sharding.mesh.explicit_axes else None


def transposed_product(product, cotangent, w, x_aval):
    """``product(cotangent, w)``, the (..., K) cotangent of matmul's x from the
    dequantized (K, N) weight ``w``, typed like x on Explicit mesh axes.

    It is computed where w lies and only the result is resharded to x's type:
    left to propagation, x's type would reach back and gather w.
    """
    sharding = explicit_sharding(x_aval)
    if sharding is None:
        return product(cotangent, w)
    k_axes, _ = _spec_axes(jax.typeof(w).sharding.spec, 2)
    cotangent_dims = _spec_axes(jax.typeof(cotangent).sharding.spec, cotangent.ndim)
    where_w_lies = PartitionSpec(*_entries(batch_axes(cotangent_dims, k_axes) + [k_axes]))

    def pinned(cotangent, w):
        return jax.lax.with_sharding_constraint(product(cotangent, w), where_w_lies)

    return jax.sharding.auto_axes(pinned, out_sharding=sharding)(cotangent, w)


def result_sharding(avals, dims_of) -> NamedSharding | None:
    """The sharding in a result type: ``dims_of(axes of each aval)`` on the avals'
    mesh. Only Explicit mesh axes appear in types, so under Auto axes (or no
    mesh) this is None, the default."""
    meshes = [a.sharding.mesh for a in avals if not a.sharding.mesh.empty]
    if not meshes:
        return None
    dims = dims_of(*(_spec_axes(a.sharding.spec, a.ndim) for a in avals))
    return _named(meshes[0], dims) if any(dims) else None


# --- the packed weight ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PackedSplit:
    """How the codes' sharding splits a packed weight: K over ``k``, N over ``n``."""

    k: Axes
    n: Axes
    local: WeightFormat  # the format of one device's block

    @classmethod
    def of(cls, fmt: WeightFormat, mesh, codes) -> "PackedSplit":
        k_axes, n_axes = dim_axes(codes)
        k_shards, n_shards = shard_count(mesh, k_axes), shard_count(mesh, n_axes)
        k, n = fmt.shape
        reason = split_misfit(k, n, fmt.bits, fmt.group_size, k_shards, n_shards,
                              fmt.sparsity)
        if reason:
            raise ValueError(f"jax_lowbit: cannot run on this weight sharding: {reason}")
        local = dataclasses.replace(fmt, shape=(k // k_shards, n // n_shards))
        return cls(k_axes, n_axes, local)

    def operand_dims(self, count: int) -> list[list[Axes]]:
        """Shardings of codes, scales[, offsets][, metadata]. A single group
        (group_size -1) is one scale row, which every K shard needs whole."""
        group_axes = () if self.local.group_size == -1 else self.k
        return _per_weight_operand(self.local, count, [self.k, self.n], [group_axes, self.n])


def _per_weight_operand(fmt: WeightFormat, count: int, packed, grouped) -> list:
    """``packed`` for the codes and the 2:4 metadata (whose rows follow the code
    words'), ``grouped`` for the scales and offsets: one per weight operand."""
    metadata = [packed] if fmt.sparsity else []
    return [packed] + [grouped] * (count - 1 - len(metadata)) + metadata


def _weight_rule(fmt: WeightFormat, count: int) -> str:
    return ", ".join(_per_weight_operand(fmt, count, "w n", "g n"))


def matmul_plan(impl, params: dict, mesh, arg_shapes):
    """(per-device function, result dims, operand dims) of matmul."""
    x, codes, *rest = arg_shapes
    split = PackedSplit.of(params["fmt"], mesh, codes)
    batch = batch_axes(dim_axes(x), split.k + split.n)

    def local_matmul(x, *weight):
        return psum_over(impl(x, *weight, fmt=split.local), split.k)

    return (local_matmul, batch + [split.n],
            [batch + [split.k]] + split.operand_dims(len(rest) + 1))


def matmul_rule(params: dict, operand_types) -> str:
    """Shardy rule of matmul. x's K and the weight's rows are separate factors:
    the plan, not propagation, decides how x's K follows the weight."""
    batch = batch_factors(len(operand_types[0].shape))
    weight = _weight_rule(params["fmt"], len(operand_types) - 1)
    return f"{batch}k, {weight} -> {batch}n"


def act_quant_matmul_plan(impl, params: dict, mesh, arg_shapes):
    """matmul's plan for act_quant_matmul, whose weight's K must be whole on every
    device: a device quantizes its rows of x with their absmax over the K it
    holds, so on a K slice the per-token scales, and the result, would differ."""
    k_axes = dim_axes(arg_shapes[1])[0]
    if k_axes:
        raise ValueError(
            "jax_lowbit: matmul with act_bits=8 needs the whole of K on each device to pick "
            "per-token scales (the absmax of each row of x over all of K), but the weight's "
            f"K is split over mesh axes {k_axes} (row-parallel); shard the weight "
            "column-parallel, or use act_bits=None for row-parallel layers")
    return matmul_plan(impl, params, mesh, arg_shapes)


def product_result_sharding(x, weight) -> NamedSharding | None:
    """The sharding in the result type of ``x (..., K) @ weight``, where
    ``weight`` is the codes (K / P, N) or an integer b (K, N): x's batch axes
    and the weight's N axes."""
    def dims(x_dims, weight_dims):
        k, n = weight_dims
        return batch_axes(x_dims, k + n) + [n]
    return result_sharding((x, weight), dims)


def dequantize_plan(impl, params: dict, mesh, arg_shapes):
    """(per-device function, result dims, operand dims) of dequantize."""
    split = PackedSplit.of(params["fmt"], mesh, arg_shapes[0])

    def local_dequantize(*weight):
        return impl(*weight, fmt=split.local, dtype=params["dtype"])

    return local_dequantize, [split.k, split.n], split.operand_dims(len(arg_shapes))


def dequantize_rule(params: dict, operand_types):
    """Shardy rule of dequantize: the result's K is the codes' rows times the rows
    of K in each (P codes per word; 2P for 2:4, two of every four rows kept),
    so it takes the codes' K sharding."""
    fmt = params["fmt"]
    k = fmt.shape[0]
    p = k // formats.packed_rows(k, fmt.bits, fmt.sparsity)
    return f"{_weight_rule(fmt, len(operand_types))} -> (w p) n", {"p": p}


def dequantize_result_sharding(codes) -> NamedSharding | None:
    """The sharding in dequantize's result type: the codes' (K, N) axes."""
    return result_sharding((codes,), lambda dims: dims)


# --- the lowering ---------------------------------------------------------------

def partitioned_lowering(primitive, impl, plan, rule):
    """A lowering of ``primitive`` to ``impl`` that XLA partitions with ``plan``.

    ``impl(*operands, **params)`` is a platform implementation;
    ``plan(impl, params, mesh, arg_shapes)`` gives the per-device function of
    the local blocks and the mesh axes of each result and operand dimension
    (the partitioner reshards operands to them); ``rule(params,
    operand_types)`` is the einsum-like Shardy rule (or (rule, factor sizes)).
    Single-device programs run ``impl`` unchanged.
    """
    # custom_partitioning builds Shardings from the physical devices while
    # lowering; JAX asks primitives that wrap it to say so (CHANGELOG, 0.4.24).
    dispatch.prim_requires_devices_during_lowering.add(primitive)

    @functools.partial(custom_partitioning, static_argnums=(0,))
    def call(params, *operands):
        return impl(*operands, **dict(params))

    def partition(params, mesh, arg_shapes, result_shape):
        local_fn, result_dims, operand_dims = plan(impl, dict(params), mesh, arg_shapes)
        return (mesh, local_fn, _named(mesh, result_dims),
                tuple(_named(mesh, dims) for dims in operand_dims))

    def infer_sharding(params, mesh, arg_shapes, result_shape):
        try:
            return _named(mesh, plan(impl, dict(params), mesh, arg_shapes)[1])
        except ValueError:  # GSPMD aborts on errors raised here; partition() raises them
            return NamedSharding(mesh, PartitionSpec())

    def sharding_rule(params, mesh, operand_types, result_types):
        return rule(dict(params), operand_types)

    call.def_partition(partition, infer_sharding_from_operands=infer_sharding,
                       sharding_rule=sharding_rule)

    def lower(*operands, **params):
        # The parameters travel as one hashable, ordered tuple of (name, value).
        return call(tuple(sorted(params.items())), *operands)

    return mlir.lower_fun(lower, multiple_results=False)


def register_partitioned_lowerings(primitive, plan, rule, **impls) -> None:
    """Registers, for each ``platform=impl`` of ``impls``, the lowering of
    ``primitive`` to ``impl`` partitioned with ``plan`` and ``rule``
    (``partitioned_lowering``), so sharded operands run where they lie."""
    for platform, impl in impls.items():
        mlir.register_lowering(primitive, partitioned_lowering(primitive, impl, plan, rule),
                               platform=platform)
