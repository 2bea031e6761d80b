"""quantize(): error bounds, edge groups, and the QuantizedWeight pytree."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_lowbit
from jax_lowbit import QuantizedWeight

import spec_reference


def _group_repeat(a, qw):
    rows = qw.shape[0] if qw.group_size == -1 else qw.group_size
    return np.repeat(np.asarray(a, np.float64), rows, axis=0)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_within_half_step(bits, group_size, symmetric, rng):
    w = rng.normal(scale=0.05, size=(512, 48)).astype(np.float32)
    qw = jax_lowbit.quantize(jnp.asarray(w), bits, group_size, symmetric=symmetric)
    assert qw.shape == (512, 48) and qw.bits == bits
    assert qw.group_size == group_size and qw.symmetric == symmetric
    assert (qw.offsets is None) == symmetric
    deq = spec_reference.dequantize_weight(qw)
    step = _group_repeat(qw.scales, qw)
    # Round to nearest with no clamping: within half a step (plus f32 rounding).
    assert np.all(np.abs(deq - w) <= 0.5 * step * (1 + 1e-5) + 1e-7)
    # And the handler's dequantize equals the spec's.
    np.testing.assert_allclose(np.asarray(qw.dequantize()), deq, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_grid_is_used_end_to_end(bits, symmetric, rng):
    """Asymmetric codes span 0 .. 2^bits - 1. Symmetric ones span 1 .. 2^bits - 1:
    the scale absmax / (2^(b-1) - 1/2) puts -absmax half a step above code 0."""
    w = rng.uniform(-1, 1, size=(256, 64)).astype(np.float32)
    qw = jax_lowbit.quantize(w, bits, 128, symmetric=symmetric)
    codes = spec_reference.decode_codes(np.asarray(qw.codes), bits)
    assert codes.min() == (1 if symmetric else 0) and codes.max() == (1 << bits) - 1


@pytest.mark.parametrize("scale_dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_scale_dtypes(scale_dtype, symmetric, rng):
    w = rng.normal(size=(128, 32)).astype(np.float32)
    qw = jax_lowbit.quantize(w, 4, 32, symmetric=symmetric, scale_dtype=scale_dtype)
    assert qw.scales.dtype == jnp.dtype(scale_dtype)
    if not symmetric:
        assert qw.offsets.dtype == jnp.dtype(scale_dtype)
    deq = spec_reference.dequantize_weight(qw)
    assert np.all(np.abs(deq - w) <= 0.5 * _group_repeat(qw.scales, qw) * (1 + 1e-5) + 1e-7)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_and_constant_groups_are_finite(bits, symmetric, rng):
    w = rng.normal(size=(128, 8)).astype(np.float32)
    w[:32, 0] = 0.0          # a zero group
    w[32:64, 1] = 0.375      # constant groups (exact in bf16)
    w[64:96, 2] = -1.5
    qw = jax_lowbit.quantize(w, bits, 32, symmetric=symmetric)
    deq = np.asarray(qw.dequantize())
    assert np.all(np.isfinite(deq))
    np.testing.assert_array_equal(deq[:32, 0], 0.0)
    if symmetric:  # a signed grid holds a constant within half a step
        # (and every other weight: up to the quantizer's float32 rounding of
        # w / scale, half an ulp of a code below 128, 2^-18 of a step; seed
        # 1352830193 rounded a code at 76.50005 down)
        step = _group_repeat(qw.scales, qw)
        assert np.all(np.abs(deq - w) <= 0.5 * step * (1 + 1e-4))
    else:  # the offset holds it exactly
        np.testing.assert_array_equal(deq[32:64, 1], 0.375)
        np.testing.assert_array_equal(deq[64:96, 2], -1.5)


def test_dequantize_dtypes(rng):
    w = rng.normal(size=(64, 16)).astype(np.float32)
    qw = jax_lowbit.quantize(w, 4, 32)
    ref = spec_reference.dequantize_weight(qw)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        d = qw.dequantize(dtype)
        assert d.dtype == jnp.dtype(dtype) and d.shape == (64, 16)
        np.testing.assert_allclose(np.asarray(d, np.float64), ref, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_under_jit(symmetric, rng):
    w = rng.normal(size=(128, 24)).astype(np.float32)
    eager = jax_lowbit.quantize(w, 4, 64, symmetric=symmetric)
    traced = jax.jit(lambda a: jax_lowbit.quantize(a, 4, 64, symmetric=symmetric))(w)
    assert jax.tree.structure(eager) == jax.tree.structure(traced)
    # Fused and op-by-op float arithmetic may round a tie differently on some
    # backends: each result is within half a step, so they differ by at most one.
    for qw in (eager, traced):
        step = _group_repeat(qw.scales, qw)
        assert np.all(np.abs(spec_reference.dequantize_weight(qw) - w) <= 0.5 * step * (1 + 1e-5))
    np.testing.assert_allclose(np.asarray(eager.scales, np.float32),
                               np.asarray(traced.scales, np.float32), rtol=2 ** -7)


@pytest.mark.parametrize("symmetric", [True, False])
def test_pytree_roundtrip_and_save(symmetric, rng, tmp_path):
    qw = jax_lowbit.quantize(rng.normal(size=(64, 32)).astype(np.float32), 2, 32,
                             symmetric=symmetric)
    leaves, treedef = jax.tree.flatten(qw)
    assert len(leaves) == (2 if symmetric else 3)
    # Save as host arrays and load back: the format travels as static aux data.
    (tmp_path / "w.pkl").write_bytes(pickle.dumps(jax.tree.map(np.asarray, qw)))
    loaded = pickle.loads((tmp_path / "w.pkl").read_bytes())
    again = jax.tree.map(jnp.asarray, loaded)
    assert jax.tree.structure(again) == treedef
    assert isinstance(again, QuantizedWeight)
    assert (again.shape, again.bits, again.group_size, again.symmetric) == (
        qw.shape, qw.bits, qw.group_size, qw.symmetric)
    np.testing.assert_array_equal(np.asarray(again.dequantize()), np.asarray(qw.dequantize()))


def test_nbytes_and_repr(rng):
    qw = jax_lowbit.quantize(rng.normal(size=(256, 64)).astype(np.float32), 4, 128)
    assert qw.nbytes == 256 * 64 // 2 + 2 * 64 * 2
    assert "bits=4" in repr(qw) and qw.groups == 2


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_directed_rounding_survives_jit(dtype, rng):
    """Scales round up and offsets down into their dtype, also when XLA fuses."""
    from jax_lowbit.quantize import _round_toward

    # Magnitudes from 1e-12 to 1e3: float16's subnormal range included.
    values = (np.exp(rng.uniform(-28, 7, size=4096)) * rng.choice([-1.0, 1.0], 4096)
              ).astype(np.float32)
    info = jnp.finfo(dtype)
    for direction in (1, -1):
        out = np.asarray(jax.jit(lambda v: _round_toward(v, dtype, direction))(values),
                         np.float32)
        assert np.all((out - values) * direction >= 0)
        step = np.maximum(2 * float(info.eps) * np.abs(values), float(info.smallest_subnormal))
        assert np.all(np.abs(out - values) <= step)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_hqq_beats_rtn_on_reconstruction_error(bits, group_size, rng):
    # Heavy-tailed weights, as trained layers have (Student t, 3 degrees of freedom).
    w = (rng.standard_t(3, size=(512, 96)) * 0.02).astype(np.float32)
    errors = {}
    for method in ("rtn", "hqq"):
        qw = jax_lowbit.quantize(w, bits, group_size, symmetric=False, method=method)
        assert qw.codes.shape == (512 * bits // 32, 96) and qw.offsets is not None
        residual = spec_reference.dequantize_weight(qw) - w
        errors[method] = (np.mean(np.abs(residual)), np.linalg.norm(residual))
        # Same packed format: the handler's dequantize agrees with the spec.
        np.testing.assert_allclose(np.asarray(qw.dequantize()), residual + w, rtol=1e-6,
                                   atol=1e-7)
    assert errors["hqq"][0] < errors["rtn"][0]  # mean absolute error
    assert errors["hqq"][1] < errors["rtn"][1]  # Frobenius norm
    # jit-compatible: the traced quantization gives the same weight.
    traced = jax.jit(lambda a: jax_lowbit.quantize(a, bits, group_size, symmetric=False,
                                                   method="hqq"))(w)
    residual = spec_reference.dequantize_weight(traced) - w
    assert np.mean(np.abs(residual)) < errors["rtn"][0]


def test_hqq_needs_zero_points_and_known_method(rng):
    w = rng.normal(size=(128, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="symmetric=False"):
        jax_lowbit.quantize(w, 4, 64, method="hqq")
    with pytest.raises(ValueError, match="method"):
        jax_lowbit.quantize(w, 4, 64, method="gptq")


@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_ternary(group_size, rng):
    w = (rng.normal(size=(256, 40)) * 0.05).astype(np.float32)
    qw = jax_lowbit.quantize(w, 2, group_size, ternary=True)
    assert qw.bits == 2 and qw.symmetric
    deq = spec_reference.dequantize_weight(qw)
    scale = _group_repeat(qw.scales, qw)
    values = np.round(deq / scale)
    assert set(np.unique(values)) <= {-1.0, 0.0, 1.0}
    np.testing.assert_allclose(deq, values * scale)
    # BitNet b1.58: scale = mean |w| of the group, value = clip(round(w / scale), -1, 1).
    rows = 256 if group_size == -1 else group_size
    absmean = np.abs(w).reshape(256 // rows, rows, 40).mean(axis=1)
    np.testing.assert_allclose(np.asarray(qw.scales, np.float32), absmean, rtol=2 ** -8)
    np.testing.assert_array_equal(values, np.clip(np.round(w / scale), -1, 1))
    with pytest.raises(ValueError, match="ternary"):
        jax_lowbit.quantize(w, 4, group_size, ternary=True)


@pytest.mark.parametrize("group_size", [32, 128, 256])
def test_integer_group_scales(group_size, rng):
    """docs/formats.md: c = absmax / 120 of the column rounded up to bfloat16
    precision, group scale c * m with m = ceil(group absmax / (7.5 c)) in 0..16."""
    k, n = 512, 48
    w = rng.standard_t(3, size=(k, n)) * rng.uniform(0.01, 10.0, size=(1, n))
    w[:, 5] = 0  # an all-zero column
    w[:group_size, 7] = 0  # an all-zero group
    w = w.astype(np.float32)
    qw = jax_lowbit.quantize(w, 4, group_size, scale_dtype=jnp.float32,
                             integer_group_scales=True)
    assert qw.integer_group_scales and "integer group scales" in repr(qw)
    scales = np.asarray(qw.scales)
    assert scales.dtype == np.float32
    column = scales.max(axis=0) / 16
    absmax = np.abs(w).max(axis=0)
    # c has 8 significant bits and is the smallest such value with 120 c >= absmax.
    np.testing.assert_array_equal(column, np.asarray(jnp.asarray(column, jnp.bfloat16), np.float32))
    assert np.all(120 * column >= absmax)
    below = np.asarray(jnp.nextafter(jnp.asarray(column, jnp.bfloat16), jnp.bfloat16(0)),
                       np.float32)
    assert np.all((column == 0) | (120 * below < absmax))
    multiples = scales / np.where(column == 0, 1, column)
    np.testing.assert_array_equal(multiples, np.round(multiples))
    assert multiples.min() >= 0 and multiples.max() <= 16
    np.testing.assert_array_equal(multiples.max(axis=0), np.where(absmax > 0, 16, 0))
    assert np.all(multiples[0, 7] == 0) and np.all(scales[:, 5] == 0)
    group_absmax = np.abs(w).reshape(-1, group_size, n).max(axis=1)
    np.testing.assert_array_equal(
        multiples, np.ceil(group_absmax / (7.5 * np.where(column == 0, 1, column))))
    # Still within half a step of every weight (plus f32 rounding), as any symmetric grid.
    err = np.abs(spec_reference.dequantize_weight(qw) - w)
    assert np.all(err <= 0.5 * _group_repeat(scales, qw) * (1 + 1e-5) + 1e-7)
    # A pytree leaf set like any other, the flag in its static data.
    leaves, tree = jax.tree.flatten(qw)
    assert jax.tree.unflatten(tree, leaves).integer_group_scales


@pytest.mark.parametrize("kwargs", [
    dict(bits=8), dict(symmetric=False), dict(group_size=-1), dict(scale_dtype=jnp.bfloat16),
    dict(sparsity="2:4"), dict(bits=2, ternary=True), dict(symmetric=False, method="hqq")])
def test_integer_group_scales_need_int4_symmetric_float32_groups(kwargs, rng):
    w = rng.normal(size=(128, 16)).astype(np.float32)
    args = dict(bits=4, group_size=64, symmetric=True, scale_dtype=jnp.float32) | kwargs
    with pytest.raises(ValueError, match="quantize: integer_group_scales needs int4 symmetric"):
        jax_lowbit.quantize(w, args.pop("bits"), args.pop("group_size"),
                            integer_group_scales=True, **args)


def test_integer_group_scales_survive_export(rng):
    """The flag is static data: jax.export writes it into the exported tree."""
    w = rng.normal(size=(256, 32)).astype(np.float32)
    qw = jax_lowbit.quantize(w, 4, 128, scale_dtype=jnp.float32, integer_group_scales=True)
    x = jnp.asarray(rng.normal(size=(4, 256)), jnp.float32)
    fn = jax.jit(lambda x, w: jax_lowbit.matmul(x, w, act_bits=8))
    exported = jax.export.export(fn, disabled_checks=jax_lowbit.export_disabled_checks())(x, qw)
    restored = jax.export.deserialize(exported.serialize())
    assert restored.in_tree == exported.in_tree
    assert jax.tree.unflatten(restored.in_tree, jax.tree.leaves(((x, qw), {})))[0][1] \
        .integer_group_scales
    np.testing.assert_array_equal(np.asarray(restored.call(x, qw)), np.asarray(fn(x, qw)))
