"""2:4 sparse int4 weights: pruning, the packed format, matmul on CPU (and on the GPU
with the `gpu` marker), transforms and errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_lowbit
from jax_lowbit import QuantizedWeight, _extension, formats, lowering, sparsity
from jax_lowbit.sparsity import pack_metadata

import spec_reference
from kernel_checks import assert_kernel_dequantize, assert_kernel_matmul, cuda_targets

# The six nibbles of a valid 2:4 pattern: kept rows (i0, i1), i0 < i1.
VALID_PAIRS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


# Under jit: one compilation per format instead of one per operation of an eager
# call, which would dominate the CPU test time (the eager path is tested below).
_quantize = jax.jit(jax_lowbit.quantize,
                    static_argnames=("bits", "group_size", "symmetric", "scale_dtype", "sparsity"))


def _sparse(rng, k, n, group_size=128, symmetric=True, scale_dtype=jnp.bfloat16):
    w = rng.normal(size=(k, n)).astype(np.float32)
    return _quantize(w, bits=4, group_size=group_size, symmetric=symmetric,
                     scale_dtype=scale_dtype, sparsity="2:4")


@functools.cache
def _cached_sparse(k, n, group_size=128, symmetric=True):
    """A fixed weight per format, shared by tests that need no fresh one."""
    return _sparse(np.random.default_rng(k * n + group_size), k, n, group_size, symmetric)


def _quads(a):
    k, n = a.shape
    return np.asarray(a).reshape(k // 4, 4, n)


# --- pruning -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_prune_keeps_two_largest_of_every_four(dtype, rng):
    w = jnp.asarray(rng.normal(size=(64, 24)), dtype)
    pruned = jax_lowbit.prune_2_4(w)
    assert pruned.dtype == w.dtype and pruned.shape == w.shape
    quads = _quads(np.asarray(pruned, np.float32))
    original = _quads(np.asarray(w, np.float32))
    kept = quads != 0
    assert np.all(kept.sum(axis=1) <= 2)  # every 4 rows have at least 2 zeros
    np.testing.assert_array_equal(quads[kept], original[kept])  # kept values are unchanged
    # Every kept magnitude is at least every dropped one of its quad.
    smallest_kept = np.where(kept, np.abs(original), np.inf).min(axis=1)
    largest_dropped = np.where(kept, -np.inf, np.abs(original)).max(axis=1)
    assert np.all(smallest_kept >= largest_dropped)
    np.testing.assert_array_equal(np.asarray(jax.jit(jax_lowbit.prune_2_4)(w)),
                                  np.asarray(pruned))


def test_prune_ties_keep_the_lower_rows():
    w = np.array([[1.0], [-1.0], [1.0], [0.5], [0.0], [0.0], [0.0], [2.0]], np.float32)
    pruned = np.asarray(jax_lowbit.prune_2_4(w))[:, 0]
    np.testing.assert_array_equal(pruned, [1.0, -1.0, 0, 0, 0.0, 0, 0, 2.0])


@pytest.mark.parametrize("shape", [(6, 4), (8,), (2, 8, 4)])
def test_prune_bad_shapes(shape):
    with pytest.raises(ValueError, match="multiple of 4|2-D"):
        jax_lowbit.prune_2_4(np.ones(shape, np.float32))


def test_prune_needs_floats():
    with pytest.raises(TypeError, match="float"):
        jax_lowbit.prune_2_4(np.ones((8, 4), np.int32))


# --- the packed format -------------------------------------------------------------

def test_golden_words():
    # docs/formats.md: quads 0-3 keep codes (1, 9), (2, 10), (3, 11), (4, 12).
    compressed = np.array([1, 9, 2, 10, 3, 11, 4, 12], np.uint32)[:, None]
    assert int(formats.pack_codes(jnp.asarray(compressed), 4)[0, 0]) == 0xCBA94321
    # 16 quads keep rows (0, 2), quad 5 keeps (1, 3).
    i0 = np.zeros((16, 1), np.int32)
    i1 = np.full((16, 1), 2, np.int32)
    i0[5], i1[5] = 1, 3
    metadata = np.asarray(pack_metadata(jnp.asarray(i0), jnp.asarray(i1)))
    assert metadata.dtype == np.uint16
    assert [hex(v) for v in metadata[:, 0]] == ["0x8888", "0x88d8", "0x8888", "0x8888"]
    codes, kept = spec_reference.decode_sparse_codes(
        np.zeros((4, 1), np.uint32), metadata)
    assert kept[:, 0].reshape(16, 4)[5].tolist() == [False, True, False, True]
    assert kept.sum() == 32


@pytest.mark.parametrize("symmetric, group_size, quantize", [
    (True, 32, jax_lowbit.quantize), (False, 128, _quantize), (False, -1, _quantize)])
def test_quantize_packs_the_pruned_weight(symmetric, group_size, quantize, rng):
    w = (rng.normal(size=(256, 40)) * 0.05).astype(np.float32)
    qw = quantize(w, bits=4, group_size=group_size, symmetric=symmetric, sparsity="2:4")
    assert qw.sparsity == "2:4" and qw.bits == 4 and qw.shape == (256, 40)
    assert qw.codes.shape == (16, 40) and qw.codes.dtype == jnp.uint32
    assert qw.metadata.shape == (16, 40) and qw.metadata.dtype == jnp.uint16
    deq = spec_reference.dequantize_weight(qw)
    _, kept = spec_reference.decode_sparse_codes(np.asarray(qw.codes), np.asarray(qw.metadata))
    pruned = np.asarray(jax_lowbit.prune_2_4(w))
    # The stored rows are the ones prune_2_4 keeps (a kept value may round to 0).
    np.testing.assert_array_equal(kept, pruned != 0)
    assert np.all(deq[~kept] == 0)
    # Kept values are within half a step of the pruned weight; scales fit the kept values.
    rows = 256 if group_size == -1 else group_size
    step = np.repeat(np.asarray(qw.scales, np.float64), rows, axis=0)
    assert np.all(np.abs(deq - pruned) <= 0.5 * step * (1 + 1e-5) + 1e-7)
    # The C++ handler decodes what the spec decodes.
    np.testing.assert_allclose(np.asarray(qw.dequantize()), deq, rtol=1e-6, atol=1e-7)


def test_already_2_4_weight_keeps_its_nonzeros(rng):
    w = np.array(jax_lowbit.prune_2_4(rng.normal(size=(128, 16)).astype(np.float32)))
    w[rng.random(w.shape) < 0.2] = 0.0  # some quads with fewer than 2 nonzeros
    qw = _quantize(w, bits=4, group_size=64, symmetric=False, sparsity="2:4")
    _, kept = spec_reference.decode_sparse_codes(np.asarray(qw.codes), np.asarray(qw.metadata))
    assert np.all(kept[w != 0])


@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_handler_decodes_random_words_as_spec(group_size, symmetric, scale_dtype, rng):
    """Random codes, every valid nibble at random, random scales: handler == spec."""
    qw = _random_weight(rng, 128, 40, group_size, symmetric, scale_dtype)
    np.testing.assert_allclose(np.asarray(jax_lowbit.dequantize(qw, jnp.float32)),
                               spec_reference.dequantize_weight(qw), rtol=0, atol=1e-4)


def _random_weight(rng, k, n, group_size, symmetric, scale_dtype=jnp.bfloat16):
    groups = k // (k if group_size == -1 else group_size)
    words = rng.integers(0, 1 << 32, size=(k // 16, n), dtype=np.uint64).astype(np.uint32)
    pairs = np.asarray(VALID_PAIRS)[rng.integers(0, 6, size=(k // 4, n))]
    metadata = pack_metadata(jnp.asarray(pairs[..., 0]), jnp.asarray(pairs[..., 1]))
    scales = jnp.asarray(rng.uniform(0.01, 2.0, size=(groups, n)), scale_dtype)
    offsets = None if symmetric else jnp.asarray(rng.normal(size=(groups, n)), scale_dtype)
    return QuantizedWeight(jnp.asarray(words), scales, offsets, (k, n), 4, group_size, symmetric,
                           metadata=metadata, sparsity="2:4")


def test_cpu_refuses_invalid_metadata(rng):
    qw = _cached_sparse(64, 8, 64)
    broken = QuantizedWeight(qw.codes, qw.scales, None, qw.shape, 4, 64, True,
                             metadata=jnp.zeros_like(qw.metadata), sparsity="2:4")
    with jax.default_device(jax.devices("cpu")[0]):  # the C++ handler checks; kernels do not
        with pytest.raises(Exception, match="2:4 pattern"):
            np.asarray(broken.dequantize())
        with pytest.raises(Exception, match="2:4 pattern"):
            np.asarray(jax_lowbit.matmul(jnp.ones((1, 64)), broken))


# --- matmul on the CPU -----------------------------------------------------------------

TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-2,
             jnp.dtype(jnp.float16): 2e-3}


def _check_product(y, x, qw):
    w = spec_reference.dequantize_weight(qw)
    x64 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    assert y.dtype == x.dtype and y.shape == x.shape[:-1] + (qw.shape[1],)
    y64 = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    assert np.all(np.abs(y64 - x64 @ w) <= TOLERANCE[x.dtype] * (np.abs(x64) @ np.abs(w)) + 1e-6)


@pytest.mark.parametrize("m", [1, 16, 17, 64, 300])
@pytest.mark.parametrize("k, n", [(64, 8), (1024, 200)])
def test_cpu_matmul(m, k, n, rng):
    qw = _cached_sparse(k, n, group_size=64, symmetric=bool(m % 2))
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    _check_product(jax_lowbit.matmul(x, qw), x, qw)


@pytest.mark.parametrize("group_size, symmetric", [(32, False), (128, True), (256, False),
                                                   (-1, False)])
def test_cpu_matmul_dtypes_and_groups(group_size, symmetric, rng):
    qw = _cached_sparse(512, 48, group_size, symmetric)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        x = jnp.asarray(rng.normal(size=(3, 512)), dtype)
        _check_product(jax_lowbit.matmul(x, qw), x, qw)


# --- transforms ----------------------------------------------------------------------

def test_jit_with_weight_as_argument(rng):
    traces = []

    @jax.jit
    def f(a, w):
        traces.append(w)
        return jax_lowbit.matmul(a, w)

    x = jnp.asarray(rng.normal(size=(4, 128)), jnp.float32)
    for _ in range(2):
        qw = _sparse(rng, 128, 40, group_size=32)
        _check_product(f(x, qw), x, qw)
    assert len(traces) == 1


def test_vmap_over_activations_folds_into_one_call(rng):
    qw = _cached_sparse(128, 40, 32)
    x = jnp.asarray(rng.normal(size=(3, 5, 128)), jnp.float32)
    y = jax.vmap(jax_lowbit.matmul, in_axes=(1, None))(x, qw)
    _check_product(y, jnp.moveaxis(x, 1, 0), qw)
    jaxpr = jax.make_jaxpr(jax.vmap(jax_lowbit.matmul, in_axes=(1, None)))(x, qw)
    names = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    assert names.count("jax_lowbit_matmul") == 1 and "while" not in names


def test_vmap_over_stacked_weights(rng):
    qws = [_sparse(rng, 128, 40, group_size=32, symmetric=False) for _ in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *qws)
    x = jnp.asarray(rng.normal(size=(3, 2, 128)), jnp.float32)
    y = jax.vmap(jax_lowbit.matmul)(x, stacked)
    dense = jax.vmap(lambda q: q.dequantize())(stacked)
    for i, qw in enumerate(qws):
        _check_product(y[i], x[i], qw)
        np.testing.assert_allclose(np.asarray(dense[i]), spec_reference.dequantize_weight(qw),
                                   rtol=1e-6, atol=1e-7)


def test_grad_wrt_activations(rng):
    qw = _cached_sparse(128, 40, 32)
    x = jnp.asarray(rng.normal(size=(2, 128)), jnp.float32)
    cot = rng.normal(size=(2, 40))
    g = jax.grad(lambda a: jnp.sum(jax_lowbit.matmul(a, qw) * cot))(x)
    np.testing.assert_allclose(np.asarray(g), cot @ spec_reference.dequantize_weight(qw).T,
                               rtol=1e-5, atol=1e-4)


def test_export_roundtrip(rng):
    qw = _cached_sparse(128, 40, 32, symmetric=False)
    x = jnp.asarray(rng.normal(size=(4, 128)), jnp.bfloat16)
    exported = jax.export.export(jax.jit(jax_lowbit.matmul),
                                 disabled_checks=jax_lowbit.export_disabled_checks())(x, qw)
    restored = jax.export.deserialize(exported.serialize())
    assert restored.in_tree == exported.in_tree
    np.testing.assert_array_equal(np.asarray(restored.call(x, qw), np.float32),
                                  np.asarray(jax_lowbit.matmul(x, qw), np.float32))


def test_pytree_and_nbytes():
    qw = _cached_sparse(256, 64)
    leaves, treedef = jax.tree.flatten(qw)
    assert len(leaves) == 3  # codes, scales, metadata
    again = jax.tree.unflatten(treedef, leaves)
    assert again.sparsity == "2:4" and again.metadata is leaves[2]
    # 2 of 4 codes at 4 bits and 2 bits of position each: 3 bits a weight, plus scales.
    assert qw.nbytes == 256 * 64 * 3 // 8 + 2 * 64 * 2
    assert "sparsity='2:4'" in repr(qw)


# --- errors ----------------------------------------------------------------------------

def test_bad_formats_are_refused(rng):
    w = rng.normal(size=(128, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="needs bits=4"):
        jax_lowbit.quantize(w, 2, 64, sparsity="2:4")
    with pytest.raises(ValueError, match="needs bits=4"):
        jax_lowbit.quantize(w, 2, 64, ternary=True, sparsity="2:4")
    with pytest.raises(ValueError, match="unsupported sparsity"):
        jax_lowbit.quantize(w, 4, 64, sparsity="1:4")
    with pytest.raises(ValueError, match="multiple of 64"):
        jax_lowbit.quantize(rng.normal(size=(96, 8)).astype(np.float32), 4, 32, sparsity="2:4")


def test_inconsistent_arrays_are_refused_at_trace_time(rng):
    qw = _cached_sparse(128, 16)
    x = jnp.ones((2, 128))
    cases = {
        "metadata exactly when": QuantizedWeight(qw.codes, qw.scales, None, qw.shape, 4, 128,
                                                 True, metadata=qw.metadata),
        "metadata exactly": QuantizedWeight(qw.codes, qw.scales, None, qw.shape, 4, 128, True,
                                            sparsity="2:4"),
        "metadata must be uint16": QuantizedWeight(qw.codes, qw.scales, None, qw.shape, 4, 128,
                                                   True, metadata=qw.metadata[:4],
                                                   sparsity="2:4"),
        "codes must be uint32 of shape": QuantizedWeight(
            jnp.zeros((16, 16), jnp.uint32), qw.scales, None, qw.shape, 4, 128, True,
            metadata=qw.metadata, sparsity="2:4"),
        "unsupported sparsity": QuantizedWeight(qw.codes, qw.scales, None, qw.shape, 4, 128,
                                                True, metadata=qw.metadata, sparsity="4:8"),
    }
    for message, broken in cases.items():
        with pytest.raises(ValueError, match=message):
            jax.jit(jax_lowbit.matmul).lower(x, broken)


# --- CUDA dispatch (exported for CUDA on any machine) ----------------------------------

@pytest.mark.skipif(not jax_lowbit.build_info()["cuda"], reason="built without CUDA")
def test_cuda_dispatch(hopper, rng):
    qw = _cached_sparse(256, 64)
    fused, dequantize = {"jax_lowbit_sparse_gemm_small_m"}, {"jax_lowbit_sparse_dequantize"}
    large_m = {"jax_lowbit_sparse_gemm_large_m"}
    assert lowering.SPARSE_SMALL_M_MAX_ROWS == 64
    for rows in (1, 16, 17, 33, lowering.SPARSE_SMALL_M_MAX_ROWS):
        want = large_m if hopper and rows >= lowering.SPARSE_LARGE_M_MIN_ROWS else fused
        assert cuda_targets((rows, 256), jnp.bfloat16, qw) == want
        assert cuda_targets((rows, 256), jnp.float16, qw) == want
    # More rows: the sparse wgmma kernel on sm_90 (test_dispatch.py), else dequantize.
    assert cuda_targets((1, 256), jnp.float32, qw) == dequantize
    assert cuda_targets((1, 256), jnp.bfloat16, _sparse(rng, 256, 66)) == dequantize
    f32_scales = _sparse(rng, 256, 64, scale_dtype=jnp.float32)
    assert cuda_targets((1, 256), jnp.bfloat16, f32_scales) == dequantize


# --- GPU -------------------------------------------------------------------------------

@pytest.fixture
def staged_on_sm90(monkeypatch):
    """Sends up to 64 rows to the direct and staged kernels on sm_90 too, where
    the lowering takes the sparse wgmma kernel from 17 rows (other GPUs run
    them to 64)."""
    monkeypatch.setattr(lowering, "SPARSE_LARGE_M_MIN_ROWS", lowering.SPARSE_SMALL_M_MAX_ROWS + 1)
    yield

@pytest.mark.gpu
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_gpu_dequantize_writes_every_element(group_size, symmetric, dtype, rng):
    assert_kernel_dequantize(_sparse(rng, 512, 200, group_size, symmetric), dtype)
    assert_kernel_dequantize(_random_weight(rng, 512, 200, group_size, symmetric), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 9, 16, 17, 32])  # the direct kernel: 1, 2 and 4 M tiles
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("k", [512, 4224])  # 4224: several passes of each warp's loop
def test_gpu_small_m_kernel_writes_every_element(m, group_size, symmetric, dtype, k, rng,
                                                 staged_on_sm90):
    n = 200  # N not a multiple of the CTA's 32 columns
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    assert_kernel_matmul(x, _sparse(rng, k, n, group_size, symmetric))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [33, 48, 64])  # the staged kernel (8 M tiles)
# K: one step (64 rows); a last stage of one step (576); both with a split over
# a cluster (4160: 65 steps, 8 CTAs of unequal length); 33 full stages split
# (4224). N: one CTA of 256 columns, partly past N; N % 8 == 4 (scale and
# metadata rows only 8-byte aligned) over four CTAs.
@pytest.mark.parametrize("k, n, group_size", [(64, 200, 32), (576, 1004, -1), (4160, 200, 64),
                                              (4224, 1004, 128)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_staged_kernel_writes_every_element(m, k, n, group_size, symmetric, dtype, rng,
                                                staged_on_sm90):
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    assert_kernel_matmul(x, _sparse(rng, k, n, group_size, symmetric))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 9, 32, 64])  # the direct kernel, then the staged one
@pytest.mark.parametrize("symmetric", [True, False])
def test_gpu_small_m_kernel_on_random_words(m, symmetric, rng, staged_on_sm90):
    """Every valid nibble in every position: catches a wrong metadata lane or selector."""
    qw = _random_weight(rng, 1024, 96, 64, symmetric)
    assert_kernel_matmul(jnp.asarray(rng.normal(size=(m, 1024)), jnp.bfloat16), qw)


@pytest.mark.gpu
# Each tile (256 x 64 up to 64 rows, 256 x 128 to 128, then 128 x 256), M past
# the last tile's rows.
@pytest.mark.parametrize("m", [17, 64, 65, 129, 300])
# K: 3 stages (an odd number: the kernel's last round of two stages is cut
# short), 2, and 66 split over a cluster in unequal shares, odd ones among
# them. N: one tile partly past N.
@pytest.mark.parametrize("k, group_size", [(192, 32), (192, -1), (128, 128), (4224, 32),
                                           (4224, 128), (4224, -1)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_large_m_writes_every_element(m, k, group_size, symmetric, dtype, rng):
    """2:4 weights on sparse tensor cores (wgmma.mma_async.sp, sm_90)."""
    if not _extension.cuda_devices_are_hopper():
        pytest.skip("the sparse wgmma kernel needs sm_90")
    qw = _sparse(rng, k, 200, group_size, symmetric)
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    assert cuda_targets(x.shape, x.dtype, qw) == {"jax_lowbit_sparse_gemm_large_m"}
    assert_kernel_matmul(x, qw)
    assert_kernel_matmul(x, _random_weight(rng, k, 200, group_size, symmetric))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 17, 64, 300, 4096])
def test_gpu_matmul(m, rng):
    """Whichever kernel the lowering picks (the sparse wgmma kernel from 17 rows on
    sm_90; elsewhere the fused kernels to 64, then dequantize + XLA's dot) against
    the spec."""
    qw = _sparse(rng, 1024, 384, 128, symmetric=bool(m % 2))
    x = jnp.asarray(rng.normal(size=(m, 1024)), jnp.bfloat16)
    _check_product(jax.jit(jax_lowbit.matmul)(x, qw), x, qw)


@pytest.mark.gpu
# The direct kernel (16 rows), the staged kernel with K split over a cluster
# on other GPUs (33, 64), the sparse wgmma kernel with a K split on sm_90
# (33, 64, 65), else dequantize + dot.
@pytest.mark.parametrize("m", [16, 33, 64, 65])
def test_gpu_repeated_runs_identical(m, rng):
    qw = _sparse(rng, 4096, 512)
    x = jnp.asarray(rng.normal(size=(m, 4096)), jnp.bfloat16)
    f = jax.jit(jax_lowbit.matmul)
    first = np.asarray(f(x, qw).astype(jnp.float32))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(f(x, qw).astype(jnp.float32)), first)
