"""Calibration-free refinement of zero points (HQQ, Badri & Shaji 2023).

Minimizes the l_p reconstruction error ||W - (Q - z) s||_p^p, p < 1, over the
zero points z of each group with the scales held fixed, by half-quadratic
splitting: an auxiliary error term We is soft-thresholded in closed form,
then z has a closed form too (a mean over the group). p < 1 lets a few large
errors (outliers) stand so the bulk of the weights fits the grid better.
No data, a fixed number of cheap elementwise iterations, jit-compatible.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The defaults of HQQ's reference implementation.
LP_NORM = 0.7
BETA = 10.0
KAPPA = 1.01
ITERATIONS = 20


def _shrink_lp(x, beta, p):
    """Proximal step of |x|^p: generalized soft thresholding."""
    return jnp.sign(x) * jax.nn.relu(jnp.abs(x) - jnp.power(jnp.abs(x) + 1e-8, p - 1) / beta)


def optimize_zero_points(grouped, scales, zero_points, max_code: int):
    """Refined zero points for ``grouped`` weights (G, rows, N) on the grid
    ``(code - zero_point) * scale``, codes in 0 .. max_code; scales (G, N).

    Keeps the zero points of the iteration with the smallest mean absolute
    reconstruction error (HQQ stops at the first increase; a fixed loop with
    the best kept is the same answer and traces once).
    """
    safe = jnp.where(scales == 0, 1.0, scales)[:, None, :]

    def reconstruct(z):
        codes = jnp.clip(jnp.round(grouped / safe + z[:, None, :]), 0, max_code)
        return codes, (codes - z[:, None, :]) * safe

    def body(_, carry):
        z, beta, best_z, best_error = carry
        codes, restored = reconstruct(z)
        error = jnp.mean(jnp.abs(grouped - restored))
        best_z = jnp.where(error < best_error, z, best_z)
        best_error = jnp.minimum(error, best_error)
        residual = _shrink_lp(grouped - restored, beta, LP_NORM)
        z = jnp.mean(codes - (grouped - residual) / safe, axis=1)
        return z, beta * KAPPA, best_z, best_error

    init = (zero_points, jnp.float32(BETA), zero_points, jnp.float32(jnp.inf))
    last_z, _, best_z, best_error = jax.lax.fori_loop(0, ITERATIONS, body, init)
    # The zero points after the last update have not been scored yet.
    last_error = jnp.mean(jnp.abs(grouped - reconstruct(last_z)[1]))
    return jnp.where(last_error < best_error, last_z, best_z)
