"""QuantLinear: an nnx.Module called like nnx.Linear, holding a QuantizedWeight."""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_lowbit
from jax_lowbit.flax import partition_metadata
from jax_lowbit.gptq import gptq_quantize
from jax_lowbit.quantized_weight import QuantizedWeight
from jax_lowbit.validation import check_float_dtype


class QuantizedArray(nnx.Variable):
    """The packed arrays of a quantized weight. Not an ``nnx.Param``: quantized
    weights are constants, so ``nnx.grad`` and optimizers leave them out."""


class QuantLinear(nnx.Module):
    """``y = x @ W + b`` with ``W`` a QuantizedWeight of shape (in_features, out_features).

    Called like ``nnx.Linear``: input (..., in_features), output
    (..., out_features), or (..., *output_shape) when the layer stands for an
    ``nnx.LinearGeneral`` with several output axes. ``dtype`` is the
    computation dtype (bfloat16, float16 or float32); None computes in x's
    dtype. The bias, if any, is an ``nnx.Param`` of shape (out_features,),
    kept in its own dtype and added in the computation dtype.
    ``input_permutation`` (from ``jax_lowbit.load_gptq`` with act-order)
    reorders the input features first: ``y = x[..., permutation] @ W + b``.
    ``kernel_metadata`` and ``bias_metadata`` are nnx.Linear's (e.g.
    ``{"out_sharding": ("embed", "mlp")}``, as ``nnx.with_partitioning`` sets):
    the kernel's names for its (K, N) dims go to the codes, scales, offsets and
    2:4 metadata, which split along K and N like the kernel (docs/sharding.md).
    """

    def __init__(self, weight: QuantizedWeight, bias=None, *, dtype=None, output_shape=None,
                 input_permutation=None, kernel_metadata: Mapping = MappingProxyType({}),
                 bias_metadata: Mapping = MappingProxyType({})):
        if not isinstance(weight, QuantizedWeight):
            raise TypeError(f"QuantLinear: expected a QuantizedWeight, got {type(weight).__name__}")
        if dtype is not None:
            check_float_dtype("QuantLinear dtype", dtype)
        self.in_features, self.out_features = weight.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"QuantLinear: bias must have shape ({self.out_features},), "
                             f"got {tuple(bias.shape)}")
        self.codes = QuantizedArray(weight.codes, **kernel_metadata)
        scale_metadata = (partition_metadata.single_group(kernel_metadata)
                          if weight.group_size == -1 else kernel_metadata)
        self.scales = QuantizedArray(weight.scales, **scale_metadata)
        self.offsets = (None if weight.offsets is None
                        else QuantizedArray(weight.offsets, **scale_metadata))
        # The 2:4 metadata rows follow the code words: split alike (docs/sharding.md).
        self.metadata = (None if weight.metadata is None
                         else QuantizedArray(weight.metadata, **kernel_metadata))
        self.bits = weight.bits
        self.group_size = weight.group_size
        self.symmetric = weight.symmetric
        self.sparsity = weight.sparsity
        self.integer_group_scales = weight.integer_group_scales
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias), **bias_metadata)
        self.dtype = dtype
        self.output_shape = None if output_shape is None else tuple(output_shape)
        if input_permutation is not None:
            input_permutation = np.asarray(input_permutation)
            if sorted(input_permutation.tolist()) != list(range(self.in_features)):
                raise ValueError("QuantLinear: input_permutation must be a permutation of "
                                 f"range({self.in_features})")
        self.input_permutation = (None if input_permutation is None else
                                  QuantizedArray(jnp.asarray(input_permutation, jnp.int32)))
        if self.output_shape is not None and math.prod(self.output_shape) != self.out_features:
            raise ValueError(f"QuantLinear: output_shape {self.output_shape} does not have "
                             f"{self.out_features} elements")

    @classmethod
    def from_linear(cls, linear: nnx.Linear, bits: int = 4, group_size: int = 128,
                    symmetric: bool = True, sparsity=None, **quantize_kwargs) -> "QuantLinear":
        """Quantizes a trained ``nnx.Linear`` (round to nearest, no data needed);
        ``sparsity="2:4"`` prunes it to 2:4 first (``jax_lowbit.quantize``)."""
        if not isinstance(linear, nnx.Linear):
            raise TypeError(f"from_linear: expected an nnx.Linear, got {type(linear).__name__}")
        return cls.from_module(linear, bits, group_size, symmetric, sparsity=sparsity,
                               **quantize_kwargs)

    @classmethod
    def from_module(cls, module, bits: int = 4, group_size: int = 128, symmetric: bool = True,
                    *, hessian=None, float_cross=None, **quantize_kwargs) -> "QuantLinear":
        """Quantizes an ``nnx.Linear``, or an ``nnx.LinearGeneral``/``nnx.Einsum`` whose
        contraction is a plain matmul over the last input axis (see ``dense_kernel``).
        The layer's sharding annotations carry over (``partition_metadata``).

        With ``hessian`` (the (K, K) ``sum x^T x`` of the layer's calibration
        inputs, ``jax_lowbit.gptq.input_hessian``; and optionally its
        ``float_cross``) the weight is quantized by
        ``jax_lowbit.gptq.gptq_quantize``, which takes the ``quantize_kwargs``;
        otherwise by ``jax_lowbit.quantize``.
        """
        kernel, bias, output_shape = dense_kernel(module)
        permutation = None
        if hessian is None:
            weight = jax_lowbit.quantize(kernel, bits, group_size, symmetric=symmetric,
                                         **quantize_kwargs)
        else:
            weight, permutation = gptq_quantize(kernel, hessian, bits, group_size,
                                                symmetric=symmetric, float_cross=float_cross,
                                                **quantize_kwargs)
        return cls(weight, bias, dtype=module.dtype, output_shape=output_shape,
                   input_permutation=permutation, **partition_metadata.dense_metadata(module))

    @property
    def weight(self) -> QuantizedWeight:
        """The layer's QuantizedWeight."""
        return QuantizedWeight(
            self.codes[...], self.scales[...],
            None if self.offsets is None else self.offsets[...],
            (self.in_features, self.out_features), self.bits, self.group_size, self.symmetric,
            None if self.metadata is None else self.metadata[...], self.sparsity,
            self.integer_group_scales)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        if self.input_permutation is not None:
            x = jnp.take(x, self.input_permutation[...], axis=-1)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        y = jax_lowbit.matmul(x, self.weight)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        if self.output_shape is not None:
            y = y.reshape(y.shape[:-1] + self.output_shape)
        return y


