"""Quantize a weight to int4 and int2, multiply under jax.jit, compare with float."""

import jax
import jax.numpy as jnp

import jax_lowbit


def main():
    k, n, m = 4096, 1024, 8
    w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32) / k**0.5
    x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
    reference = x.astype(jnp.float32) @ w

    print(f"backend: {jax.default_backend()}, build: {jax_lowbit.build_info()}")
    matmul = jax.jit(jax_lowbit.matmul)
    for bits in (8, 4, 2):
        for symmetric in (True, False):
            qw = jax_lowbit.quantize(w, bits=bits, group_size=128, symmetric=symmetric)
            y = matmul(x, qw)
            err = jnp.linalg.norm(y.astype(jnp.float32) - reference) / jnp.linalg.norm(reference)
            print(f"int{bits} g128 {'sym ' if symmetric else 'asym'}: "
                  f"{qw.nbytes / 2**20:6.2f} MiB (bf16: {k * n * 2 / 2**20:.2f} MiB), "
                  f"relative error vs float: {float(err):.4f}")


if __name__ == "__main__":
    main()
