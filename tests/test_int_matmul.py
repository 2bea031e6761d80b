"""int_matmul: exact against numpy int64, scaled epilogue, transforms, export, errors."""

import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_lowbit

from kernel_checks import _poisoned

RANGES = {jnp.int8: (-128, 127), jnp.int4: (-8, 7)}


def _ints(rng, shape, dtype):
    """Random integers of ``dtype``'s range, with its extremes planted in every row."""
    lo, hi = RANGES[dtype]
    x = rng.integers(lo, hi + 1, size=shape)
    if x.size:
        flat = x.reshape(-1, shape[-1])
        flat[:, 0], flat[:, -1] = lo, hi
        flat[rng.random(flat.shape) < 0.1] = lo
        flat[rng.random(flat.shape) < 0.1] = hi
    return x.astype(np.int64)


def _operands(rng, a_shape, n, dtype):
    a, b = _ints(rng, a_shape, dtype), _ints(rng, (a_shape[-1], n), dtype)
    return a, b, jnp.asarray(a, dtype), jnp.asarray(b, dtype)


def _exact(y, want):
    assert y.dtype == jnp.int32 and y.shape == want.shape
    np.testing.assert_array_equal(np.asarray(y, np.int64), want)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int4])
@pytest.mark.parametrize("k", [1, 3, 7, 33, 64, 1000, 1001, 16384])
def test_exact_against_int64(dtype, k, rng):
    a, b, ja, jb = _operands(rng, (3, k), 5, dtype)
    _exact(jax_lowbit.int_matmul(ja, jb), a @ b)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int4])
@pytest.mark.parametrize("sign", [1, -1])
def test_extreme_sums_at_k_16384(dtype, sign):
    # Every product is the largest of its sign: 16384 * 128 * 128 = 2^28 for int8.
    lo, hi = RANGES[dtype]
    a = np.full((2, 16384), lo, np.int64)
    b = np.full((16384, 3), lo if sign > 0 else hi, np.int64)
    _exact(jax_lowbit.int_matmul(jnp.asarray(a, dtype), jnp.asarray(b, dtype)), a @ b)


@pytest.mark.parametrize("lead", [(), (1,), (5,), (2, 3), (1, 17)])
@pytest.mark.parametrize("n", [1, 33, 300])  # 300: more than one 256-column panel
def test_leading_dims_and_widths(lead, n, rng):
    a, b, ja, jb = _operands(rng, lead + (40,), n, jnp.int8)
    _exact(jax_lowbit.int_matmul(ja, jb), a @ b)


@pytest.mark.parametrize("a_shape, n", [((3, 0), 5), ((0, 4), 5), ((2, 0, 4), 3), ((3, 4), 0)])
def test_empty_dims(a_shape, n, rng):
    a, b, ja, jb = _operands(rng, a_shape, n, jnp.int8)
    _exact(jax_lowbit.int_matmul(ja, jb), a @ b)


def test_sums_past_int32_wrap_like_xla_dot():
    # K = 2^17 + 1024 products of 2^14 overflow int32; both platforms wrap modulo 2^32.
    k = 2**17 + 1024
    a, b = jnp.full((1, k), -128, jnp.int8), jnp.full((k, 2), -128, jnp.int8)
    y = jax_lowbit.int_matmul(a, b)
    wrapped = np.int64(k * 2**14 - 2**32)
    np.testing.assert_array_equal(np.asarray(y, np.int64), [[wrapped, wrapped]])
    xla = jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(xla))


# --- scaled products ---------------------------------------------------------

def _scales(rng, a_shape, n, dtype):
    a_scale = rng.uniform(0.5, 2.0, size=a_shape[:-1] + (1,)) * 1e-3
    b_scale = rng.uniform(0.5, 2.0, size=(n,)) * 1e-2
    return (np.asarray(jnp.asarray(a_scale, dtype), np.float64),
            np.asarray(jnp.asarray(b_scale, dtype), np.float64))


