"""matmul(x, qw, act_bits=8) (W8A8 / W4A8): the spec's arithmetic, the float
product's error bound, transforms, dispatch and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_lowbit
from jax_lowbit import _extension, act_quant_lowering, formats
from jax_lowbit.primitives import WeightFormat

import act_quant_reference
import spec_reference
from kernel_checks import cuda_targets

ON_CPU = jax.default_backend() == "cpu"


def _weight(rng, k, n, bits, group_size, symmetric=True, scale_dtype=jnp.bfloat16):
    """A random packed weight, codes uniform over the whole grid (built directly:
    quantize's compile per format would dominate the run time)."""
    groups = k // formats.group_rows(group_size, k)
    codes = formats.pack_codes(jnp.asarray(rng.integers(0, 2**bits, size=(k, n)), jnp.uint32),
                               bits)
    scales = rng.uniform(0.5, 2.0, size=(groups, n)) / 2**bits
    # An asymmetric grid's zero lies anywhere on it.
    offsets = None if symmetric else jnp.asarray(
        -scales * rng.uniform(0, 2**bits - 1, size=(groups, n)), scale_dtype)
    return jax_lowbit.QuantizedWeight(codes, jnp.asarray(scales, scale_dtype), offsets, (k, n),
                                      bits, group_size, symmetric)


def _integer_weight(rng, k, n, group_size):
    """A random int4 weight with integer group scales (docs/formats.md): column
    scales of 8 significant bits times multiples 0..16, with a 16 in each column."""
    groups = k // group_size
    codes = formats.pack_codes(jnp.asarray(rng.integers(0, 16, size=(k, n)), jnp.uint32), 4)
    column = np.asarray(jnp.asarray(rng.uniform(0.5, 2.0, size=n) / 256, jnp.bfloat16),
                        np.float32)
    multiples = rng.integers(0, 17, size=(groups, n))
    multiples[rng.integers(0, groups, size=n), np.arange(n)] = 16
    return jax_lowbit.QuantizedWeight(codes, jnp.asarray(column * multiples, jnp.float32), None,
                                      (k, n), 4, group_size, True, integer_group_scales=True)


def _x(rng, shape, dtype):
    """Heavy-tailed rows of different magnitudes, so per-row scales matter."""
    x = rng.standard_t(4, size=shape) * rng.uniform(0.1, 10.0, size=shape[:-1] + (1,))
    return jnp.asarray(x, dtype)


def _act_matmul(x, qw):
    return jax_lowbit.matmul(x, qw, act_bits=8)


def _groups(qw):
    return qw.shape[0] // formats.group_rows(qw.group_size, qw.shape[0])


def check_against_spec(y, x, qw):
    """CPU: the spec's bits. CUDA: the same but for the order of the float32 group sum."""
    rows = np.asarray(x.astype(jnp.float32)).reshape(-1, qw.shape[0])
    want, magnitude = act_quant_reference.matmul(rows, qw)
    assert y.dtype == x.dtype and y.shape == x.shape[:-1] + (qw.shape[1],)
    got = np.asarray(y.astype(jnp.float32)).reshape(want.shape)
    assert np.all(np.isfinite(got))
    if ON_CPU:
        expected = np.asarray(jnp.asarray(want).astype(x.dtype).astype(jnp.float32))
        np.testing.assert_array_equal(got, expected)
        return
    # Order of the group sum (or an fma), then the product by s and the cast to x's dtype.
    eps = float(jnp.finfo(x.dtype).eps)
    bound = (2 * _groups(qw) * 2.0**-24 * magnitude + 2.0**-23 * np.abs(want)) * (1 + eps)
    bound += eps * np.abs(want) + float(jnp.finfo(x.dtype).smallest_subnormal)
    assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) - bound)


FORMATS = [(bits, group_size, symmetric) for bits in (8, 4) for group_size in (32, 128, -1)
           for symmetric in (True, False)]


