"""CUDA path: the dequantize kernel writes every element, matmul matches the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_lowbit

import spec_reference
from jax_lowbit import _extension
from kernel_checks import assert_kernel_dequantize, assert_kernel_matmul, cuda_targets

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dequantize_kernel_writes_every_element(bits, group_size, symmetric, dtype, rng):
    k, n = 512, 200  # N not a multiple of the block size
    qw = jax_lowbit.quantize(rng.normal(size=(k, n)).astype(np.float32), bits, group_size,
                             symmetric=symmetric)
    assert_kernel_dequantize(qw, dtype)


# small-M kernel (to 16 rows on sm_90, else to 32), then the wgmma kernel on sm_90; elsewhere
# the mid-M kernel to 64 rows and dequantize + dot above
@pytest.mark.parametrize("m", [8, 16, 32, 64, 65, 300])
def test_repeated_runs_identical(m, rng):
    qw = jax_lowbit.quantize(rng.normal(size=(1024, 512)).astype(np.float32), 4, 128)
    x = jnp.asarray(rng.normal(size=(m, 1024)), jnp.bfloat16)
    f = jax.jit(jax_lowbit.matmul)
    first = np.asarray(f(x, qw).astype(jnp.float32))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(f(x, qw).astype(jnp.float32)), first)


@pytest.mark.parametrize("m", [1, 3, 9, 16, 17, 32, 33, 64])  # each M-tile count, partial tiles
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
# 4224: several passes of each warp's loop, a partial last 256-row stage and K
# split across a cluster in the mid-M kernel (which N = 196 keeps on sm_90 too)
@pytest.mark.parametrize("k", [512, 4224])
def test_small_m_kernel_writes_every_element(m, bits, group_size, symmetric, dtype, k, rng):
    n = 196  # not a multiple of a CTA's 32 or 128 columns; scale rows only 8-byte aligned
    qw = jax_lowbit.quantize(rng.normal(size=(k, n)).astype(np.float32), bits, group_size,
                             symmetric=symmetric)
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    assert_kernel_matmul(x, qw)


# 256 x 64 tiles at 17, 64 rows (partial, full); 256 x 128 at 65, 128; 128 x 256
# at 129, 300 (partial)
@pytest.mark.parametrize("m", [17, 64, 65, 128, 129, 300])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
# 128: two pipeline stages (fewer than the ring holds), no K split; 4224: 66
# stages split over a cluster of 8 CTAs (1 to 4 tiles: far
# fewer than the SMs) in unequal shares, and two groups in a stage for
# 32-row groups
@pytest.mark.parametrize("k", [128, 4224])
def test_large_m_kernel_writes_every_element(m, bits, group_size, symmetric, dtype, k, rng):
    n = 200  # not a multiple of a CTA's 128 or 256 columns
    qw = jax_lowbit.quantize(rng.normal(size=(k, n)).astype(np.float32), bits, group_size,
                             symmetric=symmetric)
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    _assert_large_m_kernel_matmul(x, qw)


def _assert_large_m_kernel_matmul(x, qw):
    """On sm_90 the product runs the wgmma kernel (elsewhere dequantize + dot)
    and writes every element of the reference."""
    if _extension.cuda_devices_are_hopper():
        assert cuda_targets(x.shape, x.dtype, qw) == {"jax_lowbit_gemm_large_m"}
    assert_kernel_matmul(x, qw)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_large_m_kernel_full_wave(bits, symmetric, rng):
    # 122 tiles of 128 x 256, about a wave: no K split; last row tile partial.
    m, k, n = 500, 512, 7688
    qw = jax_lowbit.quantize(rng.normal(size=(k, n)).astype(np.float32), bits, 64,
                             symmetric=symmetric)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    _assert_large_m_kernel_matmul(x, qw)


@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 300, 4096])
@pytest.mark.parametrize("bits", [2, 4])
def test_matmul_on_gpu(m, bits, rng):
    k, n = 1024, 384
    qw = jax_lowbit.quantize(rng.normal(size=(k, n)).astype(np.float32), bits, 128,
                             symmetric=bool(m % 2))
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    y = jax.jit(jax_lowbit.matmul)(x, qw)
    assert y.dtype == jnp.bfloat16 and y.shape == (m, n)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    w = spec_reference.dequantize_weight(qw)
    err = np.abs(np.asarray(y.astype(jnp.float32), np.float64) - x64 @ w)
    assert np.all(err <= 1e-2 * (np.abs(x64) @ np.abs(w)) + 1e-3)
