"""numpy reference of matmul(x, qw, act_bits=8), written from docs/formats.md
("Quantized activations") and sharing no code with jax_lowbit.

Integer sums in int64 (exact), float steps in float32, one rounding each.
"""

import numpy as np

import spec_reference


def quantize_rows(x):
    """(xq int64 (M, K), s float32 (M,)): per-row absmax / 127, half-even rounding, clip."""
    x = np.asarray(x, np.float32)
    s = np.max(np.abs(x), axis=1) / np.float32(127)
    s[s < np.finfo(np.float32).tiny] = 0  # a subnormal scale counts as 0
    divisor = np.where(s == 0, np.float32(1), s)[:, None]
    xq = np.clip(np.rint(x / divisor), -127, 127).astype(np.int64)
    xq[s == 0] = 0
    return xq, s


def matmul(x, qw):
    """(y float32 (M, N) before the cast to x's dtype, its float32 magnitude (M, N)).

    The magnitude is s[m] times the sum over groups of the products a term is
    made of (|f32(p) scale|, or |f32(p + 2^(bits-1) t) scale| + |f32(t) offset|):
    another order of the group sum, or a product and sum fused into an fma,
    moves y by at most 2 G 2^-24 times it.
    """
    xq, s = quantize_rows(x)
    bits = qw.bits
    zero = 2 ** (bits - 1)
    q = spec_reference.decode_codes(np.asarray(qw.codes), bits) - zero
    k, n = q.shape
    rows = k if qw.group_size == -1 else qw.group_size
    scales = np.asarray(qw.scales, np.float32)
    offsets = None if qw.offsets is None else np.asarray(qw.offsets, np.float32)
    acc = np.zeros((xq.shape[0], n), np.float32)
    magnitude = np.zeros((xq.shape[0], n), np.float64)
    for g in range(k // rows):
        part = slice(g * rows, (g + 1) * rows)
        p = xq[:, part] @ q[part]
        assert np.all(np.abs(p) < 2**31), "the reference does not model int32 wrapping"
        if offsets is None:
            products = [p.astype(np.float32) * scales[g]]
        else:
            t = xq[:, part].sum(axis=1, keepdims=True)
            products = [(p + zero * t).astype(np.float32) * scales[g],
                        t.astype(np.float32) * offsets[g]]
        term = products[0] if offsets is None else products[0] + products[1]
        acc = acc + term
        magnitude += sum(np.abs(a.astype(np.float64)) for a in products)
    return acc * s[:, None], magnitude * s[:, None]
