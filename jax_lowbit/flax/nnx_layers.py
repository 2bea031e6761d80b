"""QuantLinear: an nnx.Module called like nnx.Linear, holding a QuantizedWeight."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import jax_lowbit
from jax_lowbit.quantized_weight import QuantizedWeight
from jax_lowbit.validation import check_float_dtype


class QuantizedArray(nnx.Variable):
    """The packed arrays of a quantized weight. Not an ``nnx.Param``: quantized
    weights are constants, so ``nnx.grad`` and optimizers leave them out."""


class QuantLinear(nnx.Module):
    """``y = x @ W + b`` with ``W`` a QuantizedWeight of shape (in_features, out_features).

    Called like ``nnx.Linear``: input (..., in_features), output
    (..., out_features). ``dtype`` is the computation dtype (bfloat16,
    float16 or float32); None computes in x's dtype. The bias, if any, is an
    ``nnx.Param`` kept in its own dtype and added in the computation dtype.
    """

    def __init__(self, weight: QuantizedWeight, bias=None, *, dtype=None):
        if not isinstance(weight, QuantizedWeight):
            raise TypeError(f"QuantLinear: expected a QuantizedWeight, got {type(weight).__name__}")
        if dtype is not None:
            check_float_dtype("QuantLinear dtype", dtype)
        self.in_features, self.out_features = weight.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"QuantLinear: bias must have shape ({self.out_features},), "
                             f"got {tuple(bias.shape)}")
        self.codes = QuantizedArray(weight.codes)
        self.scales = QuantizedArray(weight.scales)
        self.offsets = None if weight.offsets is None else QuantizedArray(weight.offsets)
        self.bits = weight.bits
        self.group_size = weight.group_size
        self.symmetric = weight.symmetric
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))
        self.dtype = dtype

    @classmethod
    def from_linear(cls, linear: nnx.Linear, bits: int = 4, group_size: int = 128,
                    symmetric: bool = True, sparsity=None, **quantize_kwargs) -> "QuantLinear":
        """Quantizes a trained ``nnx.Linear`` (round to nearest, no data needed)."""
        if sparsity is not None:
            raise NotImplementedError(
                f"sparsity={sparsity!r}: the 2:4 sparse format is not implemented yet")
        if not isinstance(linear, nnx.Linear):
            raise TypeError(f"from_linear: expected an nnx.Linear, got {type(linear).__name__}")
        weight = jax_lowbit.quantize(linear.kernel[...], bits, group_size, symmetric=symmetric,
                                     **quantize_kwargs)
        bias = None if linear.bias is None else linear.bias[...]
        return cls(weight, bias, dtype=linear.dtype)

    @property
    def weight(self) -> QuantizedWeight:
        """The layer's QuantizedWeight."""
        return QuantizedWeight(
            self.codes[...], self.scales[...],
            None if self.offsets is None else self.offsets[...],
            (self.in_features, self.out_features), self.bits, self.group_size, self.symmetric)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        y = jax_lowbit.matmul(x, self.weight)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y
