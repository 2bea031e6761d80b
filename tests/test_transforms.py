"""jit, vmap, grad/jvp and jax.export of matmul and dequantize."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_lowbit

import spec_reference


def _weight(rng, k=128, n=40, bits=4, group_size=32, symmetric=False):
    return jax_lowbit.quantize(rng.normal(size=(k, n)).astype(np.float32), bits, group_size,
                               symmetric=symmetric)


def _ref(x, qw):
    return np.asarray(x, np.float64) @ spec_reference.dequantize_weight(qw)


def test_jit_with_weight_as_argument(rng):
    qw = _weight(rng)
    x = jnp.asarray(rng.normal(size=(6, 128)), jnp.float32)
    traces = []

    @jax.jit
    def f(a, w):
        traces.append(w)
        return jax_lowbit.matmul(a, w)

    np.testing.assert_allclose(np.asarray(f(x, qw)), _ref(x, qw), rtol=1e-5, atol=1e-4)
    # A second weight of the same format is traced once: its arrays are arguments.
    qw2 = _weight(rng)
    np.testing.assert_allclose(np.asarray(f(x, qw2)), _ref(x, qw2), rtol=1e-5, atol=1e-4)
    assert len(traces) == 1


@pytest.mark.parametrize("in_axis", [0, 1])
def test_vmap_over_activations(in_axis, rng):
    qw = _weight(rng)
    x = jnp.asarray(rng.normal(size=(4, 3, 128)), jnp.float32)
    y = jax.vmap(jax_lowbit.matmul, in_axes=(in_axis, None))(x, qw)
    moved = np.moveaxis(np.asarray(x), in_axis, 0)
    np.testing.assert_allclose(np.asarray(y), _ref(moved, qw), rtol=1e-5, atol=1e-4)
    # Leading dims fold into M: one custom call in the jaxpr, no loop.
    jaxpr = jax.make_jaxpr(jax.vmap(jax_lowbit.matmul, in_axes=(in_axis, None)))(x, qw)
    names = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    assert names.count("jax_lowbit_matmul") == 1 and "while" not in names and "scan" not in names


@pytest.mark.parametrize("x_batched", [True, False])
def test_vmap_over_stacked_weights(x_batched, rng):
    qws = [_weight(rng) for _ in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *qws)
    xs = jnp.asarray(rng.normal(size=(3, 5, 128) if x_batched else (5, 128)), jnp.float32)
    y = jax.vmap(jax_lowbit.matmul, in_axes=(0 if x_batched else None, 0))(xs, stacked)
    for i, qw in enumerate(qws):
        xi = xs[i] if x_batched else xs
        np.testing.assert_allclose(np.asarray(y[i]), _ref(xi, qw), rtol=1e-5, atol=1e-4)
    d = jax.vmap(lambda q: q.dequantize())(stacked)
    for i, qw in enumerate(qws):
        np.testing.assert_allclose(np.asarray(d[i]), spec_reference.dequantize_weight(qw),
                                   rtol=1e-6, atol=1e-7)


def test_vmap_codes_batched_scales_shared(rng):
    qws = [_weight(rng) for _ in range(2)]
    codes = jnp.stack([q.codes for q in qws], axis=1)  # batch on axis 1
    x = jnp.asarray(rng.normal(size=(3, 128)), jnp.float32)

    def f(c):
        return jax_lowbit.matmul(x, jax_lowbit.QuantizedWeight(
            c, qws[0].scales, qws[0].offsets, qws[0].shape, 4, 32, False))

    y = jax.vmap(f, in_axes=1)(codes)
    for i, qw in enumerate(qws):
        mixed = jax_lowbit.QuantizedWeight(qw.codes, qws[0].scales, qws[0].offsets,
                                           qw.shape, 4, 32, False)
        np.testing.assert_allclose(np.asarray(y[i]), _ref(x, mixed), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grad_wrt_activations(dtype, rng):
    qw = _weight(rng)
    x = jnp.asarray(rng.normal(size=(2, 3, 128)), dtype)
    cot = rng.normal(size=(2, 3, 40))

    def loss(a):
        return jnp.sum(jax_lowbit.matmul(a, qw).astype(jnp.float32) * cot)

    g = jax.grad(loss)(x)
    assert g.dtype == x.dtype and g.shape == x.shape
    want = cot @ spec_reference.dequantize_weight(qw).T
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(g, np.float64), want, rtol=tol, atol=tol * 10)


def test_jvp_and_linear_transpose(rng):
    qw = _weight(rng)
    x = jnp.asarray(rng.normal(size=(3, 128)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(3, 128)), jnp.float32)
    y, ty = jax.jvp(lambda a: jax_lowbit.matmul(a, qw), (x,), (t,))
    np.testing.assert_allclose(np.asarray(ty), _ref(t, qw), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(y), _ref(x, qw), rtol=1e-5, atol=1e-4)
    # Second order through the transpose: d/dx of (grad . v) is zero for a linear map.
    hvp = jax.jvp(jax.grad(lambda a: jnp.sum(jax_lowbit.matmul(a, qw) ** 2)), (x,), (t,))[1]
    w = spec_reference.dequantize_weight(qw)
    np.testing.assert_allclose(np.asarray(hvp), 2 * np.asarray(t, np.float64) @ w @ w.T,
                               rtol=1e-4, atol=1e-3)


def test_grad_wrt_weights_is_refused(rng):
    qw = _weight(rng)
    x = jnp.asarray(rng.normal(size=(3, 128)), jnp.float32)
    with pytest.raises(TypeError, match="QuantizedWeight"):
        jax.grad(lambda q: jnp.sum(jax_lowbit.matmul(x, q)), allow_int=True)(qw)
    # stop_gradient makes it a constant again.
    g = jax.grad(lambda q: jnp.sum(jax_lowbit.matmul(x, jax.lax.stop_gradient(q))),
                 allow_int=True)(qw)
    assert float(jnp.abs(g.scales.astype(jnp.float32)).max()) == 0.0


def test_export_roundtrip(rng):
    qw = _weight(rng, symmetric=True)
    x = jnp.asarray(rng.normal(size=(4, 128)), jnp.bfloat16)
    exported = jax.export.export(
        jax.jit(jax_lowbit.matmul),
        disabled_checks=jax_lowbit.export_disabled_checks())(x, qw)
    blob = exported.serialize()
    restored = jax.export.deserialize(blob)
    y = restored.call(x, qw)
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.asarray(jax_lowbit.matmul(x, qw), np.float32))
    # The weight's format is static aux data, carried in the serialized in_tree.
    assert restored.in_tree == exported.in_tree