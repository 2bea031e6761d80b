"""GPTQ and AWQ checkpoints, built here with each project's own packing, import bit-exactly."""

import jax.numpy as jnp
import numpy as np
import pytest

import jax_lowbit
from jax_lowbit.importers import AWQ_ORDER, load_awq, load_bitnet, load_gptq, load_hqq


def _pack_along(values, bits, axis, order=None):
    """The projects' packers: element order[i] of each block of 32/bits goes to field i."""
    per_word = 32 // bits
    v = np.moveaxis(np.asarray(values, np.uint32), axis, 0)
    v = v.reshape(v.shape[0] // per_word, per_word, *v.shape[1:])
    words = np.zeros((v.shape[0],) + v.shape[2:], np.uint32)
    for i in range(per_word):
        words |= v[:, order[i] if order else i] << np.uint32(bits * i)
    return np.moveaxis(words.view(np.int32), 0, axis)


def _random_layer(rng, k, n, bits, groups, zero_low=0):
    codes = rng.integers(0, 1 << bits, size=(k, n))
    zeros = rng.integers(zero_low, (1 << bits) + zero_low, size=(groups, n))
    scales = rng.uniform(1e-3, 5e-2, size=(groups, n)).astype(np.float16)
    return codes, zeros, scales


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_bit_exact(bits, act_order, rng):
    k, n, group = 512, 64, 128
    groups = k // group
    # Stored as zero - 1 in a bits-wide field: zeros 1 .. 2^bits.
    codes, zeros, scales = _random_layer(rng, k, n, bits, groups, zero_low=1)
    g_idx = np.arange(k) // group
    if act_order:  # GPTQ's desc_act: rows quantized in a permuted order
        g_idx = g_idx[rng.permutation(k)]
    qweight = _pack_along(codes, bits, axis=0)
    qzeros = _pack_along(zeros - 1, bits, axis=1)  # stored as zero - 1
    weight, permutation = load_gptq(qweight, qzeros, scales, g_idx, bits=bits)
    # GPTQ's own dequant, in float16: scales[g_idx] * (q - (qzeros + 1)).
    source = (scales[g_idx] * (codes - zeros[g_idx]).astype(np.float16)).astype(np.float16)
    assert (permutation is None) != act_order
    rows = permutation if act_order else np.arange(k)
    got = np.asarray(weight.dequantize(jnp.float16))
    np.testing.assert_array_equal(got.view(np.uint16), source[rows].view(np.uint16))
    # And the product: x @ W == x[..., permutation] @ weight (W exact, before float16 rounding).
    x = rng.normal(size=(3, k)).astype(np.float32)
    want = x @ (scales.astype(np.float64)[g_idx] * (codes - zeros[g_idx]))
    y = np.asarray(jax_lowbit.matmul(jnp.asarray(x[:, rows]), weight))
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_awq_bit_exact(rng):
    k, n, group = 256, 64, 128
    codes, zeros, scales = _random_layer(rng, k, n, 4, k // group)
    qweight = _pack_along(codes, 4, axis=1, order=AWQ_ORDER)
    qzeros = _pack_along(zeros, 4, axis=1, order=AWQ_ORDER)
    weight = load_awq(qweight, qzeros, scales)
    g_idx = np.arange(k) // group
    source = (scales[g_idx] * (codes - zeros[g_idx]).astype(np.float16)).astype(np.float16)
    got = np.asarray(weight.dequantize(jnp.float16))
    np.testing.assert_array_equal(got.view(np.uint16), source.view(np.uint16))


def test_bad_checkpoints(rng):
    codes, zeros, scales = _random_layer(rng, 256, 32, 4, 2)
    qweight, qzeros = _pack_along(codes, 4, 0), _pack_along(zeros, 4, 1)
    with pytest.raises(ValueError, match="g_idx"):
        load_gptq(qweight, qzeros, scales, np.zeros(256, int))
    with pytest.raises(ValueError, match="groups"):
        load_gptq(qweight, qzeros, scales[:1].repeat(3, 0)[:, :32])
    with pytest.raises(ValueError, match="4-bit"):
        load_awq(qweight, qzeros, scales, bits=2)


def _hqq_pack_u8(codes, bits):
    """HQQ's BitPack.pack_{bits}bit_u8: row slices j = 0.. go to ever lower fields."""
    parts = np.split(np.asarray(codes, np.uint8), 8 // bits, axis=0)
    packed = np.zeros_like(parts[0])
    for j, part in enumerate(parts):
        packed |= part << np.uint8(8 - bits * (j + 1))
    return packed


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [64, 256])
def test_hqq_bit_exact(bits, group_size, rng):
    n, k = 48, 256  # torch layout (out, in)
    rows = n * k // group_size
    codes = rng.integers(0, 1 << bits, size=(rows, group_size))
    scale = rng.uniform(1e-3, 5e-2, size=(rows, 1)).astype(np.float16)
    zero = rng.uniform(0, (1 << bits) - 1, size=(rows, 1)).astype(np.float16)  # float zeros
    meta = dict(nbits=bits, group_size=group_size, axis=1, shape=(n, k), scale=scale, zero=zero,
                packing=f"{bits}bit_u8")
    weight = load_hqq(_hqq_pack_u8(codes, bits), meta)
    # HQQ's dequant in float32: ((W_q - zero) * scale).reshape(shape); ours is its transpose.
    source = ((codes.astype(np.float32) - zero.astype(np.float32)) * scale.astype(np.float32))
    source = source.reshape(n, k).T
    got = np.asarray(weight.dequantize(jnp.float32))
    np.testing.assert_array_equal(got.view(np.uint32), source.view(np.uint32))


def test_hqq_axis0_refused(rng):
    with pytest.raises(ValueError, match="axis=0"):
        load_hqq(np.zeros((4, 64), np.uint8), dict(nbits=4, group_size=64, axis=0, shape=(8, 64),
                                                   scale=np.ones(8), zero=np.ones(8)))


def test_bitnet_bit_exact(rng):
    n, k = 64, 256  # torch layout (out, in)
    ternary = rng.integers(-1, 2, size=(n, k))
    rows = n // 4
    # transformers' pack_weights: slice i of the rows goes to bits 2i, values + 1.
    packed = np.zeros((rows, k), np.uint8)
    for i in range(4):
        packed |= (ternary[i * rows:(i + 1) * rows] + 1).astype(np.uint8) << np.uint8(2 * i)
    weight_scale = np.float32(rng.uniform(5, 50))
    weight = load_bitnet(packed, np.array([weight_scale]))
    source = (ternary.astype(np.float32) / weight_scale).T  # BitLinear: w / weight_scale
    got = np.asarray(weight.dequantize(jnp.float32))
    np.testing.assert_array_equal(got.view(np.uint32), source.view(np.uint32))
    assert weight.bits == 2 and weight.symmetric and weight.group_size == -1
    with pytest.raises(ValueError, match="ternary"):
        load_bitnet(np.full((rows, k), 0xFF, np.uint8), np.array([1.0]))
