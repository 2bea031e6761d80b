"""Suite benchmark: the four linear layers of a Llama-3-8B block, two copies each.

Times one pass over the four layers (µs) for bf16 jnp.dot, XLA's own int4 g128
path and jax_lowbit's formats (weight-only dense int4/int2, and 2:4 sparse
int4 of the same weights pruned; W8A8 and W4A8 with int8 activations
quantized per row, ``act_bits=8``; int_matmul of int8 activations and int8
weights to int32), all in one process, and reports the speedups and the
fraction of the bytes-over-bandwidth floor (bandwidth measured here by a
device-to-device copy). Times are GPU time read from the JAX profiler; the
host timer's figures, which add the host's work per jit output, go to the
JSON file as ``host_timer_us``. Usage:

    python benchmarks/gemm.py [--m 1 16 32 64 256 1024 4096] [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import glob
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_lowbit

SUITE = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
COPIES = 2  # two copies of each layer, run in turn, so weights never sit in L2
FORMATS = [(4, True, None), (4, False, None), (2, True, None), (2, False, None),
           (4, True, "2:4")]  # (bits, symmetric, sparsity)
GROUP = 128
# Quantized activations (act_bits=8): name -> (weight bits, group size, more quantize
# arguments), symmetric.
INTEGER_SCALES = dict(scale_dtype=jnp.float32, integer_group_scales=True)
ACT_QUANT_FORMATS = {"w8a8 per-channel": (8, -1, {}), f"w4a8 g{GROUP}": (4, GROUP, {}),
                     f"w4a8 g{GROUP} int-scales": (4, GROUP, INTEGER_SCALES),
                     "w4a8 per-channel": (4, -1, {})}
INT_MATMUL = "int_matmul s8 x s8"
BASELINES = ("bf16", "xla int4 g128")


SAMPLES = 9


def _timed(fn, args, passes: int) -> float:
    """Median GPU seconds per pass of ``fn`` (one call runs ``passes`` passes)."""
    return _timed_together({"fn": (fn, args, passes)})["fn"]["gpu"]


def _gpu_call_spans(data, calls: int) -> list[float]:
    """Seconds from the first GPU activity of each of ``calls`` successive jit
    calls to its last, read off a profile (``jax.profiler.ProfileData``).

    A call's GPU work starts after its host dispatch (a "PjitFunction" event)
    and, as every call is waited for, ends before the next dispatch.
    """
    # The benchmark runs on the default device, GPU 0; other GPUs of the
    # machine have planes of their own.
    hosts = [p for p in data.planes if p.name == "/host:CPU"]
    gpus = [p for p in data.planes if p.name == "/device:GPU:0"]
    if len(hosts) != 1 or len(gpus) != 1:
        raise RuntimeError(f"expected the host and GPU 0 in the profile, found "
                           f"{[p.name for p in data.planes]}")
    dispatches, dispatch_end = [], None
    for start, end in sorted((e.start_ns, e.start_ns + e.duration_ns) for line in hosts[0].lines
                             for e in line.events if e.name.startswith("PjitFunction(")):
        if dispatch_end is None or start >= dispatch_end:  # not one nested in the last
            dispatches.append(start)
            dispatch_end = end
    if len(dispatches) != calls:
        raise RuntimeError(f"the profile holds {len(dispatches)} jit dispatches, not the "
                           f"{calls} calls that ran")
    first, last = [None] * calls, [None] * calls
    for line in gpus[0].lines:
        for e in line.events:
            i = bisect.bisect_right(dispatches, e.start_ns) - 1
            if i < 0:
                continue  # before the first timed call (the profiler starting)
            end = e.start_ns + e.duration_ns
            first[i] = e.start_ns if first[i] is None else min(first[i], e.start_ns)
            last[i] = end if last[i] is None else max(last[i], end)
    if any(f is None for f in first):
        raise RuntimeError("a timed call shows no GPU activity in the profile")
    return [(b - a) * 1e-9 for a, b in zip(first, last)]


def _timed_together(calls: dict) -> dict:
    """Median seconds per pass of each ``name: (fn, args, passes)``, as
    ``{"gpu": ..., "host": ...}``.

    "gpu" is the time from a call's first kernel start to its last kernel's
    end, read from the JAX profiler: every kernel and every gap between
    kernels, but not the host work of the jit call before and after its
    kernels, which the host timer ("host") also counts. That work grows with
    the products and arrays a call returns (about 42 µs per pass on the H100,
    docs/perf.md v10), and a model's forward pass does not pay it per product.
    The calls take turns within every sample round, so a slow
    spell of the GPU (clocks, a neighbour) hits all of them alike and the
    ratios between them stay fair.
    """
    for fn, args, _ in calls.values():
        jax.block_until_ready(fn(*args))
    host = {name: [] for name in calls}
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        try:
            for _ in range(SAMPLES):
                for name, (fn, args, passes) in calls.items():
                    start = time.perf_counter()
                    jax.block_until_ready(fn(*args))
                    host[name].append((time.perf_counter() - start) / passes)
        finally:
            jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        spans = _gpu_call_spans(jax.profiler.ProfileData.from_file(path), SAMPLES * len(calls))
    gpu = {name: [] for name in calls}
    for i, span in enumerate(spans):
        name = list(calls)[i % len(calls)]
        gpu[name].append(span / calls[name][2])
    return {name: {"gpu": float(np.median(gpu[name])), "host": float(np.median(host[name]))}
            for name in calls}


def _passes(layer_fn):
    """jit of several passes over every layer copy, one input set per pass.

    Returning every output keeps XLA from dropping any product. Each pass's
    inputs and weights go through an optimization barrier with the previous
    pass's outputs, so XLA can neither merge the products that share a weight
    (its dot merger would otherwise run all passes as one larger product),
    nor compute work on the weights alone once for all passes (it would
    dequantize a weight once: CSE of the dequantize call, or of XLA's int4
    convert), nor reorder passes; the barrier launches nothing. One dispatch
    is spread over all the products.
    """

    def run(xs_per_pass, weights):
        outputs = []
        previous = []
        for xs in xs_per_pass:
            xs, weights, previous = jax.lax.optimization_barrier((xs, weights, previous))
            previous = [layer_fn(xs[i % len(SUITE)], w) for i, w in enumerate(weights)]
            outputs.append(previous)
        return outputs

    return jax.jit(run)


def _xla_int4_layer(x, w):
    codes, scales = w
    k, n = codes.shape
    deq = (codes.astype(jnp.bfloat16).reshape(k // GROUP, GROUP, n) * scales[:, None, :])
    return jnp.dot(x, deq.reshape(k, n))


def _bf16_layer(x, w):
    # Plain jnp.dot, as users write it (bf16 out, f32 accumulation inside): in
    # the v5 harness `preferred_element_type=f32` then a cast cost XLA an extra
    # kernel per product and made bf16 7-10% slower (docs/perf.md).
    return jnp.dot(x, w)


def _act_quant_layer(x, w):
    return jax_lowbit.matmul(x, w, act_bits=8)


def _as_int8(a, step):
    """Round-to-nearest int8 codes of a with the given step (benchmark data only)."""
    return jnp.clip(jnp.round(a / step), -127, 127).astype(jnp.int8)


def measure_bandwidth() -> float:
    """Bytes per second of device-to-device copies of 1 GiB (read + write)."""
    a = jnp.ones((1 << 29,), jnp.bfloat16)
    copies = 8

    def chain(v):  # the barriers keep XLA from fusing the copies into one
        for _ in range(copies):
            v = jax.lax.optimization_barrier(v * jnp.bfloat16(-1))
        return v

    return 2 * a.nbytes / _timed(jax.jit(chain), (a,), copies)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 32, 64, 256, 1024, 4096])
    parser.add_argument("--json")
    parser.add_argument("--plot")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="time only the methods whose names contain one of these (and the "
                             "baselines, bf16 and xla int4)")
    args = parser.parse_args()

    device = jax.devices()[0]
    bandwidth = measure_bandwidth()
    print(f"device: {device.device_kind}; date {datetime.date.today()}; jax {jax.__version__}; "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")

    def wanted(name):
        return name in BASELINES or not args.only or any(part in name for part in args.only)

    key = jax.random.key(0)
    dense = [jax.random.normal(jax.random.fold_in(key, i), SUITE[i % 4], jnp.bfloat16) * 0.02
             for i in range(4 * COPIES)]
    weights = {"bf16": dense}
    weights["xla int4 g128"] = [
        (jnp.clip(jnp.round(w / 0.005), -8, 7).astype(jnp.int4),
         jnp.full((w.shape[0] // GROUP, w.shape[1]), 0.005, jnp.bfloat16)) for w in dense]
    for bits, sym, sparsity in FORMATS:
        name = f"{sparsity + ' ' if sparsity else ''}int{bits} g{GROUP} {'sym' if sym else 'asym'}"
        if not wanted(name):
            continue
        weights[name] = [jax_lowbit.quantize(w, bits, GROUP, symmetric=sym, sparsity=sparsity)
                         for w in dense]
    for name, (bits, group, kwargs) in ACT_QUANT_FORMATS.items():
        if not wanted(name):
            continue
        weights[name] = [jax_lowbit.quantize(w, bits, group, **kwargs) for w in dense]
    if wanted(INT_MATMUL):
        weights[INT_MATMUL] = [_as_int8(w, 0.005) for w in dense]
    layer_fns = {"bf16": _bf16_layer, "xla int4 g128": _xla_int4_layer, INT_MATMUL:
                 jax_lowbit.int_matmul, **{name: _act_quant_layer for name in ACT_QUANT_FORMATS}}
    floors = {name: sum(leaf.nbytes for w in ws[:4] for leaf in jax.tree.leaves(w)) / bandwidth
              for name, ws in weights.items()}

    results, host_results = {}, {}
    for m in args.m:
        passes = 20 if m <= 256 else 2
        xs = [[jax.random.normal(jax.random.fold_in(key, 100 * r + i), (m, SUITE[i][0]),
                                 jnp.bfloat16) for i in range(4)] for r in range(passes)]
        # int_matmul takes int8 activations, made outside the timed function.
        xs_int8 = [[_as_int8(x, 0.03) for x in row] for row in xs]
        # One "pass" of the suite is the four layers once: COPIES per loop.
        calls = {name: (_passes(layer_fns.get(name, jax_lowbit.matmul)),
                        (xs_int8 if name == INT_MATMUL else xs, ws), passes * COPIES)
                 for name, ws in weights.items()}
        timed = _timed_together(calls)
        row = {name: t["gpu"] * 1e6 for name, t in timed.items()}
        results[m] = row
        host_results[m] = {name: t["host"] * 1e6 for name, t in timed.items()}
        base, xla4 = row["bf16"], row["xla int4 g128"]
        print(f"\nM={m}: bf16 {base:.1f} µs (host timer {host_results[m]['bf16']:.1f}), "
              f"xla int4 g128 {xla4:.1f} µs")
        for name in weights:
            if name in BASELINES:
                continue
            print(f"  {name:20s} {row[name]:9.1f} µs  x{base / row[name]:5.2f} vs bf16  "
                  f"x{xla4 / row[name]:5.2f} vs xla int4  floor {floors[name] * 1e6 / row[name]:6.1%}  "
                  f"(host timer {host_results[m][name]:.1f} µs)")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.device_kind, "date": str(datetime.date.today()),
                       "bandwidth": bandwidth, "floors_us": {k: v * 1e6 for k, v in floors.items()},
                       "results_us": results, "host_timer_us": host_results}, f, indent=1)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name in weights:
            if name == "bf16":
                continue
            ax.plot(args.m, [results[m]["bf16"] / results[m][name] for m in args.m], "o-",
                    label=name)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (rows of x)")
        ax.set_ylabel("speedup over bf16 jnp.dot")
        ax.set_title(f"Llama-3-8B block suite, {device.device_kind}, {datetime.date.today()}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
