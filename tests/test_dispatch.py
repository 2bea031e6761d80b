"""Which CUDA kernel a matmul lowers to, checked on any machine by exporting for CUDA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_lowbit
from jax_lowbit import _extension, int_lowering, lowering

from kernel_checks import cuda_targets, int_matmul_cuda_targets

pytestmark = pytest.mark.skipif(not jax_lowbit.build_info()["cuda"],
                                reason="built without the CUDA extension")


def _weight(rng, k=256, n=64, bits=4, group_size=128, scale_dtype=jnp.bfloat16):
    return jax_lowbit.quantize(rng.normal(size=(k, n)).astype(np.float32), bits, group_size,
                               scale_dtype=scale_dtype)


FUSED = {"jax_lowbit_gemm_small_m"}
LARGE_M = {"jax_lowbit_gemm_large_m"}
DEQUANTIZE_THEN_DOT = {"jax_lowbit_dequantize"}


@pytest.mark.parametrize("x_shape", [(17, 256), (33, 256), (65, 256), (300, 256),
                                     (4, 100, 256), (8192, 256)])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_large_m_uses_wgmma_kernel_on_sm90(x_shape, bits, symmetric, hopper, rng):
    qw = jax_lowbit.quantize(rng.normal(size=(256, 64)).astype(np.float32), bits, 128,
                             symmetric=symmetric)
    rows = int(np.prod(x_shape[:-1]))
    elsewhere = FUSED if rows <= lowering.SMALL_M_MAX_ROWS else DEQUANTIZE_THEN_DOT
    assert cuda_targets(x_shape, jnp.bfloat16, qw) == (LARGE_M if hopper else elsewhere)


@pytest.mark.parametrize("rows", [lowering.SPARSE_LARGE_M_MIN_ROWS, 300])
@pytest.mark.parametrize("symmetric", [True, False])
def test_large_m_sparse_uses_sparse_wgmma_kernel_on_sm90(rows, symmetric, hopper, rng):
    qw = jax_lowbit.quantize(rng.normal(size=(256, 64)).astype(np.float32), 4, 128,
                             symmetric=symmetric, sparsity="2:4")
    elsewhere = ({"jax_lowbit_sparse_gemm_small_m"} if rows <= lowering.SPARSE_SMALL_M_MAX_ROWS
                 else {"jax_lowbit_sparse_dequantize"})
    want = {"jax_lowbit_sparse_gemm_large_m"} if hopper else elsewhere
    assert cuda_targets((rows, 256), jnp.bfloat16, qw) == want


@pytest.mark.parametrize("case", ["K not a multiple of 64", "N not a multiple of 8",
                                  "2:4 sparse, N not a multiple of 8", "float32 x"])
def test_large_m_other_cases_dequantize_then_dot(case, hopper, rng):
    k, n, sparsity, x_dtype, rows, symmetric = 256, 64, None, jnp.bfloat16, 200, True
    if case == "K not a multiple of 64":
        k = 224
    elif case == "N not a multiple of 8":
        n = 68
    elif case == "2:4 sparse, N not a multiple of 8":
        sparsity, n = "2:4", 68
    else:
        x_dtype = jnp.float32
    qw = jax_lowbit.quantize(rng.normal(size=(k, n)).astype(np.float32), 4, 32,
                             symmetric=symmetric, sparsity=sparsity)
    want = {"jax_lowbit_sparse_dequantize"} if sparsity else DEQUANTIZE_THEN_DOT
    assert cuda_targets((rows, k), x_dtype, qw) == want


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("x_shape", [(1, 256), (16, 256), (32, 256), (256,), (2, 8, 256)])
@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float16])
def test_small_m_uses_fused_kernel(bits, x_shape, x_dtype, hopper, rng):
    rows = int(np.prod(x_shape[:-1]))
    want = LARGE_M if hopper and rows >= lowering.LARGE_M_MIN_ROWS else FUSED
    assert cuda_targets(x_shape, x_dtype, _weight(rng, bits=bits)) == want


@pytest.mark.parametrize("case", [
    "too many rows", "float32 x", "int8 codes", "N not a multiple of 4", "K not a multiple of 4P",
    "float32 scales", "float16 scales with bfloat16 x"])
def test_other_cases_dequantize_then_dot(case, rng, monkeypatch):
    monkeypatch.setattr(_extension, "cuda_devices_are_hopper", lambda: False)
    jax.clear_caches()
    x_shape, x_dtype, qw = (1, 256), jnp.bfloat16, None
    if case == "too many rows":
        x_shape = (lowering.SMALL_M_MAX_ROWS + 1, 256)
    elif case == "float32 x":
        x_dtype = jnp.float32
    elif case == "int8 codes":
        qw = _weight(rng, bits=8)
    elif case == "N not a multiple of 4":
        qw = _weight(rng, n=66)
    elif case == "K not a multiple of 4P":
        qw, x_shape = _weight(rng, k=96, bits=2, group_size=32), (1, 96)
    elif case == "float32 scales":
        qw = _weight(rng, scale_dtype=jnp.float32)
    else:
        qw = _weight(rng, scale_dtype=jnp.float16)
    qw = qw if qw is not None else _weight(rng)
    assert cuda_targets(x_shape, x_dtype, qw) == DEQUANTIZE_THEN_DOT


INT_KERNEL = {"jax_lowbit_int_gemm_small_m"}
INT_LARGE_M = {"jax_lowbit_int_gemm_large_m"}


@pytest.mark.parametrize("a_shape, n", [
    ((1, 4096), 4096), ((16, 4096), 6144), ((16, 14336), 4096), ((9, 104), 72), ((2, 3, 64), 8),
    ((4096,), 8)])
def test_int_matmul_small_m_uses_int_kernel(a_shape, n, hopper):
    assert int_matmul_cuda_targets(a_shape, n) == INT_KERNEL


@pytest.mark.parametrize("a_shape, n", [
    ((17, 256), 64), ((64, 4096), 4096), ((4096, 14336), 4096), ((3, 100, 48), 16)])
def test_int_matmul_large_m_uses_wgmma_kernel_on_sm90(a_shape, n, hopper):
    assert int_matmul_cuda_targets(a_shape, n) == (INT_LARGE_M if hopper else set())


@pytest.mark.parametrize("case", ["int4", "K not a multiple of 8", "N not a multiple of 8",
                                  "N odd", "no rows", "more rows, K not a multiple of 16",
                                  "more rows, N not a multiple of 16"])
def test_int_matmul_other_cases_use_xla_dot(case, hopper):
    a_shape, n, dtype = (16, 256), 64, jnp.int8
    more_rows = int_lowering.KERNEL_MAX_ROWS + 1
    if case == "int4":
        dtype = jnp.int4
    elif case == "K not a multiple of 8":
        a_shape = (16, 100)
    elif case == "N not a multiple of 8":
        n = 68
    elif case == "N odd":
        n = 33
    elif case == "no rows":
        a_shape = (0, 256)
    elif case == "more rows, K not a multiple of 16":
        a_shape = (more_rows, 104)
    else:
        a_shape, n = (more_rows, 256), 72
    assert int_matmul_cuda_targets(a_shape, n, dtype) == set()
