"""Linen: run a trained model that uses ``nn.Dense`` with quantized weights,
without changing its definition.

    qparams = quantize_params(params, bits=4)
    with quantized_dense():
        y = model.apply({"params": qparams}, x)      # also under jax.jit
"""

from __future__ import annotations

import contextlib
import dataclasses
import re

import flax
import jax.numpy as jnp
from flax import linen as nn

import jax_lowbit
from jax_lowbit.flax import partition_metadata
from jax_lowbit.quantized_weight import QuantizedWeight
from jax_lowbit.validation import check_format_options, k_misfit


def _is_dense_params(node) -> bool:
    if not isinstance(node, dict) or "kernel" not in node or not set(node) <= {"kernel", "bias"}:
        return False
    kernel = nn.meta.unbox(node["kernel"])
    return hasattr(kernel, "ndim") and kernel.ndim == 2


def _boxed_like(qw: QuantizedWeight, box) -> QuantizedWeight:
    """``qw`` with its arrays in boxes like the kernel's (``nn.with_partitioning``):
    the kernel's (K, N) names on the codes, scales, offsets and 2:4 metadata."""
    if not isinstance(box, nn.Partitioned):
        return qw
    scales = (box.replace(names=partition_metadata.single_group_names(box.names))
              if qw.group_size == -1 else box)
    return dataclasses.replace(
        qw, codes=box.replace_boxed(qw.codes), scales=scales.replace_boxed(qw.scales),
        offsets=None if qw.offsets is None else scales.replace_boxed(qw.offsets),
        metadata=None if qw.metadata is None else box.replace_boxed(qw.metadata))


def quantize_params(params, *, bits: int, group_size: int = 128, symmetric: bool = True,
                    where=None, **quantize_kwargs):
    """Replaces the 2-D ``kernel`` of every Dense-shaped params dict with a QuantizedWeight.

    ``where``: None for all, a regex searched in the "/"-joined params path
    (e.g. "Dense_0"), or a predicate on that path. Kernels whose K does not fit
    the format stay float. A kernel boxed by ``nn.with_partitioning`` gives its
    names to the packed arrays (``nn.get_partition_spec`` reads them). Returns a
    new params tree.
    """
    sparsity = quantize_kwargs.get("sparsity")
    check_format_options(bits, group_size, quantize_kwargs.get("scale_dtype", "bfloat16"),
                         sparsity)
    pattern = re.compile(where) if isinstance(where, str) else None

    def selected(path: str) -> bool:
        if where is None:
            return True
        return pattern.search(path) is not None if pattern else bool(where(path))

    def walk(node, path):
        if not isinstance(node, dict):
            return node
        if _is_dense_params(node) and selected(path):
            kernel = nn.meta.unbox(node["kernel"])
            if k_misfit(kernel.shape[0], bits, group_size, sparsity):
                return dict(node)
            qw = jax_lowbit.quantize(kernel, bits, group_size, symmetric=symmetric,
                                     **quantize_kwargs)
            return {**node, "kernel": _boxed_like(qw, node["kernel"])}
        return {key: walk(child, f"{path}/{key}" if path else str(key))
                for key, child in node.items()}

    return walk(flax.core.unfreeze(params), "")


def _dense_interceptor(next_fun, args, kwargs, context):
    module = context.module
    if not isinstance(module, nn.Dense) or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    kernel = nn.meta.unbox(module.get_variable("params", "kernel"))
    if not isinstance(kernel, QuantizedWeight):
        return next_fun(*args, **kwargs)
    (x,) = args
    dtype = module.dtype if module.dtype is not None else jnp.asarray(x).dtype
    y = jax_lowbit.matmul(jnp.asarray(x, dtype), kernel)
    if module.use_bias:
        y = y + nn.meta.unbox(module.get_variable("params", "bias")).astype(y.dtype)
    return y


@contextlib.contextmanager
def quantized_dense():
    """Within this context, ``nn.Dense`` layers whose kernel is a QuantizedWeight
    run ``jax_lowbit.matmul``; others run unchanged."""
    with nn.intercept_methods(_dense_interceptor):
        yield
