"""Platform lowerings of the primitives to the FFI targets.

CPU: the C++ handlers take float32 scales, offsets, x and y; dtype
conversions around the call are left to XLA, which fuses them.
CUDA: the dequantize kernel writes the weight in the output dtype; matmul is,
until the fused GEMM kernels land, that dequantize followed by XLA's dot.
Both handlers compute ``code * scale + offset``; symmetric weights get their
offset ``-2^(bits-1) * scale`` here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import mlir

from jax_lowbit import _extension, formats
from jax_lowbit.primitives import WeightFormat, contract, dequantize_p, matmul_p


def _handler_operands(weight, fmt: WeightFormat):
    codes, scales, offsets = fmt.split(weight)
    scales = scales.astype(jnp.float32)
    if offsets is None:
        offsets = -formats.symmetric_offset(fmt.bits) * scales
    return codes, scales, offsets.astype(jnp.float32)


def _attributes(fmt: WeightFormat) -> dict:
    return {"bits": np.int32(fmt.bits), "group_size": np.int64(fmt.group_size)}


def _dequantize_call(weight, fmt: WeightFormat, dtype):
    return jax.ffi.ffi_call("jax_lowbit_dequantize", jax.ShapeDtypeStruct(fmt.shape, dtype))(
        *_handler_operands(weight, fmt), **_attributes(fmt))


def _dequantize_cpu(*weight, fmt: WeightFormat, dtype):
    return _dequantize_call(weight, fmt, jnp.float32).astype(dtype)


def _matmul_cpu(x, *weight, fmt: WeightFormat):
    k, n = fmt.shape
    rows = x.reshape(-1, k).astype(jnp.float32)
    y = jax.ffi.ffi_call("jax_lowbit_matmul",
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


def _matmul_cuda(x, *weight, fmt: WeightFormat):
    _require_cuda()
    return contract("...k,kn->...n", x, _dequantize_call(weight, fmt, x.dtype))


def _register(primitive, fn, platform: str) -> None:
    mlir.register_lowering(primitive, mlir.lower_fun(fn, multiple_results=False),
                           platform=platform)


_register(dequantize_p, _dequantize_cpu, "cpu")
_register(matmul_p, _matmul_cpu, "cpu")
_register(dequantize_p, _dequantize_cuda, "cuda")
_register(matmul_p, _matmul_cuda, "cuda")
