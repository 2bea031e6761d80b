"""Checks that turn bad input into clear Python errors at trace time."""

from __future__ import annotations

import jax.numpy as jnp

from jax_lowbit import formats


def _dtype_names(dtypes) -> str:
    return ", ".join(jnp.dtype(d).name for d in dtypes)


def check_format_options(bits, group_size, scale_dtype=jnp.bfloat16, sparsity=None) -> None:
    """Raises ValueError/TypeError unless bits, group_size, scale_dtype and sparsity are
    supported."""
    if isinstance(bits, bool) or bits not in formats.SUPPORTED_BITS:
        raise ValueError(f"unsupported bits={bits!r}; supported: {formats.SUPPORTED_BITS}")
    if sparsity is not None and sparsity not in formats.SPARSITY_PATTERNS:
        raise ValueError(
            f"unsupported sparsity={sparsity!r}; supported: None, {formats.SPARSITY_PATTERNS}")
    if sparsity is not None and bits != formats.SPARSE_BITS:
        raise ValueError(f"sparsity={sparsity!r} needs bits={formats.SPARSE_BITS}, got bits={bits}")
    if isinstance(group_size, bool) or group_size not in formats.SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"unsupported group_size={group_size!r}; supported: {formats.SUPPORTED_GROUP_SIZES}")
    if jnp.dtype(scale_dtype) not in [jnp.dtype(d) for d in formats.SCALE_DTYPES]:
        raise TypeError(
            f"unsupported scale dtype {jnp.dtype(scale_dtype).name}; "
            f"supported: {_dtype_names(formats.SCALE_DTYPES)}")


def k_misfit(k: int, bits: int, group_size: int, sparsity=None) -> str | None:
    """Why K rows cannot be packed in this (supported) format, or None if they can."""
    if k <= 0:
        return f"K={k}: the weight needs at least one row"
    if group_size != -1 and k % group_size != 0:
        return f"group_size={group_size} does not divide K={k}"
    per_word = formats.codes_per_word(bits)
    if k % per_word != 0:
        return (f"K={k} must be a multiple of {per_word} for {bits}-bit codes "
                f"({per_word} codes per 32-bit word); pad K")
    if sparsity is not None and k % formats.SPARSE_K_MULTIPLE != 0:
        return (f"K={k} must be a multiple of {formats.SPARSE_K_MULTIPLE} for "
                f"sparsity={sparsity!r} (one block of metadata rows); pad K")
    return None


def check_weight_format(k: int, bits, group_size, scale_dtype, sparsity=None) -> None:
    """Raises ValueError/TypeError unless (K, bits, group_size, scale_dtype, sparsity) is a
    valid format."""
    check_format_options(bits, group_size, scale_dtype, sparsity)
    reason = k_misfit(k, bits, group_size, sparsity)
    if reason:
        raise ValueError(reason)


def check_integer_group_scales(caller: str, bits, symmetric, group_size, sparsity,
                               scale_dtype) -> None:
    """Raises ValueError unless a weight with integer group scales
    (docs/formats.md) is int4, symmetric, grouped, dense, with float32 scales."""
    if (bits != 4 or not symmetric or group_size == -1 or sparsity is not None
            or jnp.dtype(scale_dtype) != jnp.float32):
        raise ValueError(f"{caller}: integer_group_scales needs int4 symmetric weights with "
                         "groups (group_size not -1), float32 scales and no sparsity")


def as_weight_matrix(w, caller: str):
    """``w`` as an array, after checking that it is a 2-D float (K, N) matrix."""
    if not hasattr(w, "shape") or not hasattr(w, "dtype"):
        w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"{caller}: w must be 2-D (K, N), got shape {tuple(w.shape)}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"{caller}: w must be a float array, got dtype {w.dtype}")
    return w


def check_float_dtype(name: str, dtype) -> None:
    """Raises TypeError unless ``dtype`` is bfloat16, float16 or float32."""
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in formats.ACTIVATION_DTYPES]:
        raise TypeError(
            f"{name} must have dtype {_dtype_names(formats.ACTIVATION_DTYPES)}, got {jnp.dtype(dtype).name}")


def check_packed_arrays(codes, scales, offsets, shape, bits, group_size, symmetric,
                        sparsity=None, metadata=None) -> None:
    """Raises unless the packed arrays have the shapes and dtypes their format implies."""
    k, n = shape
    check_weight_format(k, bits, group_size, scales.dtype, sparsity)
    groups = k // formats.group_rows(group_size, k)
    packed = (formats.packed_rows(k, bits, sparsity), n)
    if codes.dtype != jnp.uint32 or tuple(codes.shape) != packed:
        raise ValueError(
            f"codes must be uint32 of shape {packed}, got {codes.dtype} {tuple(codes.shape)}")
    if sparsity is not None and (metadata.dtype != jnp.uint16 or tuple(metadata.shape) != packed):
        raise ValueError(f"metadata must be uint16 of shape {packed}, "
                         f"got {metadata.dtype} {tuple(metadata.shape)}")
    if tuple(scales.shape) != (groups, n):
        raise ValueError(f"scales must have shape {(groups, n)}, got {tuple(scales.shape)}")
    if symmetric != (offsets is None):
        raise ValueError("offsets must be None exactly when the weight is symmetric")
    if offsets is not None and (tuple(offsets.shape) != (groups, n) or offsets.dtype != scales.dtype):
        raise ValueError(
            f"offsets must be {scales.dtype} of shape {(groups, n)}, "
            f"got {offsets.dtype} {tuple(offsets.shape)}")
