"""jax_lowbit: low-bit (int2/int4/int8) weight matrix products for JAX.

    qw = jax_lowbit.quantize(w, bits=4, group_size=128)   # w: (K, N) float
    y = jax_lowbit.matmul(x, qw)                           # x: (..., K)
"""

from jax_lowbit._extension import build_info, target_names
from jax_lowbit.gptq import gptq_quantize, input_hessian
from jax_lowbit.importers import load_awq, load_bitnet, load_gptq, load_hqq
from jax_lowbit.int_ops import int_matmul
from jax_lowbit.ops import dequantize, matmul
from jax_lowbit.quantize import quantize
from jax_lowbit.quantized_weight import QuantizedWeight
from jax_lowbit.sharding import matmul_partial_sums, shard_weight, weight_specs
from jax_lowbit.sparsity import prune_2_4


def export_disabled_checks():
    """The ``disabled_checks`` that ``jax.export.export`` needs for jax_lowbit's custom calls.

    ``jax.export`` refuses custom calls it does not know to be stable; the
    deserialized module runs wherever jax_lowbit is imported (which registers
    the targets).
    """
    import jax.export

    return [jax.export.DisabledSafetyCheck.custom_call(name) for name in target_names()]


__all__ = [
    "QuantizedWeight",
    "build_info",
    "dequantize",
    "export_disabled_checks",
    "gptq_quantize",
    "input_hessian",
    "int_matmul",
    "load_awq",
    "load_bitnet",
    "load_gptq",
    "load_hqq",
    "matmul",
    "matmul_partial_sums",
    "prune_2_4",
    "quantize",
    "shard_weight",
    "weight_specs",
]
__version__ = "0.1.0"
