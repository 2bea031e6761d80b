import secrets

import jax
import numpy as np
import pytest

from jax_lowbit import _extension

# test_sharding.py needs several devices: 8 emulated CPU devices, which leave
# the other tests (on the default device) as they were. This must happen before
# JAX starts its backends; if something started them first, those tests skip.
try:
    jax.config.update("jax_num_cpu_devices", 8)
except RuntimeError:
    pass


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU as JAX's default backend")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=[False, True], ids=["other GPU", "sm_90"])
def hopper(request, monkeypatch):
    """Lowers as if the CUDA devices were (or were not) sm_90 GPUs."""
    monkeypatch.setattr(_extension, "cuda_devices_are_hopper", lambda: request.param)
    jax.clear_caches()  # lowerings made under the other answer
    yield request.param
    jax.clear_caches()


@pytest.fixture
def rng(request):
    """A fresh random generator per test; its seed is printed on failure."""
    seed = secrets.randbits(32)
    print(f"rng seed: {seed}")
    return np.random.default_rng(seed)
