"""Calibration for quantize_model: dense layers quantized with GPTQ one after
the other, in the order the model calls them, in one run of the model.

The run's batch is the calibration batch twice: in the first half every layer
is float, in the second every layer reached so far is quantized. So each layer
sees, on the same examples, the inputs the float model gives it and the ones
the layers quantized before it give it, and is quantized to bring the second
half's outputs close to the float model's (``gptq_quantize``'s ``float_cross``).
That needs a model whose examples do not interact along axis 0 (inference
mode); the run checks it.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_lowbit.gptq import input_hessian


class _QuantizingStandIn(nnx.Module):
    """Stands in for a dense layer during the calibration run: on its first call,
    quantizes it from the inputs of both halves of the batch; on every call,
    returns the float layer's output for the first half and the quantized one's
    for the second."""

    def __init__(self, layer, path, quantize: Callable):
        self.layer = layer
        self.path = path
        self.quantize = quantize
        self.quantized = nnx.data(None)  # the QuantLinear, from the first call

    def __call__(self, x):
        if isinstance(x, jax.core.Tracer):
            raise ValueError("quantize_model calibration: the model must run eagerly (it is "
                             "called outside jit; a model that jits inside cannot be recorded)")
        if x.shape[0] % 2:
            raise ValueError(f"quantize_model calibration: layer {self.path} got an input with "
                             f"{x.shape[0]} rows on axis 0, not the doubled batch")
        x_float, x_quantized = jnp.split(x, 2)
        if self.quantized is None:
            self.quantized = self.quantize(self.path, self.layer, input_hessian(x_quantized),
                                           input_hessian(x_quantized, x_float))
        return jnp.concatenate([self.layer(x_float), self.quantized(x_quantized)])


def _doubled(args: tuple) -> tuple:
    """``args`` with every array of at least one dim concatenated with itself on axis 0."""
    def double(leaf):
        if hasattr(leaf, "ndim") and leaf.ndim >= 1:
            return jnp.concatenate([leaf, leaf])
        return leaf
    return jax.tree.map(double, args)


def _check_first_half(reference, outputs) -> None:
    """Raises unless every output leaf is the doubled batch whose first half is ``reference``."""
    reference, outputs = jax.tree.leaves(reference), jax.tree.leaves(outputs)
    for ref, out in zip(reference, outputs, strict=True):
        ref, out = np.asarray(ref), np.asarray(out)
        if (ref.ndim == 0 or out.shape != (2 * ref.shape[0],) + ref.shape[1:]
                or not np.allclose(out[:ref.shape[0]], ref, rtol=1e-4,
                                   atol=1e-4 * float(np.max(np.abs(ref), initial=0.0)))):
            raise ValueError(
                "quantize_model calibration: running the model on the batch twice over did not "
                "give its outputs twice over; every array argument must have the batch on "
                "axis 0, and examples must not interact (inference mode)")


def quantize_in_call_order(model, layers: list, args: tuple, replace: Callable,
                           quantize: Callable) -> dict:
    """``{path: quantized layer}`` for ``layers`` ((path, module) pairs): one
    run of ``model(*args)`` on the doubled batch (module docstring), where the
    first call of each layer returns ``quantize(path, module, hessian,
    float_cross)`` of its quantized-half inputs.

    ``replace(path, module)`` puts a module at a path; the float layers are
    back in place on return, also after an error. A layer called several
    times in the run is quantized from its first call.
    """
    reference = model(*args)
    stand_ins = [(path, _QuantizingStandIn(layer, path, quantize)) for path, layer in layers]
    try:
        for path, stand_in in stand_ins:
            replace(path, stand_in)
        outputs = model(*_doubled(args))
    finally:
        for path, layer in layers:
            replace(path, layer)
    missing = [path for path, stand_in in stand_ins if stand_in.quantized is None]
    if missing:
        raise ValueError(f"quantize_model: calibration never reached layers {missing}")
    _check_first_half(reference, outputs)
    return {path: stand_in.quantized for path, stand_in in stand_ins}