@pytest.mark.parametrize("bits, group_size, symmetric", FORMATS)
def test_matches_spec_reference(bits, group_size, symmetric, rng):
    qw = _weight(rng, 256, 40, bits, group_size, symmetric)
    x = _x(rng, (5, 256), jnp.bfloat16)
    check_against_spec(_act_matmul(x, qw), x, qw)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("scale_dtype", [jnp.float32, jnp.float16])
def test_matches_spec_reference_in_other_dtypes(dtype, scale_dtype, rng):
    qw = _weight(rng, 256, 24, 4, 64, symmetric=False, scale_dtype=scale_dtype)
    x = _x(rng, (2, 3, 256), dtype)
    check_against_spec(_act_matmul(x, qw), x, qw)


@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 300])
@pytest.mark.parametrize("bits, group_size", [(8, -1), (4, 128)])
def test_error_against_float_product(m, bits, group_size, rng):
    k, n = 512, 96
    qw = _weight(rng, k, n, bits, group_size, symmetric=bool(m % 2))
    x = _x(rng, (m, k), jnp.float32)
    y = np.asarray(_act_matmul(x, qw), np.float64)
    x64 = np.asarray(x, np.float64)
    w = spec_reference.dequantize_weight(qw)
    want = x64 @ w
    # Rounding x to the grid moves each element by at most s / 2; the float32
    # steps add a few ulps of the terms' size.
    s = np.max(np.abs(x64), axis=1, keepdims=True) / 127
    bound = s / 2 * np.sum(np.abs(w), axis=0) + 1e-5 * (np.abs(x64) @ np.abs(w))
    err = np.abs(y - want)
    assert np.all(err <= bound)
    # And quantizing x does cost something: the error is not float rounding alone.
    assert np.max(err) > 1e-4 * np.max(np.abs(want))


def test_rounding_half_to_even_and_clip():
    # s = 127 / 127 = 1, so x / s = x; an identity weight returns xq itself.
    x = np.zeros((1, 32), np.float32)
    x[0, :9] = [127, 0.5, 1.5, 2.5, -2.5, -0.5, 126.5, -127, 3.49]
    codes = formats.pack_codes(jnp.asarray(np.eye(32, dtype=np.int64) + 128), 8)
    qw = jax_lowbit.QuantizedWeight(codes, jnp.ones((1, 32), jnp.float32), None, (32, 32), 8,
                                    -1, True)
    y = np.asarray(_act_matmul(jnp.asarray(x), qw))
    np.testing.assert_array_equal(y[0, :9], [127, 0, 2, 2, -2, -0.0, 126, -127, 3])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_zero_rows_give_zero(dtype, rng):
    qw = _weight(rng, 128, 16, 4, 32, symmetric=False)
    x = np.array(_x(rng, (4, 128), jnp.float32))
    x[1] = 0
    x[3] = 0
    x[3, 7] = 1e-30  # one tiny value: its row quantizes to one nonzero element
    x[2] *= 1e-37 / np.max(np.abs(x[2]))  # a subnormal scale: counts as an all-zero row
    y = _act_matmul(jnp.asarray(x, dtype), qw)
    assert np.all(np.isfinite(np.asarray(y.astype(jnp.float32))))
    np.testing.assert_array_equal(np.asarray(y[1:3].astype(jnp.float32)), 0.0)
    # Row 3 is x[3, 7] times row 7 of the weight, which may hold exact zeros
    # (code * scale == -offset; seed 157137151 has one).
    nonzero = np.asarray(qw.dequantize(jnp.float32))[7] != 0
    assert np.all(np.asarray(y[3].astype(jnp.float32))[nonzero] != 0)
    check_against_spec(y, jnp.asarray(x, dtype), qw)


@pytest.mark.parametrize("shape", [(128,), (0, 128), (2, 0, 128), (2, 3, 128)])
def test_leading_dims_are_rows(shape, rng):
    qw = _weight(rng, 128, 8, 4, 64)
    x = _x(rng, shape, jnp.bfloat16)
    check_against_spec(_act_matmul(x, qw), x, qw)


