"""Flax integration: quantized layers and training-free conversion of trained models.

NNX: ``QuantLinear`` and ``quantize_model``. Linen: ``jax_lowbit.flax.linen``.
Needs flax (``pip install "jax-lowbit[flax]"``).
"""

from jax_lowbit.flax.convert import ConversionSummary, quantize_model
from jax_lowbit.flax.nnx_layers import QuantLinear, QuantizedArray

__all__ = ["ConversionSummary", "QuantLinear", "QuantizedArray", "quantize_model"]
