"""quantize_model: replaces the dense layers of a trained NNX model in place."""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Callable

from flax import nnx

from jax_lowbit.flax.calibration import quantize_in_call_order
from jax_lowbit.flax.nnx_layers import QuantLinear, dense_kernel
from jax_lowbit.validation import check_format_options, k_misfit

Path = tuple


@dataclasses.dataclass
class ConversionSummary:
    """What ``quantize_model`` converted: per layer (path, shape), and bytes before and after."""

    converted: list = dataclasses.field(default_factory=list)  # (path, (K, N), bytes before, after)
    skipped: list = dataclasses.field(default_factory=list)    # (path, reason)

    @property
    def bytes_before(self) -> int:
        return sum(row[2] for row in self.converted)

    @property
    def bytes_after(self) -> int:
        return sum(row[3] for row in self.converted)

    def __str__(self) -> str:
        lines = [f"{'layer':40s} {'(K, N)':>14s} {'bytes':>12s} -> {'bytes':>10s}"]
        for path, shape, before, after in self.converted:
            lines.append(f"{_path_name(path):40s} {str(shape):>14s} {before:12,d} -> {after:10,d}")
        for path, reason in self.skipped:
            lines.append(f"{_path_name(path):40s} skipped: {reason}")
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else 0.0
        lines.append(f"{len(self.converted)} layers: {self.bytes_before:,d} -> "
                     f"{self.bytes_after:,d} bytes ({ratio:.2f}x smaller)")
        return "\n".join(lines)


def _path_name(path: Path) -> str:
    return "/".join(str(p) for p in path) or "<root>"


def _selector(where) -> Callable[[Path], bool]:
    if where is None:
        return lambda path: True
    if isinstance(where, str):
        pattern = re.compile(where)
        return lambda path: pattern.search(_path_name(path)) is not None
    if callable(where):
        return lambda path: bool(where(_path_name(path)))
    raise TypeError("where must be None, a regex string or a predicate on the module path")


def _set_child(parent, key, value) -> None:
    if isinstance(key, int) or not hasattr(parent, "__dict__") or isinstance(parent, dict):
        parent[key] = value
    else:
        setattr(parent, key, value)


def _child(parent, key):
    if isinstance(key, int) or isinstance(parent, dict):
        return parent[key]
    return getattr(parent, key)


def _replace(model, path: Path, module) -> None:
    parent = model
    for key in path[:-1]:
        parent = _child(parent, key)
    _set_child(parent, path[-1], module)


def quantize_model(model, *, bits: int, group_size: int = 128, symmetric: bool = True,
                   sparsity=None, where=None, calibration=None, verbose: bool = True,
                   return_summary: bool = False, **quantize_kwargs):
    """Quantizes the dense layers of a trained model, training-free: round to
    nearest, or GPTQ with ``calibration`` data.

    Converted: every ``nnx.Linear``, and every ``nnx.LinearGeneral`` or
    ``nnx.Einsum`` whose contraction is a plain matmul over the last input
    axis; other ones are listed in the summary as skipped.

    Args:
      model: an NNX module (or graph of modules); changed in place.
      bits, group_size, symmetric: the format, as in ``jax_lowbit.quantize``.
      sparsity: None, or "2:4" to prune every converted layer to 2:4 and store
        it in the 2:4 sparse int4 format (bits=4).
      where: which layers: None for all, a regex searched in the module path
        ("layers/0/mlp/up"), or a predicate on that path string.
      calibration: None, or the arguments of one call ``model(*calibration)``
        (a tuple; anything else is the single argument), e.g. a batch of a few
        hundred tokenized sentences like the real inputs, every array with the
        batch on axis 0. The layers are then quantized with GPTQ
        (``jax_lowbit.gptq.gptq_quantize``, which takes the
        ``quantize_kwargs``: ``damping``, ``act_order``, ``clip_search``,
        ``scale_dtype``) in the order the model calls them, each from the
        inputs that the layers quantized before it give it, towards the float
        model's outputs (jax_lowbit/flax/calibration.py). The model runs
        eagerly on the batch three times over; padding positions count as
        inputs too.
      verbose: print progress and a summary (layers, bytes before/after).
      return_summary: also return the ConversionSummary.

    Returns:
      The model with ``QuantLinear`` layers, runnable under ``nnx.jit`` (and
      the summary if asked). Layers whose K does not fit the format (e.g. not
      divisible by the group size) keep their float weights and are listed in
      the summary as skipped.
    """
    check_format_options(bits, group_size, quantize_kwargs.get("scale_dtype", "bfloat16"),
                         sparsity)
    selected = _selector(where)
    dense_types = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)
    linears = [(tuple(path), node) for path, node in nnx.iter_graph(model)
               if isinstance(node, dense_types) and selected(tuple(path))]
    summary = ConversionSummary()
    fitting = []
    for path, linear in linears:
        try:
            kernel, _, _ = dense_kernel(linear)
        except ValueError as error:  # not a plain matmul: keep the float layer
            summary.skipped.append((path, str(error)))
            continue
        reason = k_misfit(kernel.shape[0], bits, group_size, sparsity)
        if reason:  # K does not fit the format: keep the float layer
            summary.skipped.append((path, reason))
            continue
        fitting.append((path, linear))
    progress = iter(range(1, len(fitting) + 1))

    def convert(path, linear, hessian=None, float_cross=None) -> QuantLinear:
        if verbose and len(fitting) > 1:
            print(f"\rquantizing {next(progress)}/{len(fitting)}: {_path_name(path)}", end="",
                  file=sys.stderr, flush=True)
        return QuantLinear.from_module(linear, bits, group_size, symmetric, hessian=hessian,
                                       float_cross=float_cross, **quantize_kwargs)

    if calibration is None:
        if sparsity is not None:
            quantize_kwargs["sparsity"] = sparsity
        quantized = {path: convert(path, linear) for path, linear in fitting}
    else:
        if quantize_kwargs.get("method", "gptq") != "gptq" or quantize_kwargs.get("ternary"):
            raise ValueError("quantize_model: calibration quantizes with GPTQ; leave out "
                             "method and ternary")
        quantize_kwargs.pop("method", None)
        if sparsity is not None:
            raise ValueError("quantize_model: calibration (GPTQ) does not make 2:4 sparse "
                             "weights; leave out sparsity")
        if quantize_kwargs.get("integer_group_scales"):
            raise ValueError("quantize_model: calibration (GPTQ) does not make integer group "
                             "scales; leave out integer_group_scales")
        if any(not path for path, _ in fitting):
            raise ValueError("quantize_model: calibration needs a model with submodules "
                             "(the root itself cannot be stood in for)")
        args = calibration if isinstance(calibration, tuple) else (calibration,)
        quantized = quantize_in_call_order(
            model, fitting, args, lambda path, module: _replace(model, path, module), convert)
    for path, linear in fitting:
        summary.converted.append((path, quantized[path].weight.shape, linear.kernel[...].nbytes,
                                  quantized[path].weight.nbytes))
        if not path:
            model = quantized[path]
        else:
            _replace(model, path, quantized[path])
    if verbose:
        if len(fitting) > 1:
            print(file=sys.stderr)
        print(summary)
    return (model, summary) if return_summary else model
