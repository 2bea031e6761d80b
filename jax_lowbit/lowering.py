"""Platform lowerings of the primitives to the FFI targets.

CPU: the C++ handlers take float32 scales, offsets, x and y; dtype
conversions around the call are left to XLA, which fuses them.
CUDA: matmul with int4/int2 codes and bf16/fp16 x runs a fused kernel. On
sm_90 GPUs dense weights from LARGE_M_MIN_ROWS rows on run the wgmma kernel
(gemm_large_m.cu), and 2:4 sparse weights from SPARSE_LARGE_M_MIN_ROWS rows
its sparse form (wgmma.mma_async.sp). Otherwise, up to 64
rows, one handler per format picks the kernel by M (cc/cuda/gemm_small_m.cu:
the small-M or mid-M kernel; gemm_sparse_small_m.cu for 2:4 sparse weights:
its direct or staged kernel). Everything else is the dequantize kernel
followed by XLA's dot. 2:4 sparse weights have targets of their own
("jax_lowbit_sparse_*"), which also read the metadata. The CPU and dequantize handlers compute
``code * scale + offset``; symmetric weights get their offset
``-2^(bits-1) * scale`` here.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from jax_lowbit import _extension, formats, partitioning
from jax_lowbit.primitives import WeightFormat, contract, dequantize_p, matmul_p


def _target(fmt: WeightFormat, name: str) -> str:
    """The FFI target ``name`` for the weight's format."""
    return f"jax_lowbit_sparse_{name}" if fmt.sparsity else f"jax_lowbit_{name}"


def _packed(codes, metadata) -> tuple:
    """The packed arrays a handler reads: the codes, and the 2:4 metadata if any."""
    return (codes,) if metadata is None else (codes, metadata)


def _handler_operands(weight, fmt: WeightFormat):
    codes, scales, offsets, metadata = fmt.split(weight)
    scales = scales.astype(jnp.float32)
    if offsets is None:
        offsets = -formats.symmetric_offset(fmt.bits) * scales
    return (*_packed(codes, metadata), scales, offsets.astype(jnp.float32))


def _attributes(fmt: WeightFormat) -> dict:
    return {"bits": np.int32(fmt.bits), "group_size": np.int64(fmt.group_size)}


def _dequantize_call(weight, fmt: WeightFormat, dtype):
    return jax.ffi.ffi_call(_target(fmt, "dequantize"), jax.ShapeDtypeStruct(fmt.shape, dtype))(
        *_handler_operands(weight, fmt), **_attributes(fmt))


def _dequantize_cpu(*weight, fmt: WeightFormat, dtype):
    return _dequantize_call(weight, fmt, jnp.float32).astype(dtype)


def _matmul_cpu(x, *weight, fmt: WeightFormat):
    k, n = fmt.shape
    rows = x.reshape(-1, k).astype(jnp.float32)
    y = jax.ffi.ffi_call(_target(fmt, "matmul"),
                         jax.ShapeDtypeStruct((rows.shape[0], n), jnp.float32))(
        rows, *_handler_operands(weight, fmt), **_attributes(fmt))
    return y.reshape(x.shape[:-1] + (n,)).astype(x.dtype)


def _require_cuda() -> None:
    if not _extension.has_cuda():
        raise RuntimeError(
            "jax_lowbit was built without its CUDA extension, so it cannot run on a CUDA "
            "device; reinstall with nvcc on PATH (or JAX_LOWBIT_CUDA=ON) to build it")


def _dequantize_cuda(*weight, fmt: WeightFormat, dtype):
    _require_cuda()
    return _dequantize_call(weight, fmt, dtype)


SMALL_M_MAX_ROWS = 64
# 2:4 sparse: direct kernel up to 32 rows, staged kernel 33..64 (where the
# sparse wgmma kernel does not take them: from 17 rows on sm_90).
SPARSE_SMALL_M_MAX_ROWS = 64