# --- transforms ----------------------------------------------------------------

def test_jit_and_vmap_fold_rows_into_one_call(rng):
    qw = _weight(rng, 128, 24, 8, -1)
    x = _x(rng, (3, 4, 128), jnp.bfloat16)
    f = jax.vmap(_act_matmul, in_axes=(1, None))
    y = jax.jit(f)(x, qw)
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.asarray(_act_matmul(jnp.moveaxis(x, 1, 0), qw), np.float32))
    names = [e.primitive.name for e in jax.make_jaxpr(f)(x, qw).jaxpr.eqns]
    assert names.count("jax_lowbit_act_quant_matmul") == 1 and "scan" not in names


def test_vmap_over_stacked_weights(rng):
    qws = [_weight(rng, 128, 16, 4, 64, symmetric=False) for _ in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *qws)
    x = _x(rng, (2, 128), jnp.float32)
    y = jax.vmap(_act_matmul, in_axes=(None, 0))(x, stacked)
    for i, qw in enumerate(qws):
        np.testing.assert_array_equal(np.asarray(y[i]), np.asarray(_act_matmul(x, qw)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradient_is_straight_through(dtype, rng):
    qw = _weight(rng, 128, 40, 4, 32)
    x = _x(rng, (2, 3, 128), dtype)
    cot = jnp.asarray(rng.normal(size=(2, 3, 40)), jnp.float32)

    def loss(a, act_bits):
        return jnp.sum(jax_lowbit.matmul(a, qw, act_bits=act_bits).astype(jnp.float32) * cot)

    g = jax.grad(loss)(x, 8)
    assert g.dtype == x.dtype and g.shape == x.shape
    # Bit for bit the weight-only product's gradient: y_bar @ dequantize(W)^T.
    np.testing.assert_array_equal(np.asarray(g, np.float32),
                                  np.asarray(jax.grad(loss)(x, None), np.float32))
    want = np.asarray(cot, np.float64) @ spec_reference.dequantize_weight(qw).T
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(g, np.float64), want, rtol=tol, atol=tol * 10)


def test_jvp_is_the_weight_only_product(rng):
    qw = _weight(rng, 128, 16, 8, 64)
    x, t = _x(rng, (3, 128), jnp.float32), _x(rng, (3, 128), jnp.float32)
    y, ty = jax.jvp(lambda a: _act_matmul(a, qw), (x,), (t,))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(_act_matmul(x, qw)))
    np.testing.assert_array_equal(np.asarray(ty), np.asarray(jax_lowbit.matmul(t, qw)))


def test_export_roundtrip(rng):
    qw = _weight(rng, 256, 32, 4, 128, symmetric=False)
    x = _x(rng, (4, 256), jnp.bfloat16)
    exported = jax.export.export(jax.jit(_act_matmul),
                                 disabled_checks=jax_lowbit.export_disabled_checks())(x, qw)
    if ON_CPU:
        assert "custom_call @jax_lowbit_act_quant_matmul" in exported.mlir_module()
    restored = jax.export.deserialize(exported.serialize())
    np.testing.assert_array_equal(np.asarray(restored.call(x, qw), np.float32),
                                  np.asarray(_act_matmul(x, qw), np.float32))


# --- which CUDA path runs (checked anywhere by exporting for CUDA) ------------------

KERNEL = {"jax_lowbit_quantize_rows", "jax_lowbit_act_quant_gemm"}
LARGE_M_KERNEL = {"jax_lowbit_quantize_rows", "jax_lowbit_act_quant_gemm_large_m"}
INTEGER_DOT = {"jax_lowbit_quantize_rows"}
INTEGER_SCALES_KERNEL = {"jax_lowbit_quantize_rows_integer_scales",
                         "jax_lowbit_act_quant_gemm_integer_scales"}