def _plain_matmul_einsum(spec: str) -> bool:
    """Whether an einsum ``"...k,kn->...n"`` (any letters) contracts the last input axis."""
    spec = spec.replace(" ", "")
    if "->" not in spec or spec.count(",") != 1:
        return False
    inputs, out = spec.split("->")
    lhs, rhs = inputs.split(",")
    if len(rhs) != 2 or not lhs:
        return False
    k, n = rhs
    return (lhs[-1] == k and k not in lhs[:-1] + out and n not in lhs
            and out == lhs[:-1] + n)


def dense_kernel(module):
    """(kernel (K, N), bias (N,) or None, output shape or None) of a dense layer.

    Raises ValueError for layers that are not a plain matmul over the last axis.
    """
    if isinstance(module, nnx.Linear):
        return module.kernel[...], None if module.bias is None else module.bias[...], None
    if isinstance(module, nnx.LinearGeneral):
        if (len(module.in_features) != 1 or tuple(module.axis) not in ((-1,),)
                or module.batch_axis):
            raise ValueError("LinearGeneral contracts more than the last axis")
        kernel = module.kernel[...]
        out = tuple(module.out_features)
        bias = None if module.bias is None else module.bias[...].reshape(-1)
        return kernel.reshape(kernel.shape[0], -1), bias, (out if len(out) > 1 else None)
    if isinstance(module, nnx.Einsum):
        kernel = module.kernel[...]
        if kernel.ndim != 2 or not _plain_matmul_einsum(module.einsum_str):
            raise ValueError(f"Einsum {module.einsum_str!r} is not a plain matmul")
        bias = None if module.bias is None else module.bias[...]
        if bias is not None and bias.shape != (kernel.shape[1],):
            raise ValueError(f"Einsum bias of shape {bias.shape} is not per output feature")
        return kernel, bias, None
    raise TypeError(f"not a dense layer: {type(module).__name__}")
