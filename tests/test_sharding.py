"""Sharded matmul (act_bits None or 8), dequantize and int_matmul on 8 emulated CPU
devices (conftest.py), with dense and 2:4 sparse weights.

Every pattern must match the float reference like the unsharded op does, and
the compiled HLO must gather no weight: the custom call sees only the local
blocks, and the only collective is the psum of a row-parallel product.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_lowbit

import spec_reference
from hlo import collectives, compiled_text, custom_call_operands
from meshes import cpu_mesh

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}


@pytest.fixture(scope="module")
def mesh():
    return cpu_mesh()


@pytest.fixture
def gspmd():
    """Runs a test under GSPMD instead of Shardy, JAX's default partitioner."""
    before = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", False)
    yield
    jax.config.update("jax_use_shardy_partitioner", before)


def _count(mesh, axes) -> int:
    """Devices along a PartitionSpec entry."""
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def _place(mesh, a, spec):
    return None if a is None else jax.device_put(a, NamedSharding(mesh, spec))


def _place_weight(mesh, qw, codes_spec, scales_spec):
    """``qw`` placed by hand: the 2:4 metadata like the codes, offsets like the scales."""
    return dataclasses.replace(
        qw, codes=_place(mesh, qw.codes, codes_spec), scales=_place(mesh, qw.scales, scales_spec),
        offsets=_place(mesh, qw.offsets, scales_spec),
        metadata=_place(mesh, qw.metadata, codes_spec))


def _check_close(y, x, qw, dtype, tolerance_factor=1.0):
    """Error of y relative to the size of its terms, |x| @ |w|, as in test_matmul."""
    w = spec_reference.dequantize_weight(qw)
    x64 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    scale = np.abs(x64) @ np.abs(w)
    error = np.abs(np.asarray(jnp.asarray(y, jnp.float32), np.float64) - x64 @ w)
    assert np.all(error <= tolerance_factor * TOLERANCE[dtype] * scale + 1e-6), np.max(
        error / (scale + 1e-6))


def _check_unsharded_result(mesh, y, fn, x, qw):
    """``y`` is ``fn(x, qw)`` of the unsharded operands bit for bit, on the same CPU."""
    with jax.default_device(mesh.devices.flat[0]):
        unsharded = fn(x, qw)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(unsharded, np.float32))


# x spec, weight (codes, scales) specs as (K axes, N axes), collectives expected.
PATTERNS = {
    "batch": (P("data"), (None, None), []),
    "column": (P("data"), (None, "model"), []),
    "row": (P("data"), ("model", None), ["all-reduce"]),
    "column over 8": (P(), (None, ("data", "model")), []),
    "row over 8": (P(), (("data", "model"), None), ["all-reduce"]),
    "row and column": (P(), ("data", "model"), ["all-reduce"]),
}
FORMATS = [  # bits, group_size, symmetric, x dtype, sparsity
    (4, 32, True, jnp.float32, None),
    (2, 64, False, jnp.bfloat16, None),
    (8, -1, False, jnp.float16, None),
    (4, 64, False, jnp.bfloat16, "2:4"),  # metadata split like the codes
]