@pytest.mark.skipif(not jax_lowbit.build_info()["cuda"], reason="built without CUDA")
@pytest.mark.parametrize("m, k, n, bits, group_size, elsewhere, on_sm90", [
    (1, 256, 64, 4, 128, KERNEL, KERNEL),
    (32, 256, 64, 8, -1, KERNEL, KERNEL),
    (33, 256, 64, 8, -1, INTEGER_DOT, LARGE_M_KERNEL),
    (300, 256, 64, 4, 32, KERNEL, LARGE_M_KERNEL),
    (4096, 256, 64, 8, -1, INTEGER_DOT, LARGE_M_KERNEL),
    (4096, 256, 64, 4, 128, KERNEL, LARGE_M_KERNEL),
    (300, 320, 64, 4, 32, KERNEL, KERNEL),  # K not a multiple of 128
    (300, 256, 68, 4, 32, KERNEL, KERNEL),  # N not a multiple of 8
    (4, 100, 64, 8, -1, INTEGER_DOT, INTEGER_DOT),  # K not a multiple of 32
    (40, 100, 64, 8, -1, INTEGER_DOT, INTEGER_DOT),
    (4, 256, 66, 4, 64, KERNEL, KERNEL),  # N padded to a multiple of 4
])
def test_cuda_dispatch(m, k, n, bits, group_size, elsewhere, on_sm90, hopper, rng):
    qw = _weight(rng, k, n, bits, group_size)
    fmt = WeightFormat((k, n), bits, group_size, True)
    want = on_sm90 if hopper else elsewhere
    assert act_quant_lowering.uses_large_m_kernel(fmt, m) == (want == LARGE_M_KERNEL)
    if want != LARGE_M_KERNEL:
        assert act_quant_lowering.uses_gemm_kernel(fmt, m) == (want == KERNEL)
    assert cuda_targets((m, k), jnp.bfloat16, qw, act_bits=8) == want


@pytest.mark.skipif(not jax_lowbit.build_info()["cuda"], reason="built without CUDA")
@pytest.mark.parametrize("m, n, elsewhere, on_sm90", [
    (16, 64, KERNEL, KERNEL),
    (33, 64, KERNEL, INTEGER_SCALES_KERNEL),
    (4096, 64, KERNEL, INTEGER_SCALES_KERNEL),
    (300, 72, KERNEL, LARGE_M_KERNEL),  # N not a multiple of 16: the float group terms
])
def test_cuda_dispatch_integer_group_scales(m, n, elsewhere, on_sm90, hopper, rng):
    qw = _integer_weight(rng, 256, n, 128)
    want = on_sm90 if hopper else elsewhere
    assert cuda_targets((m, 256), jnp.bfloat16, qw, act_bits=8) == want


@pytest.mark.parametrize("group_size", [32, 128])
def test_integer_group_scales_match_spec(group_size, rng):
    """Integer group scales are float32 group scales: the spec is the same."""
    qw = _integer_weight(rng, 512, 48, group_size)
    x = _x(rng, (5, 512), jnp.bfloat16)
    check_against_spec(_act_matmul(x, qw), x, qw)


# --- bad input -------------------------------------------------------------------

@pytest.mark.parametrize("change", [dict(bits=8), dict(symmetric=False), dict(group_size=-1)])
def test_integer_group_scales_flag_needs_int4_symmetric_groups(change, rng):
    import dataclasses

    qw = _integer_weight(rng, 256, 16, 128)
    for bad in [dataclasses.replace(qw, scales=qw.scales.astype(jnp.bfloat16)),
                dataclasses.replace(qw, **change)]:
        with pytest.raises(ValueError, match="integer_group_scales needs int4 symmetric"):
            _act_matmul(jnp.ones((2, 256)), bad)


@pytest.mark.parametrize("act_bits", [4, 16, 0, True, "8", 8.0])
def test_unsupported_act_bits(act_bits, rng):
    qw = _weight(rng, 128, 8, 8, -1)
    with pytest.raises(ValueError, match="act_bits=.* is not supported; use act_bits=8"):
        jax_lowbit.matmul(jnp.ones((2, 128)), qw, act_bits=act_bits)


