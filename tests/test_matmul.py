"""matmul against a float64 reference built from the spec decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_lowbit

import spec_reference

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


def _check(y, x, qw, dtype):
    """Error of y relative to the size of its terms, |x| @ |w| (f32 accumulation)."""
    w = spec_reference.dequantize_weight(qw)
    x64 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    want = x64 @ w
    scale = np.abs(x64) @ np.abs(w)
    assert y.dtype == jnp.dtype(dtype)
    assert y.shape == x.shape[:-1] + (qw.shape[1],)
    y64 = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    assert np.all(np.isfinite(y64))
    assert np.all(np.abs(y64 - want) <= TOLERANCE[dtype] * scale + 1e-6), np.max(
        np.abs(y64 - want) / (scale + 1e-6))


def _weight(rng, k, n, bits=4, group_size=64, symmetric=True):
    w = rng.normal(size=(k, n)).astype(np.float32)
    return jax_lowbit.quantize(w, bits, group_size, symmetric=symmetric)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_formats_and_dtypes(dtype, bits, symmetric, rng):
    qw = _weight(rng, 256, 80, bits, 64, symmetric)
    x = jnp.asarray(rng.normal(size=(5, 256)), dtype)
    _check(jax_lowbit.matmul(x, qw), x, qw, dtype)


@pytest.mark.parametrize("group_size", [32, 128, 256, -1])
def test_matmul_group_sizes(group_size, rng):
    qw = _weight(rng, 512, 48, 4, group_size, False)
    x = jnp.asarray(rng.normal(size=(3, 512)), jnp.float32)
    _check(jax_lowbit.matmul(x, qw), x, qw, jnp.float32)


@pytest.mark.parametrize("lead", [(), (1,), (7,), (2, 3), (1, 17)])
def test_leading_dims(lead, rng):
    qw = _weight(rng, 128, 33)  # odd N
    x = jnp.asarray(rng.normal(size=lead + (128,)), jnp.bfloat16)
    _check(jax_lowbit.matmul(x, qw), x, qw, jnp.bfloat16)


@pytest.mark.parametrize("m", [1, 3, 17, 65])
def test_odd_sizes(m, rng):
    # K not a power of two, N odd and wider than one CPU panel.
    qw = _weight(rng, 96, 131, 2, 32, False)
    x = jnp.asarray(rng.normal(size=(m, 96)), jnp.float16)
    _check(jax_lowbit.matmul(x, qw), x, qw, jnp.float16)


def test_large_enough_for_threads(rng):
    qw = _weight(rng, 1024, 384, 4, 128)
    x = jnp.asarray(rng.normal(size=(64, 1024)), jnp.float32)
    _check(jax_lowbit.matmul(x, qw), x, qw, jnp.float32)