# act_bits=8 quantizes each row of x with its absmax over all of K: on weights whose
# K is whole on every device it gives the unsharded result bit for bit; K splits are
# refused (docs/sharding.md).
_act_matmul = functools.partial(jax_lowbit.matmul, act_bits=8)
ACT_QUANT_K_SPLIT = "act_bits=8 needs the whole of K on each device"


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("bits,group_size,symmetric,dtype,sparsity", FORMATS)
def test_matmul_pattern(pattern, bits, group_size, symmetric, dtype, sparsity, mesh, rng):
    x_spec, (k_axes, n_axes), expected = PATTERNS[pattern]
    qw = jax_lowbit.quantize(rng.normal(size=(512, 64)).astype(np.float32), bits, group_size,
                             symmetric=symmetric, sparsity=sparsity)
    x = jnp.asarray(rng.normal(size=(2, 4, 512)), dtype)
    scale_k = None if group_size == -1 else k_axes
    weight = _place_weight(mesh, qw, P(k_axes, n_axes), P(scale_k, n_axes))
    xs = _place(mesh, x, x_spec)
    fn = jax.jit(jax_lowbit.matmul)
    y = fn(xs, weight)
    row = k_axes is not None
    _check_close(y, x, qw, dtype, tolerance_factor=2.0 if row else 1.0)
    if not row:  # columns and rows of the product are computed as unsharded
        _check_unsharded_result(mesh, y, jax_lowbit.matmul, x, qw)
    text = compiled_text(fn, xs, weight)
    assert collectives(text) == expected
    target = "jax_lowbit_sparse_matmul" if sparsity else "jax_lowbit_matmul"
    (operands,) = custom_call_operands(text, target)
    local = (qw.codes.shape[0] // _count(mesh, k_axes), 64 // _count(mesh, n_axes))
    assert operands[1] == local
    if sparsity:  # the handler takes the metadata after the codes: their rows go together
        assert operands[2] == local


@pytest.mark.parametrize("mode", ["column", "row"])
def test_gspmd(mode, gspmd, mesh, rng):
    qw = jax_lowbit.quantize(rng.normal(size=(256, 64)).astype(np.float32), 4, 64)
    x = _place(mesh, jnp.asarray(rng.normal(size=(8, 256)), jnp.float32), P("data"))
    weight = jax_lowbit.shard_weight(qw, mesh, "model", mode)
    fn = jax.jit(jax_lowbit.matmul)
    _check_close(fn(x, weight), x, qw, jnp.float32)
    assert collectives(compiled_text(fn, x, weight)) == (["all-reduce"] if mode == "row" else [])
    act_quant = jax.jit(_act_matmul)
    if mode == "row":
        with pytest.raises(Exception, match=ACT_QUANT_K_SPLIT):
            act_quant(x, weight)
    else:
        _check_unsharded_result(mesh, act_quant(x, weight), _act_matmul, np.asarray(x), qw)
        assert collectives(compiled_text(act_quant, x, weight)) == []


@pytest.mark.parametrize("pattern", ["batch", "column", "column over 8"])
def test_act_quant_pattern(pattern, mesh, rng):
    x_spec, (_, n_axes), expected = PATTERNS[pattern]
    qw = jax_lowbit.quantize(rng.normal(size=(512, 64)).astype(np.float32), 4, 64,
                             symmetric=False)
    x = jnp.asarray(rng.normal(size=(2, 4, 512)), jnp.bfloat16)
    weight = _place_weight(mesh, qw, P(None, n_axes), P(None, n_axes))
    xs = _place(mesh, x, x_spec)
    fn = jax.jit(_act_matmul)
    _check_unsharded_result(mesh, fn(xs, weight), _act_matmul, x, qw)
    text = compiled_text(fn, xs, weight)
    assert collectives(text) == expected
    (operands,) = custom_call_operands(text, "jax_lowbit_act_quant_matmul")
    assert operands[1] == (qw.codes.shape[0], 64 // _count(mesh, n_axes))


@pytest.mark.parametrize("pattern", ["row", "row and column"])
def test_act_quant_row_parallel_is_an_error(pattern, mesh, rng):
    x_spec, (k_axes, n_axes), _ = PATTERNS[pattern]
    qw = jax_lowbit.quantize(rng.normal(size=(512, 64)).astype(np.float32), 8, 64)
    weight = _place_weight(mesh, qw, P(k_axes, n_axes), P(k_axes, n_axes))
    x = _place(mesh, jnp.asarray(rng.normal(size=(8, 512)), jnp.float32), x_spec)
    with pytest.raises(Exception, match=ACT_QUANT_K_SPLIT):
        jax.jit(_act_matmul)(x, weight)


@pytest.mark.parametrize("mode", ["column", "row"])
def test_shard_weight_specs(mode, mesh, rng):
    for group_size, symmetric, sparsity in ((64, False, None), (-1, True, None),
                                            (64, True, "2:4")):
        qw = jax_lowbit.quantize(rng.normal(size=(512, 64)).astype(np.float32), 4, group_size,
                                 symmetric=symmetric, sparsity=sparsity)
        placed = jax_lowbit.shard_weight(qw, mesh, ("data", "model"), mode)
        split = ("data", "model")
        codes = P(None, split) if mode == "column" else P(split, None)
        scales = P(None, None) if mode == "row" and group_size == -1 else codes
        assert placed.codes.sharding.spec == codes
        assert placed.scales.sharding.spec == scales
        assert placed.offsets is None or placed.offsets.sharding.spec == scales
        assert placed.metadata is None or placed.metadata.sharding.spec == codes
        specs = jax_lowbit.weight_specs(qw, split, mode)
        assert (specs.codes, specs.scales, specs.offsets, specs.metadata) == (
            codes, scales, None if symmetric else scales, codes if sparsity else None)
        np.testing.assert_array_equal(np.asarray(placed.codes), np.asarray(qw.codes))


@pytest.mark.parametrize("sparsity", [None, "2:4"])
@pytest.mark.parametrize("mode", ["column", "row"])
def test_dequantize_and_grad(mode, sparsity, mesh, rng):
    qw = jax_lowbit.quantize(rng.normal(size=(256, 64)).astype(np.float32), 4, 32,
                             symmetric=False, sparsity=sparsity)
    weight = jax_lowbit.shard_weight(qw, mesh, "model", mode)
    dequantize = jax.jit(jax_lowbit.dequantize)
    w = dequantize(weight)
    np.testing.assert_array_equal(np.asarray(w), np.asarray(jax_lowbit.dequantize(qw)))
    assert w.sharding.spec == (P(None, "model") if mode == "column" else P("model"))
    assert collectives(compiled_text(dequantize, weight)) == []
    # The backward product dequantizes the sharded weight where it lies.
    x = _place(mesh, jnp.asarray(rng.normal(size=(8, 256)), jnp.float32), P("data"))
    grad = jax.jit(jax.grad(lambda x, q: jnp.sum(jax_lowbit.matmul(x, q) ** 2)))
    want = 2 * np.asarray(x, np.float64) @ spec_reference.dequantize_weight(qw)
    want = want @ spec_reference.dequantize_weight(qw).T
    np.testing.assert_allclose(np.asarray(grad(x, weight)), want, rtol=1e-4, atol=1e-3)
    assert "all-gather" not in collectives(compiled_text(grad, x, weight))


def test_stacked_weights_sharded_on_the_stack_axis(mesh, rng):
    # Expert parallelism: vmap over a stack of weights split across devices.
    qws = [jax_lowbit.quantize(rng.normal(size=(256, 64)).astype(np.float32), 4, 32)
           for _ in range(4)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *qws)
    x = jnp.asarray(rng.normal(size=(4, 8, 256)), jnp.float32)
    fn = jax.jit(jax.vmap(jax_lowbit.matmul))
    args = (_place(mesh, x, P("model", "data")),
            jax.tree.map(lambda a: _place(mesh, a, P("model")), stacked))
    y = fn(*args)
    for i, qw in enumerate(qws):
        _check_close(y[i], x[i], qw, jnp.float32)
    assert collectives(compiled_text(fn, *args)) == []


@pytest.mark.parametrize("pattern", ["batch", "column", "row"])
@pytest.mark.parametrize("scaled", [False, True])
def test_int_matmul_pattern(pattern, scaled, mesh, rng):
    a_spec, (k_axes, n_axes), expected = PATTERNS[pattern]
    a = jnp.asarray(rng.integers(-128, 128, size=(8, 3, 256)), jnp.int8)
    b = jnp.asarray(rng.integers(-128, 128, size=(256, 64)), jnp.int8)
    scales = ((jnp.asarray(rng.random((8, 3, 1)), jnp.float32),
               jnp.asarray(rng.random(64), jnp.float32)) if scaled else ())
    placed = (_place(mesh, a, a_spec), _place(mesh, b, P(k_axes, n_axes)))
    if scaled:
        placed += (_place(mesh, scales[0], a_spec), _place(mesh, scales[1], P(n_axes)))

    def fn(a, b, *scales):
        if not scales:
            return jax_lowbit.int_matmul(a, b)
        return jax_lowbit.int_matmul(a, b, a_scale=scales[0], b_scale=scales[1],
                                     out_dtype=jnp.float32)

    fn = jax.jit(fn)
    # The int32 sums are exact, split or not.
    np.testing.assert_array_equal(np.asarray(fn(*placed)), np.asarray(fn(a, b, *scales)))
    assert collectives(compiled_text(fn, *placed)) == expected


def test_explicit_mesh_types_and_mlp(rng):
    mesh = cpu_mesh(AxisType.Explicit)
    up = jax_lowbit.quantize(rng.normal(size=(256, 512)).astype(np.float32), 4, 64)
    down = jax_lowbit.quantize(rng.normal(size=(512, 256)).astype(np.float32), 4, 64)
    x = jnp.asarray(rng.normal(size=(8, 256)), jnp.float32)
    hidden_types = []

    def mlp(x, up, down):
        h = jax_lowbit.matmul(x, up)
        hidden_types.append(jax.typeof(h))
        return jax_lowbit.matmul(jax.nn.relu(h), down)

    fn = jax.jit(mlp)
    args = (_place(mesh, x, P("data")), jax_lowbit.shard_weight(up, mesh, "model", "column"),
            jax_lowbit.shard_weight(down, mesh, "model", "row"))
    y = fn(*args)
    # The hidden activations' type is split like the up projection's columns.
    assert hidden_types[0].sharding.spec == P("data", "model")
    assert jax.typeof(y).sharding.spec == P("data", None)
    u, d = spec_reference.dequantize_weight(up), spec_reference.dequantize_weight(down)
    h = np.asarray(x, np.float64) @ u
    np.testing.assert_allclose(np.asarray(y), np.maximum(h, 0) @ d, rtol=1e-4, atol=1e-3)
    assert collectives(compiled_text(fn, *args)) == ["all-reduce"]
    # The backward products run where the weights lie too; x's gradient has x's type.
    grad = jax.jit(jax.grad(lambda *args: jnp.sum(mlp(*args) ** 2)))
    g = grad(*args)
    assert jax.typeof(g).sharding.spec == P("data", None)
    want = ((2 * np.maximum(h, 0) @ d) @ d.T * (h > 0)) @ u.T
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert "all-gather" not in collectives(compiled_text(grad, *args))


def test_partial_sums(mesh, rng):
    for group_size, sparsity in ((64, None), (-1, None), (64, "2:4")):
        qw = jax_lowbit.quantize(rng.normal(size=(256, 64)).astype(np.float32), 4,
                                 group_size, symmetric=False, sparsity=sparsity)
        x = jnp.asarray(rng.normal(size=(8, 256)), jnp.float32)
        parts = np.asarray(jax_lowbit.matmul_partial_sums(x, qw, 4))
        assert parts.shape == (4, 8, 64)
        x64, w = np.asarray(x, np.float64), spec_reference.dequantize_weight(qw)
        for i in range(4):  # block i is the product of the i-th quarter of K
            quarter = slice(64 * i, 64 * (i + 1))
            np.testing.assert_allclose(parts[i], x64[:, quarter] @ w[quarter], rtol=1e-5,
                                       atol=1e-4)
        # Row-parallel over 4 devices: each computes its own block, nothing is reduced.
        fn = jax.jit(lambda x, q: jax_lowbit.matmul_partial_sums(x, q, 4))
        args = (_place(mesh, x, P("data")), jax_lowbit.shard_weight(qw, mesh, "model", "row"))
        sharded = fn(*args)
        np.testing.assert_allclose(np.asarray(sharded), parts, rtol=1e-6, atol=1e-6)
        assert sharded.sharding.spec == P("model", "data")
        assert collectives(compiled_text(fn, *args)) == []


def test_group_straddling_shards_is_an_error(mesh, rng):
    qw = jax_lowbit.quantize(rng.normal(size=(512, 64)).astype(np.float32), 4, 128)
    # 4 groups of 128 rows cannot be split 8 ways.
    with pytest.raises(ValueError, match="group would straddle two shards"):
        jax_lowbit.shard_weight(qw, mesh, ("data", "model"), "row")
    with pytest.raises(ValueError, match="group would straddle two shards"):
        jax_lowbit.matmul_partial_sums(jnp.ones((2, 512)), qw, 8)
    # Placed by hand, codes split 8 ways: the partitioner refuses, naming the cause.
    weight = _place_weight(mesh, qw, P(("data", "model")), P())
    with pytest.raises(Exception, match="group would straddle two shards"):
        jax.jit(jax_lowbit.matmul)(jnp.ones((2, 512)), weight)


def test_sparse_metadata_block_straddling_shards_is_an_error(mesh, rng):
    # K=128: 8 code word rows split 4 ways, but only 2 blocks of 4 metadata rows.
    qw = jax_lowbit.quantize(rng.normal(size=(128, 64)).astype(np.float32), 4, 32,
                             sparsity="2:4")
    message = "block of metadata rows would straddle two shards"
    with pytest.raises(ValueError, match=message):
        jax_lowbit.shard_weight(qw, mesh, "model", "row")
    with pytest.raises(ValueError, match=message):
        jax_lowbit.matmul_partial_sums(jnp.ones((2, 128)), qw, 4)
    weight = _place_weight(mesh, qw, P("model"), P("model"))
    with pytest.raises(Exception, match=message):
        jax.jit(jax_lowbit.matmul)(jnp.ones((2, 128)), weight)
    # Split two ways, each shard holds one whole block.
    x = jnp.asarray(rng.normal(size=(2, 128)), jnp.float32)
    y = jax.jit(jax_lowbit.matmul)(x, jax_lowbit.shard_weight(qw, mesh, "data", "row"))
    _check_close(y, x, qw, jnp.float32, tolerance_factor=2.0)


def test_bad_sharding_arguments(mesh, rng):
    qw = jax_lowbit.quantize(rng.normal(size=(256, 64)).astype(np.float32), 4, 64)
    with pytest.raises(ValueError, match="mode must be one of"):
        jax_lowbit.shard_weight(qw, mesh, "model", "diagonal")
    with pytest.raises(ValueError, match="not among the mesh axes"):
        jax_lowbit.shard_weight(qw, mesh, "tensor", "row")
    narrow = jax_lowbit.QuantizedWeight(qw.codes[:, :60], qw.scales[:, :60], None, (256, 60),
                                        4, 64, True)
    with pytest.raises(ValueError, match="N=60 does not split evenly into 8 shards"):
        jax_lowbit.shard_weight(narrow, mesh, ("data", "model"), "column")
    with pytest.raises(TypeError, match="QuantizedWeight"):
        jax_lowbit.shard_weight(qw.codes, mesh, "model", "row")
    with pytest.raises(ValueError, match="k_blocks must be a positive int"):
        jax_lowbit.matmul_partial_sums(jnp.ones((2, 256)), qw, 0)
    with pytest.raises(ValueError, match="last dimension must equal"):
        jax_lowbit.matmul_partial_sums(jnp.ones((2, 128)), qw, 2)