def test_numpy_integer_act_bits(rng):
    qw = _weight(rng, 128, 8, 8, -1)
    x = _x(rng, (2, 128), jnp.float32)
    np.testing.assert_array_equal(np.asarray(jax_lowbit.matmul(x, qw, act_bits=np.int64(8))),
                                  np.asarray(_act_matmul(x, qw)))


def test_sparse_weights_are_refused(rng):
    qw = jax_lowbit.quantize(rng.normal(size=(128, 8)).astype(np.float32), 4, 64,
                             sparsity="2:4")
    with pytest.raises(ValueError, match="act_bits=8 takes dense weights"):
        jax_lowbit.matmul(jnp.ones((2, 128)), qw, act_bits=8)


def test_int2_weights_are_refused(rng):
    qw = _weight(rng, 128, 8, 2, 32)
    with pytest.raises(ValueError, match="needs 4- or 8-bit weights .*got bits=2"):
        jax.jit(_act_matmul)(jnp.ones((2, 128)), qw)


@pytest.mark.parametrize("x, error, message", [
    (jnp.ones((2, 128), jnp.int8), TypeError, "x must have dtype"),
    (jnp.ones((2, 64)), ValueError, "last dimension must equal the weight's K=128"),
    (jnp.float32(1), ValueError, "last dimension"),
])
def test_bad_x(x, error, message, rng):
    qw = _weight(rng, 128, 8, 4, 64)
    with pytest.raises(error, match=message):
        _act_matmul(x, qw)
    with pytest.raises(error, match=message):
        jax.jit(_act_matmul)(x, qw)


def test_not_a_quantized_weight():
    with pytest.raises(TypeError, match="expected a QuantizedWeight"):
        jax_lowbit.matmul(jnp.ones((2, 128)), jnp.ones((128, 8)), act_bits=8)


# --- CUDA kernels (GPU only) ---------------------------------------------------------

GPU_FORMATS = [(8, -1, True), (8, -1, False), (8, 256, True), (4, 128, True), (4, 128, False),
               (4, 32, False)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 300])
@pytest.mark.parametrize("bits, group_size, symmetric", GPU_FORMATS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_writes_every_element_and_matches_spec(m, bits, group_size, symmetric, dtype, rng):
    from kernel_checks import _poisoned

    # K: 136 steps of 32 rows, so warps take several runs and end unevenly;
    # N not a multiple of the CTA's 32 columns.
    k, n = 4352, 200
    qw = _weight(rng, k, n, bits, group_size, symmetric)
    x = _x(rng, (m, k), dtype)
    # _poisoned asserts every element was written; its values (exact in dtype) are checked.
    y = _poisoned(_act_matmul, (m, n), dtype, x, qw)
    check_against_spec(jnp.asarray(y, jnp.float32).astype(dtype), x, qw)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 40])