TOLERANCE = {jnp.float32: 1e-6, jnp.bfloat16: 2**-8, jnp.float16: 2**-10}


@pytest.mark.parametrize("out_dtype", [None, jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("which", ["both", "a", "b"])
@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int4])
def test_scaled_against_float64(out_dtype, which, dtype, rng):
    a, b, ja, jb = _operands(rng, (2, 3, 200), 24, dtype)
    a_scale, b_scale = _scales(rng, a.shape, 24, jnp.float32)
    kwargs = {"out_dtype": out_dtype}
    want = (a @ b).astype(np.float64)
    if which in ("both", "a"):
        kwargs["a_scale"], want = jnp.asarray(a_scale, jnp.float32), want * a_scale
    if which in ("both", "b"):
        kwargs["b_scale"], want = jnp.asarray(b_scale, jnp.float32), want * b_scale
    y = jax_lowbit.int_matmul(ja, jb, **kwargs)
    expected_dtype = jnp.bfloat16 if out_dtype is None else out_dtype
    assert y.dtype == jnp.dtype(expected_dtype) and y.shape == want.shape
    # Rounding to out_dtype: relative, and one subnormal step near 0 (float16).
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=TOLERANCE[expected_dtype],
                               atol=float(jnp.finfo(expected_dtype).smallest_subnormal))


@pytest.mark.parametrize("scale_dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_epilogue_is_float32_in_documented_order(scale_dtype, rng):
    # The documented arithmetic, bit for bit: out((float32(acc) * a_scale) * b_scale).
    a, b, ja, jb = _operands(rng, (4, 512), 16, jnp.int8)
    a_scale, b_scale = _scales(rng, a.shape, 16, scale_dtype)
    y = jax.jit(jax_lowbit.int_matmul, static_argnames="out_dtype")(
        ja, jb, a_scale=jnp.asarray(a_scale, scale_dtype),
        b_scale=jnp.asarray(b_scale, scale_dtype), out_dtype=jnp.bfloat16)
    f32 = (a @ b).astype(np.float32) * a_scale.astype(np.float32) * b_scale.astype(np.float32)
    np.testing.assert_array_equal(np.asarray(y).view(np.uint16),
                                  f32.astype(ml_dtypes.bfloat16).view(np.uint16))


# --- transforms ----------------------------------------------------------------

def test_jit(rng):
    a, b, ja, jb = _operands(rng, (6, 96), 10, jnp.int4)
    _exact(jax.jit(jax_lowbit.int_matmul)(ja, jb), a @ b)


@pytest.mark.parametrize("in_axis", [0, 1])
def test_vmap_over_a_is_one_call(in_axis, rng):
    a, b, ja, jb = _operands(rng, (4, 3, 64), 12, jnp.int8)
    a_scale, _ = _scales(rng, (4, 3, 64), 12, jnp.float32)
    a_scale = jnp.asarray(a_scale, jnp.float32)

    def f(x, s):
        return jax_lowbit.int_matmul(x, jb, a_scale=s, out_dtype=jnp.float32)

    batched = jax.vmap(f, in_axes=(in_axis, in_axis))
    y = batched(jnp.moveaxis(ja, 0, in_axis), jnp.moveaxis(a_scale, 0, in_axis))
    np.testing.assert_allclose(np.asarray(y, np.float64), (a @ b) * np.asarray(a_scale),
                               rtol=1e-6)
    jaxpr = jax.make_jaxpr(batched)(jnp.moveaxis(ja, 0, in_axis),
                                    jnp.moveaxis(a_scale, 0, in_axis))
    names = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    assert names.count("jax_lowbit_int_matmul") == 1 and "scan" not in names


def test_vmap_over_a_scale_only(rng):
    a, b, ja, jb = _operands(rng, (3, 64), 8, jnp.int8)
    scales = rng.uniform(0.5, 2.0, size=(5, 3, 1)).astype(np.float32)
    y = jax.vmap(lambda s: jax_lowbit.int_matmul(ja, jb, a_scale=s, out_dtype=jnp.float32))(
        jnp.asarray(scales))
    np.testing.assert_allclose(np.asarray(y, np.float64), (a @ b)[None] * scales, rtol=1e-6)


@pytest.mark.parametrize("a_batched", [True, False])
def test_vmap_over_b(a_batched, rng):
    a = _ints(rng, (3, 2, 48) if a_batched else (2, 48), jnp.int4)
    bs = _ints(rng, (3, 48, 7), jnp.int4)
    b_scales = rng.uniform(0.5, 2.0, size=(3, 7)).astype(np.float32)
    y = jax.vmap(lambda x, w, s: jax_lowbit.int_matmul(x, w, b_scale=s, out_dtype=jnp.float32),
                 in_axes=(0 if a_batched else None, 0, 0))(
        jnp.asarray(a, jnp.int4), jnp.asarray(bs, jnp.int4), jnp.asarray(b_scales))
    want = np.stack([(a[i] if a_batched else a) @ bs[i] * b_scales[i] for i in range(3)])
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int4])
def test_export_roundtrip(dtype, rng):
    a, b, ja, jb = _operands(rng, (4, 256), 16, dtype)
    a_scale, b_scale = _scales(rng, a.shape, 16, jnp.float32)

    def f(x, w, s, t):
        return jax_lowbit.int_matmul(x, w), jax_lowbit.int_matmul(x, w, a_scale=s, b_scale=t)

    args = (ja, jb, jnp.asarray(a_scale, jnp.float32), jnp.asarray(b_scale, jnp.float32))
    exported = jax.export.export(jax.jit(f), disabled_checks=jax_lowbit.export_disabled_checks())(
        *args)
    # CPU: our handler; CUDA: the int8 kernel (4 rows), XLA's integer dot for int4.
    on_cpu = jax.default_backend() == "cpu"
    assert ("custom_call @jax_lowbit_int_matmul" in exported.mlir_module()) == on_cpu
    on_kernel = not on_cpu and dtype == jnp.int8
    assert ("custom_call @jax_lowbit_int_gemm_small_m" in exported.mlir_module()) == on_kernel
    restored = jax.export.deserialize(exported.serialize())
    exact, scaled = restored.call(*args)
    _exact(exact, a @ b)
    np.testing.assert_array_equal(np.asarray(scaled, np.float32),
                                  np.asarray(f(*args)[1], np.float32))


