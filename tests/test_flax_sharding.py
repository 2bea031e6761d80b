"""Sharding annotations on the Flax layers (NNX and Linen), and the
tensor-parallel MLP example, on 8 emulated CPU devices (conftest.py)."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

pytest.importorskip("flax")
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

from jax_lowbit.flax import QuantLinear  # noqa: E402
from jax_lowbit.flax import linen as lowbit_linen  # noqa: E402

import spec_reference  # noqa: E402
from hlo import collectives, compiled_text  # noqa: E402
from meshes import cpu_mesh  # noqa: E402

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "tensor_parallel_mlp.py"


@pytest.fixture(scope="module")
def mesh():
    return cpu_mesh()


def _annotated(init_names):
    return nnx.with_partitioning(nnx.initializers.lecun_normal(), init_names)


def _out_sharding(variable):
    return tuple(variable.get_metadata()["out_sharding"])


def test_from_linear_carries_the_kernel_annotations(mesh, rng):
    # Row-parallel, one group: the single scale row is not split along K.
    # (Column-parallel layers and split groups: test_tensor_parallel_example.)
    names, scale_names = ("model", None), (None, None)
    with jax.set_mesh(mesh):
        linear = nnx.Linear(256, 64, rngs=nnx.Rngs(int(rng.integers(1 << 30))),
                            kernel_init=_annotated(names),
                            bias_init=nnx.with_partitioning(nnx.initializers.normal(), (None,)))
        layer = QuantLinear.from_linear(linear, bits=4, group_size=-1, symmetric=False)
    assert _out_sharding(layer.codes) == names
    assert _out_sharding(layer.scales) == _out_sharding(layer.offsets) == scale_names
    assert _out_sharding(layer.bias) == (None,)
    # Flax reads them back as PartitionSpecs and placed the arrays by them.
    specs = nnx.get_partition_spec(nnx.state(layer))
    assert specs["codes"].get_value() == P(*names)
    assert layer.codes[...].sharding.spec == P(*names)
    assert layer.scales[...].sharding.spec == P(*scale_names)

    graphdef, state = nnx.split(layer)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    x = jax.device_put(jnp.asarray(rng.normal(size=(8, 256)), jnp.float32),
                       NamedSharding(mesh, P("data")))
    want = np.asarray(x, np.float64) @ spec_reference.dequantize_weight(layer.weight)
    np.testing.assert_allclose(np.asarray(forward(state, x)),
                               want + np.asarray(layer.bias[...], np.float64),
                               rtol=1e-4, atol=1e-4)
    assert "all-gather" not in collectives(compiled_text(forward, state, x))


def test_linear_general_annotations_follow_the_reshape(mesh):
    # An attention projection split on heads: (embed, heads, head_dim) -> (embed, heads*head_dim).
    with jax.set_mesh(mesh):
        general = nnx.LinearGeneral(
            256, (4, 16), rngs=nnx.Rngs(0), kernel_init=_annotated((None, "model", None)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("model", None)))
        layer = QuantLinear.from_module(general, bits=4, group_size=64)
    assert _out_sharding(layer.codes) == (None, "model")
    assert _out_sharding(layer.bias) == ("model",)


def test_linen_partitioned_params(mesh, rng):
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            def dense(features, names, name):
                return nn.Dense(features, name=name, kernel_init=nn.with_partitioning(
                    nn.initializers.lecun_normal(), names))
            h = nn.relu(dense(512, (None, "model"), "up")(x))
            return dense(256, ("model", None), "down")(h)

    model = Block()
    x = jnp.asarray(rng.normal(size=(8, 256)), jnp.float32)
    params = model.init(jax.random.key(int(rng.integers(1 << 30))), x)["params"]
    qparams = lowbit_linen.quantize_params(params, bits=4, group_size=64)
    # The boxes' names reach the packed arrays; place them by their specs.
    specs = nn.get_partition_spec(qparams)
    assert specs["up"]["kernel"].codes == P(None, "model")
    assert specs["down"]["kernel"].scales == P("model", None)
    placed = jax.device_put(nn.meta.unbox(qparams),
                            jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs))
    with lowbit_linen.quantized_dense():
        forward = jax.jit(lambda params, x: model.apply({"params": params}, x))
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        y = forward(placed, xs)
        text = compiled_text(forward, placed, xs)
    up, down = (spec_reference.dequantize_weight(nn.meta.unbox(qparams[name]["kernel"]))
                for name in ("up", "down"))
    h = np.maximum(np.asarray(x, np.float64) @ up + np.asarray(placed["up"]["bias"]), 0)
    want = h @ down + np.asarray(placed["down"]["bias"])
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)
    assert collectives(text) == ["all-reduce"]


def test_sparse_metadata_takes_the_codes_annotations(mesh):
    # 2:4 metadata rows locate the code words' codes, so they split alike.
    names = ("model", None)
    with jax.set_mesh(mesh):
        linear = nnx.Linear(256, 64, rngs=nnx.Rngs(0), kernel_init=_annotated(names))
        layer = QuantLinear.from_linear(linear, bits=4, group_size=64, sparsity="2:4")
    assert _out_sharding(layer.metadata) == _out_sharding(layer.codes) == names
    kernel = nn.with_partitioning(nn.initializers.lecun_normal(), names)(
        jax.random.key(0), (256, 64))
    qparams = lowbit_linen.quantize_params({"Dense_0": {"kernel": kernel}}, bits=4,
                                           group_size=64, sparsity="2:4")
    assert nn.meta.unbox(qparams["Dense_0"]["kernel"]).sparsity == "2:4"
    specs = nn.get_partition_spec(qparams)["Dense_0"]["kernel"]
    assert specs.metadata == specs.codes == P(*names)


def test_tensor_parallel_example():
    spec = importlib.util.spec_from_file_location("tensor_parallel_mlp", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    mesh = example.make_mesh(list(cpu_mesh().devices.flat), data=2)
    _, model = example.build(mesh, embed=256, hidden=512)
    # quantize_model kept the Linear layers' annotations.
    assert _out_sharding(model.up.codes) == (None, "model")
    assert _out_sharding(model.down.scales) == ("model", None)
    forward, state = example.jitted(model)
    x = jax.device_put(jax.random.normal(jax.random.key(0), (8, 256)),
                       NamedSharding(mesh, P("data")))
    y = forward(state, x)
    assert y.sharding.spec == P("data")
    # float64 reference from the packed weights.
    gate, up, down = (spec_reference.dequantize_weight(layer.weight)
                      for layer in (model.gate, model.up, model.down))
    x64 = np.asarray(x, np.float64)
    h = x64 @ gate
    want = (h / (1 + np.exp(-h)) * (x64 @ up)) @ down
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)
    # One psum after the down projection; no weight is gathered.
    assert example.collectives(forward, state, x) == {"all-reduce": 1}