@pytest.mark.parametrize("bits, group_size, k", [(4, 128, 4224), (4, 32, 4256), (8, 64, 4288)])
def test_gpu_odd_number_of_groups(m, bits, group_size, k, rng):
    """Warps take runs of whole groups (several when groups are short): the
    last run is cut short by K.

    40 rows: three row blocks of the mma.sync kernel where K is not a
    multiple of 128 (4256, 4288), the wgmma kernel on sm_90 where it is (4224).
    """
    from kernel_checks import _poisoned

    assert (k // group_size) % 2 == 1
    qw = _weight(rng, k, 72, bits, group_size, symmetric=False)
    x = _x(rng, (m, k), jnp.bfloat16)
    y = _poisoned(_act_matmul, (m, 72), x.dtype, x, qw)
    check_against_spec(jnp.asarray(y, jnp.float32).astype(x.dtype), x, qw)


@pytest.mark.gpu
@pytest.mark.parametrize("m, k, n", [
    # Groups take 128-row tiles; one group takes 256 rows above 128 rows.
    (1000, 1024, 2048),  # groups: 128 tiles, no K split; one group: 64 tiles, split
    (129, 4352, 200),  # groups: a row tile of one row; K split over 8 CTAs
    # One group: the last 256-row tile partial.
    (1100, 512, 4096),  # 160 tiles, no K split (4 stages)
    (1300, 4352, 200),  # 12 tiles, K split over 8 CTAs
])
# One group and groups of 1, 2 and 4 steps and of whole stages are compiled
# apart, for each bits and symmetry; int4 asymmetric 256-row groups have the
# largest group sums.
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gpu_large_m_kernel(m, k, n, bits, group_size, symmetric, rng):
    from kernel_checks import _poisoned

    qw = _weight(rng, k, n, bits, group_size, symmetric)
    x = _x(rng, (m, k), jnp.bfloat16)
    if _extension.cuda_devices_are_hopper():  # the wgmma kernel, not a fallback
        assert cuda_targets(x.shape, x.dtype, qw, act_bits=8) == LARGE_M_KERNEL
    y = _poisoned(_act_matmul, (m, n), x.dtype, x, qw)
    check_against_spec(jnp.asarray(y, jnp.float32).astype(x.dtype), x, qw)


@pytest.mark.gpu
@pytest.mark.parametrize("m, k, n", [
    (40, 1024, 256),  # one 128-row tile a column strip
    (129, 4352, 208),  # 256-row tiles from 129 rows; K split over 8 CTAs
    (1000, 1024, 2048),
    (1100, 512, 4096),  # no K split, the last 256-row tile partial
    (1300, 4352, 208),
])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_gpu_integer_group_scales(m, k, n, group_size, rng):
    """The wgmma kernel's integer-scale form: one int32 sum over K of xq * (code - 8) * m."""
    from kernel_checks import _poisoned

    qw = _integer_weight(rng, k, n, group_size)
    x = _x(rng, (m, k), jnp.bfloat16)
    if _extension.cuda_devices_are_hopper():
        assert cuda_targets(x.shape, x.dtype, qw, act_bits=8) == INTEGER_SCALES_KERNEL
    y = _poisoned(_act_matmul, (m, n), x.dtype, x, qw)
    check_against_spec(jnp.asarray(y, jnp.float32).astype(x.dtype), x, qw)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [208, 4096])  # 208: the last CTA's 32 columns partial