def test_cuda_lowers_int4_to_xla_integer_dot(rng):
    # int4 on CUDA runs XLA's own s8 x s8 -> s32 dot (int_lowering.py says why);
    # tests/test_dispatch.py checks which int8 products take the kernel.
    _, _, ja, jb = _operands(rng, (4, 256), 16, jnp.int4)
    exported = jax.export.export(jax.jit(jax_lowbit.int_matmul), platforms=["cuda"])(ja, jb)
    text = exported.mlir_module()
    assert "custom_call" not in text
    assert "stablehlo.dot_general" in text and "tensor<4x256xi8>" in text
    assert "-> tensor<4x16xi32>" in text


# --- the CUDA int8 kernels (cc/cuda/int_gemm_small_m.cu for M <= 16,
# cc/cuda/int_gemm_large_m.cu above on sm_90) -----------------------------------------

KERNEL_MS = [1, 9, 16, 17, 64]  # 17 and 64: the large-M kernel on sm_90
# 104 and 16 + 8: K not a multiple of the small-M kernel's 32-row step (handled
# in the kernel; 24 and 104 go to XLA's dot above 16 rows: not multiples of
# 16); 100: not a multiple of 8 (XLA's dot). 16384: the largest LLM K.
KERNEL_KS = [24, 100, 104, 4096, 16384]
# 8: one lane's columns; 72 and 200: not a multiple of the CTA's 64 (nor of
# 16: XLA's dot above 16 rows); 33: odd (XLA's dot).
KERNEL_NS = [8, 33, 72, 200]
# The large-M kernel: 128-row tiles below 1024 rows, 256 at and above; rows
# not a multiple of the tile; K of one partial stage (16, 48), many stages, a
# partial last stage (4096 + 80); N not a multiple of its 128-column tile.
LARGE_M_MS = [17, 130, 300, 1024, 1100]
LARGE_M_KS = [16, 48, 4176, 16384]
LARGE_M_NS = [16, 48, 272]


