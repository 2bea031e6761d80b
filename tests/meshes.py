"""The device mesh of the sharding tests: 8 CPU devices (conftest.py asks JAX for
them), so the tests also run where the default backend is a single GPU."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh


def cpu_mesh(axis_type=AxisType.Auto) -> Mesh:
    """A 2 x 4 ("data", "model") mesh of CPU devices; skips the test without 8."""
    devices = jax.devices("cpu")
    if len(devices) < 8:
        pytest.skip("needs 8 CPU devices (jax_num_cpu_devices, set in conftest.py before "
                    "JAX starts its backends)")
    return Mesh(np.array(devices[:8]).reshape(2, 4), ("data", "model"),
                axis_types=(axis_type,) * 2)
