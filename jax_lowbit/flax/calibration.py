"""Calibration for quantize_model: the input Hessians of dense layers, from running the model."""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import numpy as np
from flax import nnx

from jax_lowbit.gptq import input_hessian


class _HessianRecorder(nnx.Module):
    """Stands in for a dense layer while calibrating: adds ``x^T x`` of its input to a sum."""

    def __init__(self, layer, sums: dict, key):
        self.layer = layer
        self.sums = sums
        self.key = key

    def __call__(self, x):
        if isinstance(x, jax.core.Tracer):
            raise ValueError("quantize_model calibration: the model must run eagerly (it is "
                             "called outside jit; a model that jits inside cannot be recorded)")
        hessian = input_hessian(x)
        self.sums[self.key] = self.sums.get(self.key, 0.0) + hessian
        return self.layer(x)


def input_hessians(model, layers: list, calibration: Iterable, replace: Callable) -> dict:
    """``{path: sum x^T x}`` of the inputs ``x`` of ``layers`` ((path, module) pairs)
    over ``model(*args)`` for every ``args`` in ``calibration``.

    ``replace(path, module)`` puts a module at a path; the layers are back in
    place on return, also after an error.
    """
    sums: dict = {}
    for path, layer in layers:
        replace(path, _HessianRecorder(layer, sums, path))
    batches = 0
    try:
        for args in calibration:
            model(*(args if isinstance(args, tuple) else (args,)))
            batches += 1
    finally:
        for path, layer in layers:
            replace(path, layer)
    if batches == 0:
        raise ValueError("quantize_model: calibration has no batches")
    missing = [path for path, _ in layers if path not in sums]
    if missing:
        raise ValueError(f"quantize_model: calibration never reached layers {missing}")
    return sums
