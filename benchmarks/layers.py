"""One product per suite layer and format, for a kernel profiler to time.

    ncu --kernel-name regex:gemm_small_m --metrics gpu__time_duration.sum,dram__bytes_read.sum \\
        python benchmarks/layers.py --m 1 16

Each (layer, format, M) runs twice, a warm-up and the profiled call.
"""

import argparse

import jax
import jax.numpy as jnp

import jax_lowbit

from gemm import FORMATS, GROUP, SUITE


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    key = jax.random.key(0)
    matmul = jax.jit(jax_lowbit.matmul)
    for i, (k, n) in enumerate(SUITE):
        w = jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.float32) * 0.02
        for bits, symmetric, sparsity in FORMATS:
            qw = jax_lowbit.quantize(w, bits, GROUP, symmetric=symmetric, sparsity=sparsity)
            for m in args.m:
                x = jax.random.normal(key, (m, k), jnp.bfloat16)
                for _ in range(2):
                    matmul(x, qw).block_until_ready()
                print(f"layer ({k}, {n}) {sparsity or 'dense'} int{bits} "
                      f"{'sym' if symmetric else 'asym'} M={m}: "
                      f"{qw.nbytes / 1e6:.2f} MB", flush=True)


if __name__ == "__main__":
    main()
