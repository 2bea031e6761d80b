"""The tensor-parallel gated MLP of examples/tensor_parallel_mlp.py on 1, 2 and 4
devices: time per MLP, speedup and scaling efficiency, bf16 and int4 weights.

    python benchmarks/tensor_parallel.py --json tp.json         # the GPUs (1, 2, 4 of them)
    python benchmarks/tensor_parallel.py --cpu-devices 4 --embed 256 --hidden 1024 \\
        --tokens 4 --steps 2 --repeats 2                         # smoke test on CPU

Strong scaling: the same layer (Llama-3-8B's feed-forward shapes by default)
split over n devices, up and gate by columns, down by rows, one psum per MLP.
Each jitted call chains ``--steps`` MLPs (x = x + mlp(x)) so that dispatch does
not dominate at small token counts; the time is the median over ``--repeats``
calls, divided by the steps. Per-device time is that wall time (every device
works on its slice concurrently); speedup = t(1) / t(n) and efficiency =
t(1) / (n * t(n)), against the fewest devices run if not 1.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
import tensor_parallel_mlp  # noqa: E402


def chained(model, steps: int):
    """(run(state, x), state): ``steps`` residual applications of ``model`` in one jit."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x):
        mlp = nnx.merge(graphdef, state)
        return jax.lax.fori_loop(0, steps, lambda i, x: x + mlp(x), x)

    return run, state


def seconds_per_step(model, x, steps: int, repeats: int) -> float:
    run, state = chained(model, steps)
    jax.block_until_ready(run(state, x))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(state, x))
        times.append(time.perf_counter() - start)
    return statistics.median(times) / steps


def weight_bytes_per_device(model) -> int:
    """Bytes of the model's arrays that live on its first device."""
    state = nnx.state(model)
    first = jax.tree.leaves(state)[0].sharding.device_set
    device = min(first, key=lambda d: d.id)
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(state)
               for shard in leaf.addressable_shards if shard.device == device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-devices", type=int, help="emulate this many CPU devices")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--embed", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=14336)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # before JAX starts
    devices = jax.devices("cpu" if args.cpu_devices else None)
    counts = [n for n in args.devices if n <= len(devices)]
    if counts != args.devices:
        print(f"only {len(devices)} devices: running {counts}")
    print(f"{devices[0].device_kind} ({devices[0].platform}), jax {jax.__version__}, "
          f"MLP {args.embed} -> {args.hidden} -> {args.embed}")

    rows = []
    for n in counts:
        mesh = tensor_parallel_mlp.make_mesh(devices[:n])
        models = dict(zip(("bf16", "int4"), tensor_parallel_mlp.build(
            mesh, args.embed, args.hidden, dtype=jnp.bfloat16)))
        for method, model in models.items():
            for tokens in args.tokens:
                x = jax.random.normal(jax.random.key(0), (tokens, args.embed), jnp.bfloat16)
                seconds = seconds_per_step(model, x, args.steps, args.repeats)
                rows.append({"method": method, "tokens": tokens, "devices": n,
                             "us": seconds * 1e6,
                             "weight_bytes_per_device": weight_bytes_per_device(model)})
    for row in rows:
        single = next(r["us"] for r in rows if r["method"] == row["method"]
                      and r["tokens"] == row["tokens"] and r["devices"] == counts[0])
        row["speedup"] = single / row["us"]  # over the fewest devices run
        row["efficiency"] = row["speedup"] * counts[0] / row["devices"]
        print(f"{row['method']:4s} M={row['tokens']:<5d} {row['devices']} devices: "
              f"{row['us']:9.1f} us per MLP, weights {row['weight_bytes_per_device'] / 2**20:8.1f} "
              f"MiB per device, speedup {row['speedup']:.2f}, efficiency {row['efficiency']:.2f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"device": devices[0].device_kind, "jax": jax.__version__, "embed": args.embed,
             "hidden": args.hidden, "steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
