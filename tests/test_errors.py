"""Bad input gives a clear Python error that names the problem."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_lowbit
from jax_lowbit import QuantizedWeight


@pytest.fixture
def qw(rng):
    return jax_lowbit.quantize(rng.normal(size=(128, 16)).astype(np.float32), 4, 64)


@pytest.mark.parametrize("bits", [1, 3, 16, True, "4"])
def test_unsupported_bits(bits, rng):
    with pytest.raises(ValueError, match="bits"):
        jax_lowbit.quantize(rng.normal(size=(128, 8)).astype(np.float32), bits)


@pytest.mark.parametrize("group_size", [0, 16, 48, 512, -2])
def test_unsupported_group_size(group_size, rng):
    with pytest.raises(ValueError, match="group_size"):
        jax_lowbit.quantize(rng.normal(size=(1024, 8)).astype(np.float32), 4, group_size)


def test_group_size_must_divide_k(rng):
    with pytest.raises(ValueError, match="does not divide K=96"):
        jax_lowbit.quantize(rng.normal(size=(96, 8)).astype(np.float32), 4, 64)


def test_k_must_fill_words_for_whole_k_groups(rng):
    with pytest.raises(ValueError, match="multiple of 16"):
        jax_lowbit.quantize(rng.normal(size=(40, 8)).astype(np.float32), 2, -1)


@pytest.mark.parametrize("shape", [(128,), (2, 128, 8), ()])
def test_w_not_2d(shape, rng):
    with pytest.raises(ValueError, match="2-D"):
        jax_lowbit.quantize(rng.normal(size=shape).astype(np.float32), 4)


def test_w_not_float():
    with pytest.raises(TypeError, match="float"):
        jax_lowbit.quantize(jnp.ones((128, 8), jnp.int32), 4)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_w(bad, rng):
    w = rng.normal(size=(128, 8)).astype(np.float32)
    w[rng.integers(128), rng.integers(8)] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        jax_lowbit.quantize(w, 4)


def test_scale_overflow_in_float16():
    w = np.full((128, 8), 1e6, np.float32)
    w[0] = -1e6
    with pytest.raises(ValueError, match="float16"):
        jax_lowbit.quantize(w, 4, scale_dtype=jnp.float16)


def test_unsupported_scale_dtype(rng):
    with pytest.raises(TypeError, match="scale dtype"):
        jax_lowbit.quantize(rng.normal(size=(128, 8)).astype(np.float32), 4,
                            scale_dtype=jnp.int8)


def test_k_mismatch(qw, rng):
    x = jnp.asarray(rng.normal(size=(3, 64)), jnp.float32)
    with pytest.raises(ValueError, match="K=128"):
        jax_lowbit.matmul(x, qw)
    with pytest.raises(ValueError, match="K=128"):
        jax.jit(jax_lowbit.matmul)(x, qw)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.bool_, jnp.uint32])
def test_non_float_x(qw, dtype):
    with pytest.raises(TypeError, match="x must have dtype"):
        jax_lowbit.matmul(jnp.ones((2, 128), dtype), qw)


def test_scalar_x(qw):
    with pytest.raises(ValueError, match="last dimension"):
        jax_lowbit.matmul(jnp.float32(1.0), qw)


def test_not_a_quantized_weight(rng):
    with pytest.raises(TypeError, match="QuantizedWeight"):
        jax_lowbit.matmul(jnp.ones((2, 128)), jnp.ones((128, 8)))


def test_bad_dequantize_dtype(qw):
    with pytest.raises(TypeError, match="dequantize dtype"):
        qw.dequantize(jnp.int32)


def test_inconsistent_packed_arrays(qw):
    # Codes of the wrong shape, e.g. from a different weight, are refused at trace time.
    broken = QuantizedWeight(qw.codes[:, :8], qw.scales, None, qw.shape, 4, 64, True)
    with pytest.raises(ValueError, match="codes must be uint32 of shape"):
        jax_lowbit.matmul(jnp.ones((2, 128)), broken)
    broken = QuantizedWeight(qw.codes, qw.scales[:1], None, qw.shape, 4, 64, True)
    with pytest.raises(ValueError, match="scales must have shape"):
        broken.dequantize()
    broken = QuantizedWeight(qw.codes, qw.scales, qw.scales, qw.shape, 4, 64, True)
    with pytest.raises(ValueError, match="offsets must be None"):
        broken.dequantize()