def test_gpu_pre_pass_derives_integer_scales(n, rng):
    """The pre-pass's launch also gives c = max_g scale / 16 and m = scale / c."""
    qw = _integer_weight(rng, 1024, n, 64)
    scales = np.array(qw.scales)
    scales[:, 3] = 0  # an all-zero column: c = 0, m = 0
    x = _x(rng, (5, 1024), jnp.bfloat16)
    prepass = jax.jit(lambda x, w: act_quant_lowering._quantize_rows_integer_scales(x, w, 4))
    xq, s, column, multiples = prepass(x, jnp.asarray(scales))
    want_column = scales.max(axis=0) / 16
    np.testing.assert_array_equal(np.asarray(column), want_column)
    np.testing.assert_array_equal(np.asarray(multiples),
                                  scales / np.where(want_column == 0, 1, want_column))
    want_xq, want_s = act_quant_reference.quantize_rows(np.asarray(x.astype(jnp.float32)))
    assert np.asarray(multiples).dtype == np.uint8
    # The rows' part as in the plain pre-pass (xq interleaved for int4 codes).
    np.testing.assert_array_equal(np.asarray(s), want_s)
    np.testing.assert_array_equal(np.sort(np.asarray(xq).reshape(5, -1, 32), axis=2),
                                  np.sort(want_xq.reshape(5, -1, 32), axis=2))


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_gpu_pre_pass_interleaves_rows_for_the_wgmma_kernel(bits, rng):
    """docs/formats.md: with interleave_bits, position 4t + i of each 32-element
    block of xq holds element 8t + ORDER[i], position 16 + 4t + i element 8t + ORDER[4 + i];
    for int8 codes the two halves of odd t trade places."""
    order = {4: [0, 4, 1, 5, 2, 6, 3, 7], 8: [0, 2, 1, 3, 4, 6, 5, 7]}[bits]
    where = np.empty(32, np.int64)
    for lane in range(4):
        swap = 4 * (bits == 8 and lane % 2 == 1)
        for i in range(4):
            where[4 * lane + i] = 8 * lane + order[i + swap]
            where[16 + 4 * lane + i] = 8 * lane + order[(4 + i + swap) % 8]
    m, k, group_rows = 5, 256, 64
    x = _x(rng, (m, k), jnp.bfloat16)
    xq, s = act_quant_reference.quantize_rows(np.asarray(x.astype(jnp.float32)))
    for interleave_bits, want in [(0, xq), (bits, xq.reshape(m, -1, 32)[:, :, where])]:
        got = jax.jit(lambda x: act_quant_lowering._quantize_rows(
            x, group_rows, k // group_rows, interleave_bits))(x)
        np.testing.assert_array_equal(np.asarray(got[0]).reshape(want.shape), want)
        np.testing.assert_array_equal(np.asarray(got[1]), s)
        np.testing.assert_array_equal(np.asarray(got[2]),
                                      xq.reshape(m, -1, group_rows).sum(axis=2).T)


@pytest.mark.gpu
def test_gpu_pre_pass_divides_near_half_integers(rng):
    """The pre-pass multiplies by 1 / s and divides only near half-integers
    (cc/cuda/quantize_rows.cu); x / s on and a few ulps beside n + 1/2 must
    still round as the spec's true division does."""
    m, k = 8, 256
    absmax = (np.float32(127) * rng.uniform(0.5, 2.0, size=(m, 1))).astype(np.float32)
    s = absmax / np.float32(127)
    halves = (rng.integers(-127, 127, size=(m, k)) + np.float32(0.5)).astype(np.float32)
    x = halves * s
    shift = rng.integers(-3, 4, size=(m, k))  # ulps away from the half-integer quotient
    for step in range(1, 4):
        x = np.where(shift >= step, np.nextafter(x, np.float32(np.inf)), x)
        x = np.where(-shift >= step, np.nextafter(x, np.float32(-np.inf)), x)
    x[:, 0] = absmax[:, 0]
    want, _ = act_quant_reference.quantize_rows(x)
    # The data has teeth: rounding the product by 1 / s gets some elements wrong.
    assert np.any(np.rint(x * (np.float32(1) / s)) != want)
    got = jax.jit(lambda x: act_quant_lowering._quantize_rows(x, 64, k // 64))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(got[0]), want)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [5, 40])
@pytest.mark.parametrize("x_dtype, scale_dtype", [
    (jnp.float32, jnp.float32), (jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.float16),
    (jnp.float16, jnp.float32)])
@pytest.mark.parametrize("n", [64, 66])  # 66: N padded to a multiple of 4
def test_gpu_dtypes_and_padded_columns(m, x_dtype, scale_dtype, n, rng):
    qw = _weight(rng, 512, n, 4, 64, symmetric=False, scale_dtype=scale_dtype)
    x = _x(rng, (m, 512), x_dtype)
    check_against_spec(jax.jit(_act_matmul)(x, qw), x, qw)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [100, 4352])  # 100: not a multiple of 32, integer-dot path
def test_gpu_one_group_small_k(k, rng):
    qw = _weight(rng, k, 48, 8, -1, symmetric=False)
    x = _x(rng, (7, k), jnp.bfloat16)
    check_against_spec(jax.jit(_act_matmul)(x, qw), x, qw)


@pytest.mark.gpu
@pytest.mark.parametrize("m, group_size", [(16, 128), (16, -1), (100, 128)])
def test_gpu_repeated_runs_identical(m, group_size, rng):
    qw = _weight(rng, 2048, 512, 4, group_size)
    x = _x(rng, (m, 2048), jnp.bfloat16)
    f = jax.jit(_act_matmul)
    first = np.asarray(f(x, qw).astype(jnp.float32))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(f(x, qw).astype(jnp.float32)), first)