def _poisoned_int_matmul(ja, jb):
    # No product here reaches INT32_MIN (|sum| <= K * 2^14 < 2^31).
    return _poisoned(jax_lowbit.int_matmul, ja.shape[:-1] + (jb.shape[1],), jnp.int32, ja, jb,
                     poison=np.iinfo(np.int32).min)


@pytest.mark.gpu
@pytest.mark.parametrize("m, k, n", [
    *itertools.product(KERNEL_MS, KERNEL_KS, KERNEL_NS),
    *itertools.product(LARGE_M_MS, LARGE_M_KS, LARGE_M_NS)])
def test_gpu_kernel_writes_every_element_exactly(m, k, n, rng):
    a, b, ja, jb = _operands(rng, (m, k), n, jnp.int8)
    np.testing.assert_array_equal(_poisoned_int_matmul(ja, jb), a @ b)


@pytest.mark.gpu
@pytest.mark.parametrize("m, k, n", [
    # The (strip pair, step) work spread over the H100's 132 CTA pairs:
    (16, 8192, 4160),  # 65 strips: the last pair's second strip is empty
    (3, 14336, 4096),  # 32 strip pairs of 448 steps, each shared by about 4 CTA pairs
    (9, 4096, 28672),  # 224 strip pairs, CTA pairs beginning inside them
    (5, 4096, 6144)])  # 48 strip pairs
def test_gpu_kernel_balanced_work_writes_every_element_exactly(m, k, n, rng):
    a, b, ja, jb = _operands(rng, (m, k), n, jnp.int8)
    np.testing.assert_array_equal(_poisoned_int_matmul(ja, jb), a @ b)


@pytest.mark.gpu
@pytest.mark.parametrize("lead", [(2, 3), (4, 1, 16)])
def test_gpu_kernel_leading_dims(lead, rng):
    a, b, ja, jb = _operands(rng, lead + (1024,), 144, jnp.int8)
    np.testing.assert_array_equal(_poisoned_int_matmul(ja, jb), a @ b)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64, 1024])  # 64, 1024: the large-M kernel (sm_90)
@pytest.mark.parametrize("sign", [1, -1])
def test_gpu_kernel_extreme_sums(m, sign):
    # Every product is the largest of its sign, 16384 * 2^14 = 2^28, in every
    # element; at 1 and 16 rows K is shared by many CTAs, which add in y.
    a = np.full((m, 16384), -128, np.int64)
    b = np.full((16384, 64), -128 if sign > 0 else 127, np.int64)
    got = _poisoned_int_matmul(jnp.asarray(a, jnp.int8), jnp.asarray(b, jnp.int8))
    np.testing.assert_array_equal(got, a @ b)


@pytest.mark.gpu
@pytest.mark.parametrize("m, n", [(1, 8), (17, 16)])  # each kernel
def test_gpu_kernel_sums_wrap_like_xla_dot(m, n):
    # As test_sums_past_int32_wrap_like_xla_dot, with shapes the kernels take.
    k = 2**17 + 1024
    a, b = jnp.full((m, k), -128, jnp.int8), jnp.full((k, n), -128, jnp.int8)
    np.testing.assert_array_equal(np.asarray(jax_lowbit.int_matmul(a, b), np.int64),
                                  np.full((m, n), k * 2**14 - 2**32))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [13, 300])
def test_gpu_kernel_runs_are_identical(m, rng):
    _, _, ja, jb = _operands(rng, (m, 4096), 4096, jnp.int8)
    f = jax.jit(jax_lowbit.int_matmul)
    first = np.asarray(f(ja, jb))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(f(ja, jb)), first)


