"""build_info() tells what the extension was built from."""

import jax
import jaxlib

import jax_lowbit


def test_build_info():
    info = jax_lowbit.build_info()
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_architectures"], str)
    if info["cuda"]:
        assert "90a" in info["cuda_architectures"].split(";")
    assert info["jaxlib_version"]
    assert info["jaxlib_runtime_version"] == jaxlib.__version__
    major, minor = info["ffi_api_version"]
    assert major >= 0 and minor >= 0


def test_cuda_built_when_running_on_gpu():
    if jax.default_backend() == "gpu":
        assert jax_lowbit.build_info()["cuda"]


def test_targets_registered():
    assert {"jax_lowbit_dequantize", "jax_lowbit_matmul"} <= set(jax_lowbit.target_names())