def _fused_kernels_take(fmt: WeightFormat, dtype, scale_dtype) -> bool:
    """The rule every fused matmul kernel shares: int4/int2 codes, bf16/fp16 x,
    scales exact in x's dtype, N a multiple of 4, K and N below 2^30.

    The kernels read scales in x's dtype. bfloat16 scales convert exactly to
    float16 (down to its smallest normal, 6.1e-5); other mixes would round the
    scales, so they take the dequantize + dot path, which rounds each weight once.
    """
    k, n = fmt.shape
    dtype, scale_dtype = jnp.dtype(dtype), jnp.dtype(scale_dtype)
    exact_scales = scale_dtype == dtype or (
        scale_dtype == jnp.dtype(jnp.bfloat16) and dtype == jnp.dtype(jnp.float16))
    return (fmt.bits in (2, 4)
            and dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and exact_scales
            and n % 4 == 0 and n < 2**30 and k < 2**30)


def uses_small_m_kernel(fmt: WeightFormat, dtype, scale_dtype, rows: int) -> bool:
    """Whether a CUDA matmul of ``rows`` rows of ``dtype`` runs a small-M kernel
    (the small-M or mid-M kernel, or for 2:4 sparse weights the direct or staged one)."""
    k, _ = fmt.shape
    # A K step of the kernels: 4 code word rows (of 16 rows of K each for 2:4).
    k_step = (formats.SPARSE_K_MULTIPLE if fmt.sparsity
              else 4 * formats.codes_per_word(fmt.bits))
    max_rows = SPARSE_SMALL_M_MAX_ROWS if fmt.sparsity else SMALL_M_MAX_ROWS
    return (_fused_kernels_take(fmt, dtype, scale_dtype) and 0 < rows <= max_rows
            and k % k_step == 0)


LARGE_M_K_MULTIPLE = 64  # a pipeline stage of the wgmma kernel
# From this many rows on, the wgmma kernel was faster than the small-M and
# mid-M kernels on the H100 (docs/perf.md), for dense and for 2:4 sparse
# weights; other GPUs keep those to 64 rows.
LARGE_M_MIN_ROWS = 17
SPARSE_LARGE_M_MIN_ROWS = 17


def uses_large_m_kernel(fmt: WeightFormat, dtype, scale_dtype, rows: int) -> bool:
    """Whether a CUDA matmul of ``rows`` rows runs the wgmma kernel (sm_90 only):
    dense weights from LARGE_M_MIN_ROWS rows, 2:4 sparse ones from
    SPARSE_LARGE_M_MIN_ROWS; K a multiple of 64 and N of 8."""
    k, n = fmt.shape
    min_rows = SPARSE_LARGE_M_MIN_ROWS if fmt.sparsity else LARGE_M_MIN_ROWS
    return (rows >= min_rows
            and _fused_kernels_take(fmt, dtype, scale_dtype)
            and k % LARGE_M_K_MULTIPLE == 0 and n % 8 == 0
            and _extension.cuda_devices_are_hopper())


def _matmul_cuda(x, *weight, fmt: WeightFormat):
    _require_cuda()
    k, n = fmt.shape
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    codes, scales, offsets, metadata = fmt.split(weight)
    if uses_large_m_kernel(fmt, x.dtype, scales.dtype, rows):
        target = _target(fmt, "gemm_large_m")
    elif uses_small_m_kernel(fmt, x.dtype, scales.dtype, rows):
        target = _target(fmt, "gemm_small_m")
    else:
        return contract("...k,kn->...n", x, _dequantize_call(weight, fmt, x.dtype))
    scales = scales.astype(x.dtype)
    # The kernels read no offsets for symmetric weights; the slot holds the scales.
    offsets = scales if offsets is None else offsets.astype(x.dtype)
    y = jax.ffi.ffi_call(target,
                         jax.ShapeDtypeStruct((rows, n), x.dtype))(
        x.reshape(rows, k), *_packed(codes, metadata), scales, offsets,
        symmetric=fmt.symmetric, **_attributes(fmt))
    return y.reshape(x.shape[:-1] + (n,))


partitioning.register_partitioned_lowerings(
    dequantize_p, partitioning.dequantize_plan, partitioning.dequantize_rule,
    cpu=_dequantize_cpu, cuda=_dequantize_cuda)
partitioning.register_partitioned_lowerings(
    matmul_p, partitioning.matmul_plan, partitioning.matmul_rule,
    cpu=_matmul_cpu, cuda=_matmul_cuda)
