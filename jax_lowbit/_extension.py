"""Loads the compiled extensions and registers their XLA FFI targets."""

from __future__ import annotations

import re

import jax
import jaxlib

try:
    from jax_lowbit import _cpu
except ImportError as error:
    raise ImportError(
        "jax_lowbit's compiled extension is missing: install the package with "
        "`pip install .` (a source checkout on sys.path has no extension; run from "
        "another directory)") from error

try:
    from jax_lowbit import _cuda
except ImportError:  # built without CUDA
    _cuda = None


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def _check_jaxlib() -> None:
    built = _cpu.build_info()["jaxlib_version"]
    if _version_tuple(built) > _version_tuple(jaxlib.__version__):
        raise ImportError(
            f"jax_lowbit was built against jaxlib {built} but jaxlib {jaxlib.__version__} is "
            "running; an extension built with newer XLA FFI headers is refused by older "
            "jaxlib. Rebuild against the installed jaxlib: "
            "pip install --no-build-isolation --force-reinstall jax-lowbit source")


def _register() -> None:
    for name, target in _cpu.registrations().items():
        jax.ffi.register_ffi_target(name, target, platform="cpu")
    if _cuda is not None:
        for name, target in _cuda.registrations().items():
            jax.ffi.register_ffi_target(name, target, platform="CUDA")


_check_jaxlib()
_register()


def has_cuda() -> bool:
    """Whether the CUDA extension was built and loaded."""
    return _cuda is not None


def cuda_devices_are_hopper() -> bool:
    """Whether this process has CUDA devices and all are sm_90 (H100, H200).

    The large-M kernel runs wgmma, which exists on sm_90 only; lowerings ask
    this to choose it. False without a CUDA backend (e.g. exporting on a CPU
    machine), so such lowerings keep the kernels every GPU can run.
    """
    try:
        devices = jax.devices("cuda")
    except RuntimeError:
        return False
    return bool(devices) and all(
        str(getattr(d, "compute_capability", "")).split(".")[0] == "9" for d in devices)


def target_names() -> list[str]:
    """Names of every FFI target this package registers."""
    names = set(_cpu.registrations())
    if _cuda is not None:
        names |= set(_cuda.registrations())
    return sorted(names)


def build_info() -> dict:
    """How this jax_lowbit was built.

    Keys: ``cuda`` (the CUDA extension is built and loaded),
    ``cuda_architectures`` (e.g. "80;90a", empty without CUDA),
    ``jaxlib_version`` (the jaxlib whose XLA FFI headers it was built against),
    ``ffi_api_version`` ((major, minor) of those headers), and
    ``jaxlib_runtime_version`` (the jaxlib running now).
    """
    info = dict(_cpu.build_info())
    info["cuda"] = bool(info["cuda"]) and has_cuda()
    info["ffi_api_version"] = tuple(info["ffi_api_version"])
    info["jaxlib_runtime_version"] = jaxlib.__version__
    return info
