"""A tensor-parallel gated MLP with int4 weights, under jax.jit on a device mesh.

    python examples/tensor_parallel_mlp.py                  # all devices (the GPUs if present)
    python examples/tensor_parallel_mlp.py --cpu-devices 8  # 8 emulated CPU devices

The model is plain Flax NNX: its Linear layers carry sharding annotations
(``nnx.with_partitioning``), up and gate column-parallel (split on their
outputs), down row-parallel (split on its inputs). ``quantize_model`` carries
the annotations over to the int4 layers, so each device holds a slice of every
packed weight; under jit each device multiplies its own slice, and the only
communication is one psum after the down projection.
"""

from __future__ import annotations

import argparse
import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jax_lowbit.flax import quantize_model

COLUMN, ROW = (None, "model"), ("model", None)  # kernel (K, N) sharding names


class GatedMLP(nnx.Module):
    """``down(silu(gate(x)) * up(x))``, as in Llama's feed-forward block."""

    def __init__(self, embed: int, hidden: int, rngs: nnx.Rngs, dtype=jnp.float32):
        init = nnx.initializers.lecun_normal()

        def linear(k, n, names):
            return nnx.Linear(k, n, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs,
                              kernel_init=nnx.with_partitioning(init, names))

        self.gate = linear(embed, hidden, COLUMN)
        self.up = linear(embed, hidden, COLUMN)
        self.down = linear(hidden, embed, ROW)

    def __call__(self, x):
        return self.down(nnx.silu(self.gate(x)) * self.up(x))


def make_mesh(devices, data: int = 1) -> jax.sharding.Mesh:
    """A ("data", "model") mesh: ``data`` ways of batch, the rest tensor-parallel."""
    return jax.make_mesh((data, len(devices) // data), ("data", "model"),
                         axis_types=(AxisType.Auto,) * 2, devices=devices)


def build(mesh, embed: int, hidden: int, bits: int = 4, group_size: int = 128, seed: int = 0,
          dtype=jnp.float32):
    """(float model, quantized model) computing in ``dtype``, both placed on ``mesh``
    by their annotations."""
    with jax.set_mesh(mesh):
        model = GatedMLP(embed, hidden, nnx.Rngs(seed), dtype)
        quantized = quantize_model(nnx.clone(model), bits=bits, group_size=group_size,
                                   verbose=False)
    return model, quantized


def jitted(model):
    """(forward(state, x), state): the model as a jitted function of its arrays."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    return forward, state


def collectives(forward, *args) -> collections.Counter:
    """The collective ops in the compiled program (the HLO after partitioning)."""
    text = forward.lower(*args).compile().as_text()
    return collections.Counter(re.findall(
        r"\b(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(",
        text))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-devices", type=int, help="emulate this many CPU devices")
    parser.add_argument("--data", type=int, default=1, help="data-parallel ways")
    parser.add_argument("--embed", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args(argv)
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # before JAX starts
    devices = jax.devices("cpu" if args.cpu_devices else None)
    mesh = make_mesh(devices, args.data)
    print(f"mesh {dict(mesh.shape)} on {devices[0].platform}")

    float_model, model = build(mesh, args.embed, args.hidden)
    codes = model.down.codes[...]
    print(f"down codes {codes.shape}: {codes.sharding.spec}, "
          f"{codes.addressable_shards[0].data.shape} per device")

    x = jax.random.normal(jax.random.key(1), (args.tokens, args.embed), jnp.float32)
    x = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    forward, state = jitted(model)
    y = forward(state, x)
    float_forward, float_state = jitted(float_model)
    reference = float_forward(float_state, x)
    error = float(jnp.linalg.norm(y - reference) / jnp.linalg.norm(reference))
    print(f"output {y.shape}: {y.sharding.spec}; int4 vs float relative error {error:.4f}")
    print(f"collectives in the compiled program: {dict(collectives(forward, state, x))}")
    return np.asarray(y), np.asarray(reference)


if __name__ == "__main__":
    main()