# --- differentiation and bad input ---------------------------------------------------

def test_grad_through_scales_is_refused(rng):
    _, _, ja, jb = _operands(rng, (3, 32), 4, jnp.int8)

    def quantized_product(x):  # dynamic per-row quantization of a float x
        s = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127
        q = jnp.round(x / s).astype(jnp.int8)
        return jnp.sum(jax_lowbit.int_matmul(q, jb, a_scale=s, out_dtype=jnp.float32))

    with pytest.raises(TypeError, match="int_matmul is not differentiable"):
        jax.grad(quantized_product)(jnp.asarray(rng.normal(size=(3, 32)), jnp.float32))
    with pytest.raises(TypeError, match="int_matmul is not differentiable"):
        jax.grad(lambda s: jnp.sum(jax_lowbit.int_matmul(ja, jb, b_scale=s)))(jnp.ones(4))
    # Constant scales are fine: nothing is differentiated through the product.
    g = jax.grad(lambda s: jnp.sum(jax_lowbit.int_matmul(
        ja, jb, b_scale=jax.lax.stop_gradient(s), out_dtype=jnp.float32)))(jnp.ones(4))
    np.testing.assert_array_equal(np.asarray(g), 0.0)


A = jnp.ones((2, 64), jnp.int8)
B = jnp.ones((64, 8), jnp.int8)


@pytest.mark.parametrize("a, b, error, message", [
    (A, B.astype(jnp.int4), TypeError, "same dtype .both int8 or both int4.*int8 and b int4"),
    (A.astype(jnp.int4), B, TypeError, "same dtype"),
    (A.astype(jnp.float32), B, TypeError, "a must have dtype int8 or int4, got float32"),
    (A, B.astype(jnp.bfloat16), TypeError, "b must have dtype int8 or int4, got bfloat16"),
    (A.astype(jnp.int32), B.astype(jnp.int32), TypeError, "a must have dtype int8 or int4"),
    (A.astype(jnp.uint8), B.astype(jnp.uint8), TypeError, "got uint8"),
    (jnp.ones((2, 32), jnp.int8), B, ValueError, "last dimension must equal b's K=64"),
    (A, jnp.ones((64,), jnp.int8), ValueError, "b must be 2-D"),
    (A, jnp.ones((2, 64, 8), jnp.int8), ValueError, "b must be 2-D"),
    (jnp.int8(3), B, ValueError, "last dimension"),
])
def test_bad_operands(a, b, error, message):
    with pytest.raises(error, match=message):
        jax_lowbit.int_matmul(a, b)
    with pytest.raises(error, match=message):
        jax.jit(jax_lowbit.int_matmul)(a, b)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"a_scale": jnp.ones((2,))}, ValueError, r"a_scale .one per row of a. must have shape \(2, 1\)"),
    ({"a_scale": jnp.ones((1, 1))}, ValueError, r"must have shape \(2, 1\), got \(1, 1\)"),
    ({"a_scale": jnp.ones((2, 1), jnp.int32)}, TypeError, "a_scale .* must have dtype"),
    ({"b_scale": jnp.ones((1, 8))}, ValueError, r"b_scale .one per column of b. must have shape \(8,\)"),
    ({"b_scale": jnp.ones((8,), jnp.int16)}, TypeError, "b_scale .* must have dtype"),
    ({"b_scale": jnp.ones((8,)), "out_dtype": jnp.int8}, TypeError, "out_dtype must have dtype"),
    ({"out_dtype": jnp.float32}, ValueError, "exact int32 product; out_dtype=float32 needs scales"),
])
def test_bad_scales_and_out_dtype(kwargs, error, message):
    with pytest.raises(error, match=message):
        jax_lowbit.int_matmul(A, B, **kwargs)


def test_out_dtype_int32_without_scales_is_accepted(rng):
    a, b, ja, jb = _operands(rng, (2, 16), 3, jnp.int8)
    _exact(jax_lowbit.int_matmul(ja, jb, out_dtype=jnp.int32), a @ b)
