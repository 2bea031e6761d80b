"""The packer, the spec reference and the handlers agree bit for bit."""

import jax.numpy as jnp
import numpy as np
import pytest

import jax_lowbit
from jax_lowbit import formats
from jax_lowbit.quantized_weight import QuantizedWeight

import spec_reference


# One column whose rows 0..P-1 hold codes 1, 2, 3, ... (mod 2^bits), and the
# word docs/formats.md says they pack into.
GOLDEN = {
    # int2: even rows (1,3,1,3,..) in bits 0..15, odd rows (2,0,2,0,..) in 16..31.
    2: ([1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0], 0x2222DDDD),
    # int4: rows 0,2,4,6 -> nibbles 0..3, rows 1,3,5,7 -> nibbles 4..7.
    4: ([1, 2, 3, 4, 5, 6, 7, 8], 0x86427531),
    # int8: rows 0,2 -> bytes 0,1; rows 1,3 -> bytes 2,3.
    8: ([0x11, 0x22, 0x33, 0x44], 0x44223311),
}


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_golden_word(bits):
    codes, word = GOLDEN[bits]
    packed = np.asarray(formats.pack_codes(jnp.array(codes, jnp.uint32)[:, None], bits))
    assert packed.shape == (1, 1)
    assert int(packed[0, 0]) == word
    np.testing.assert_array_equal(spec_reference.decode_codes(packed, bits)[:, 0], codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_matches_spec_decoder(bits, rng):
    per_word = 32 // bits
    codes = rng.integers(0, 1 << bits, size=(per_word * 12, 37))
    packed = np.asarray(formats.pack_codes(jnp.asarray(codes, jnp.uint32), bits))
    assert packed.dtype == np.uint32 and packed.shape == (12, 37)
    np.testing.assert_array_equal(spec_reference.decode_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_handler_decodes_random_words_as_spec(bits, group_size, symmetric, scale_dtype, rng):
    """Random words (every bit pattern), random scales: handler == spec decoder."""
    k, n = 128, 40
    groups = k // (k if group_size == -1 else group_size)
    words = rng.integers(0, 1 << 32, size=(k * bits // 32, n), dtype=np.uint64).astype(np.uint32)
    scales = jnp.asarray(rng.uniform(0.01, 2.0, size=(groups, n)), scale_dtype)
    offsets = None if symmetric else jnp.asarray(rng.normal(size=(groups, n)), scale_dtype)
    qw = QuantizedWeight(jnp.asarray(words), scales, offsets, (k, n), bits, group_size, symmetric)
    got = np.asarray(jax_lowbit.dequantize(qw, jnp.float32))
    want = spec_reference.dequantize_weight(qw)
    # float32 rounding of code*scale (up to 255*2) is the only difference; a
    # wrong code is off by at least one scale (>= 0.01).
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
