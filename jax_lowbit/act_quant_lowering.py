"""Platform lowerings of act_quant_matmul (W8A8, W4A8; docs/formats.md).

CPU: one C++ handler quantizes x and computes the product
(cc/cpu/act_quant_matmul.cc); x, scales and offsets cross as float32.
CUDA: a pre-pass kernel quantizes x (cc/cuda/quantize_rows.cu), then
 - on sm_90 GPUs, from LARGE_M_MIN_ROWS rows on, with K a multiple of 128
   and N of 8: the wgmma s8 kernel (cc/cuda/act_quant_gemm_large_m.cu),
   tiles of 128 rows x 128 columns; for weights with integer group scales
   and N a multiple of 16 its integer-scale form (one int32 sum over all of
   K, the multiples applied to the A registers);
 - else the int8 mma.sync kernel (cc/cuda/act_quant_gemm.cu) reads the packed
   codes in place: every M with groups (CTAs of 16 rows; the row blocks of
   a column strip run together and share its codes through L2), and M <= 32
   with one group;
 - else (one group (group_size -1) and M > 32, or K not a multiple of 32):
   the codes are widened to an int8 (K, N) matrix and XLA's integer dot
   takes the product, the one-group epilogue follows in XLA.

Both are partitioned with matmul's rules, K whole on every device
(partitioning.act_quant_matmul_plan).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_lowbit import _extension, formats, int_lowering, partitioning
from jax_lowbit.act_quant_primitives import act_quant_matmul_p
from jax_lowbit.lowering import _attributes, _require_cuda
from jax_lowbit.primitives import WeightFormat

# Rows up to which one-group weights take the mma.sync kernel (above: the
# wgmma kernel on sm_90, else XLA's integer dot).
KERNEL_ROWS = 32
# K rows of one kernel step (the k of mma.m16n8k32); N columns of one 16-byte load.
KERNEL_K_MULTIPLE = 32
KERNEL_N_MULTIPLE = 4


def _groups(fmt: WeightFormat) -> int:
    k = fmt.shape[0]
    return k // formats.group_rows(fmt.group_size, k)


def _act_quant_matmul_cpu(x, *weight, fmt: WeightFormat):
    k, n = fmt.shape
    codes, scales, offsets, _ = fmt.split(weight)  # dense: no metadata
    scales = scales.astype(jnp.float32)
    # The handler reads no offsets for symmetric weights; the slot holds the scales.
    offsets = scales if offsets is None else offsets.astype(jnp.float32)
    rows = x.reshape(math.prod(x.shape[:-1]), k).astype(jnp.float32)
    y = jax.ffi.ffi_call("jax_lowbit_act_quant_matmul",
                         jax.ShapeDtypeStruct((rows.shape[0], n), jnp.float32))(
        rows, codes, scales, offsets, symmetric=fmt.symmetric, **_attributes(fmt))
    return y.reshape(x.shape[:-1] + (n,)).astype(x.dtype)


def _quantize_rows(rows, group_rows: int, groups: int, interleave_bits: int = 0):
    """The CUDA pre-pass: xq (M, K) int8, s (M,) float32, t (G, M) int32.

    ``interleave_bits`` 4 or 8 stores each 32-element block of xq's rows in the
    wgmma kernel's order for such codes (cc/cuda/quantize_rows.cu); 0 in K order.
    """
    m, k = rows.shape
    return jax.ffi.ffi_call("jax_lowbit_quantize_rows", (
        jax.ShapeDtypeStruct((m, k), jnp.int8), jax.ShapeDtypeStruct((m,), jnp.float32),
        jax.ShapeDtypeStruct((groups, m), jnp.int32)))(
        rows, group_rows=np.int64(group_rows), interleave_bits=np.int64(interleave_bits))


# The wgmma kernel's stage (128 rows of K: one 128-byte row of xq) and the N
# multiple of its TMA scale loads and paired stores.
LARGE_M_K_MULTIPLE = 128
LARGE_M_N_MULTIPLE = 8
# Above 32 rows: at 64 the mma.sync kernel (four row blocks) took 214 us a
# suite pass of W4A8 g128 where the wgmma kernel took 177 (docs/perf.md v13).
LARGE_M_MIN_ROWS = KERNEL_ROWS + 1


def uses_large_m_kernel(fmt: WeightFormat, rows: int) -> bool:
    """Whether a CUDA act_quant_matmul of ``rows`` rows runs the wgmma s8 kernel (sm_90)."""
    k, n = fmt.shape
    return (LARGE_M_MIN_ROWS <= rows and k > 0 and k % LARGE_M_K_MULTIPLE == 0
            and n % LARGE_M_N_MULTIPLE == 0 and _extension.cuda_devices_are_hopper())


def uses_gemm_kernel(fmt: WeightFormat, rows: int) -> bool:
    """Whether a CUDA act_quant_matmul of ``rows`` rows runs the int8 tensor-core kernel."""
    k = fmt.shape[0]
    if k % KERNEL_K_MULTIPLE:  # only one group spans such a K: every group size is a multiple
        return False
    return _groups(fmt) > 1 or rows <= KERNEL_ROWS


def _gemm_kernel(rows, weight, fmt: WeightFormat, target: str, interleave_bits: int = 0):
    """One of the two GEMM targets (their arguments are the same; the wgmma
    kernel's xq is interleaved for the weight's bits)."""
    k, n = fmt.shape
    codes, scales, offsets, _ = fmt.split(weight)  # dense: no metadata
    # The mma.sync kernel loads four columns at once: pad N (a copy of the
    # weight, only for N not a multiple of 4; the wgmma kernel is only given N
    # a multiple of 8). Padded columns have zero scales and are dropped.
    pad = -n % KERNEL_N_MULTIPLE
    if pad:
        codes, scales = (jnp.pad(a, [(0, 0), (0, pad)]) for a in (codes, scales))
        offsets = None if offsets is None else jnp.pad(offsets, [(0, 0), (0, pad)])
    xq, s, t = _quantize_rows(rows, formats.group_rows(fmt.group_size, k), _groups(fmt),
                              interleave_bits)
    # The kernel reads no offsets for symmetric weights; the slot holds the scales.
    y = jax.ffi.ffi_call(target,
                         jax.ShapeDtypeStruct((rows.shape[0], n + pad), rows.dtype))(
        xq, s, t, codes, scales, scales if offsets is None else offsets,
        symmetric=fmt.symmetric, **_attributes(fmt))
    return y[:, :n] if pad else y


# The multiples' TMA rows are N bytes apart, which TMA needs a multiple of 16.
INTEGER_SCALES_N_MULTIPLE = 16


def uses_integer_scales_kernel(fmt: WeightFormat, rows: int) -> bool:
    """Whether a CUDA act_quant_matmul of ``rows`` rows runs the wgmma kernel's
    integer-scale form (weights of ``quantize(..., integer_group_scales=True)``)."""
    return (fmt.integer_group_scales and uses_large_m_kernel(fmt, rows)
            and fmt.shape[1] % INTEGER_SCALES_N_MULTIPLE == 0)


def _integer_scales_kernel(rows, weight, fmt: WeightFormat):
    """Integer group scales: the pre-pass's launch also derives each column's
    scale c = max_g scale / 16 and the multiples scale / c (integers 0..16 by
    docs/formats.md's rule) as uint8; the kernel forms the int8 weights (code -
    8) * m in registers."""
    codes, scales, _, _ = fmt.split(weight)  # int4 symmetric: no offsets, no metadata
    xq, s, column, multiples = _quantize_rows_integer_scales(rows, scales, fmt.bits)
    return jax.ffi.ffi_call("jax_lowbit_act_quant_gemm_integer_scales",
                            jax.ShapeDtypeStruct((rows.shape[0], fmt.shape[1]), rows.dtype))(
        xq, s, codes, multiples, column, group_size=np.int64(fmt.group_size))


def _quantize_rows_integer_scales(rows, scales, interleave_bits: int):
    """The CUDA pre-pass (xq, s; one sum over K, its group sums unread) and in
    the same launch, from a weight's float32 scales (G, N), the column scales
    (N,) float32 and the multiples (G, N) uint8."""
    (m, k), (groups, n) = rows.shape, scales.shape
    xq, s, _, column, multiples = jax.ffi.ffi_call("jax_lowbit_quantize_rows_integer_scales", (
        jax.ShapeDtypeStruct((m, k), jnp.int8), jax.ShapeDtypeStruct((m,), jnp.float32),
        jax.ShapeDtypeStruct((1, m), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.float32),
        jax.ShapeDtypeStruct((groups, n), jnp.uint8)))(
        rows, scales, group_rows=np.int64(k), interleave_bits=np.int64(interleave_bits))
    return xq, s, column, multiples


def _one_group_integer_dot(rows, weight, fmt: WeightFormat):
    """One group: xq @ (codes - 2^(bits-1)) as one integer dot, then the spec's epilogue."""
    k, _ = fmt.shape
    codes, scales, offsets, _ = fmt.split(weight)  # dense: no metadata
    xq, s, t = _quantize_rows(rows, k, 1)
    zero = formats.symmetric_offset(fmt.bits)
    q = (formats.unpack_codes(codes, fmt.bits).astype(jnp.int32) - zero).astype(jnp.int8)
    p = int_lowering.xla_integer_dot(xq, q)
    scale = scales[0].astype(jnp.float32)
    if fmt.symmetric:
        term = p.astype(jnp.float32) * scale
    else:
        t = t[0][:, None]
        term = ((p + zero * t).astype(jnp.float32) * scale
                + t.astype(jnp.float32) * offsets[0].astype(jnp.float32))
    return (term * s[:, None]).astype(rows.dtype)


def _act_quant_matmul_cuda(x, *weight, fmt: WeightFormat):
    _require_cuda()
    k, n = fmt.shape
    rows = x.reshape(math.prod(x.shape[:-1]), k)
    if uses_integer_scales_kernel(fmt, rows.shape[0]):
        y = _integer_scales_kernel(rows, weight, fmt)
    elif uses_large_m_kernel(fmt, rows.shape[0]):
        y = _gemm_kernel(rows, weight, fmt, "jax_lowbit_act_quant_gemm_large_m", fmt.bits)
    elif uses_gemm_kernel(fmt, rows.shape[0]):
        y = _gemm_kernel(rows, weight, fmt, "jax_lowbit_act_quant_gemm")
    else:
        y = _one_group_integer_dot(rows, weight, fmt)
    return y.reshape(x.shape[:-1] + (n,))


partitioning.register_partitioned_lowerings(
    act_quant_matmul_p, partitioning.act_quant_matmul_plan, partitioning.matmul_rule,
    cpu=_act_quant_matmul_cpu, cuda=_act_quant_matmul_cuda)
