"""Flax integration: QuantLinear, quantize_model (NNX), Linen interception, orbax checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

flax = pytest.importorskip("flax")
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

import jax_lowbit  # noqa: E402
from jax_lowbit import formats  # noqa: E402
from jax_lowbit.gptq import gptq_quantize, input_hessian  # noqa: E402
from jax_lowbit.flax import QuantizedArray, QuantLinear, quantize_model  # noqa: E402
from jax_lowbit.flax import linen as lowbit_linen  # noqa: E402

import spec_reference  # noqa: E402


class MLP(nnx.Module):
    def __init__(self, rngs, widths=(256, 512, 512, 96)):
        self.up = nnx.Linear(widths[0], widths[1], rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(widths[1], widths[2], rngs=rngs) for _ in range(2)])
        self.head = nnx.Linear(widths[2], widths[3], use_bias=False, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.up(x))
        for block in self.blocks:
            x = nnx.relu(block(x))
        return self.head(x)


def _reference(layer: QuantLinear, x):
    """x @ W + b in float64 from the spec decoder."""
    y = np.asarray(x, np.float64) @ spec_reference.dequantize_weight(layer.weight)
    return y if layer.bias is None else y + np.asarray(layer.bias[...], np.float64)


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quant_linear_matches_linear_with_dequantized_weights(use_bias, bits, rng):
    linear = nnx.Linear(256, 48, use_bias=use_bias, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    if use_bias:
        linear.bias[...] = jnp.asarray(rng.normal(size=48), jnp.float32)
    layer = QuantLinear.from_linear(linear, bits=bits, group_size=64, symmetric=False)
    x = jnp.asarray(rng.normal(size=(2, 5, 256)), jnp.float32)
    y = layer(x)
    assert y.shape == (2, 5, 48) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), _reference(layer, x), rtol=1e-5, atol=1e-4)
    # Same as nnx.Linear holding the dequantized kernel (in full float32: a
    # GPU's default float32 dot rounds its inputs to TF32).
    linear.kernel[...] = layer.weight.dequantize()
    with jax.default_matmul_precision("highest"):
        want = linear(x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-4)


def test_quant_linear_computation_dtype(rng):
    linear = nnx.Linear(128, 32, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    layer = QuantLinear.from_linear(linear, bits=4, group_size=128)
    x = jnp.asarray(rng.normal(size=(3, 128)), jnp.float32)
    y = layer(x)
    assert y.dtype == jnp.bfloat16
    want = _reference(layer, np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32)))
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2e-2, atol=5e-2)


def test_quantize_model_selects_layers_and_runs_under_jit(rng):
    model = MLP(nnx.Rngs(int(rng.integers(1 << 30))))
    x = jnp.asarray(rng.normal(size=(4, 256)), jnp.float32)
    float_out = model(x)
    model, summary = quantize_model(model, bits=8, group_size=128, where=r"^(up|blocks/\d+)$",
                                    verbose=False, return_summary=True)
    assert isinstance(model.up, QuantLinear)
    assert all(isinstance(b, QuantLinear) for b in model.blocks)
    assert isinstance(model.head, nnx.Linear)  # not selected
    assert sorted(p for p, *_ in summary.converted) == [("blocks", 0), ("blocks", 1), ("up",)]
    assert summary.bytes_after < summary.bytes_before / 3.5
    y = nnx.jit(lambda m, a: m(a))(model, x)
    # int8 g128: close to the float model.
    err = np.linalg.norm(np.asarray(y - float_out)) / np.linalg.norm(np.asarray(float_out))
    assert err < 0.02
    # Layer by layer: the quantized layers compute x @ dequantize(W) + b.
    h = np.asarray(x)
    np.testing.assert_allclose(np.asarray(model.up(x)), _reference(model.up, h), rtol=1e-5,
                               atol=1e-4)


def test_quantize_model_skips_layers_that_do_not_fit(rng):
    model = MLP(nnx.Rngs(0), widths=(96, 256, 256, 8))  # K=96 does not fit g128
    model, summary = quantize_model(model, bits=4, group_size=128, verbose=False,
                                    return_summary=True)
    assert isinstance(model.up, nnx.Linear)
    assert summary.skipped and "does not divide K=96" in summary.skipped[0][1]
    assert isinstance(model.head, QuantLinear)
    assert "skipped" in str(summary)


def test_quantize_model_2_4_sparse(rng):
    model = MLP(nnx.Rngs(0), widths=(96, 256, 256, 8))  # K=96: no whole block of 64 rows
    model, summary = quantize_model(model, bits=4, group_size=32, sparsity="2:4", verbose=False,
                                    return_summary=True)
    assert isinstance(model.up, nnx.Linear) and "multiple of 64" in summary.skipped[0][1]
    assert model.head.weight.sparsity == "2:4" and model.head.weight.metadata is not None
    x = jnp.asarray(rng.normal(size=(3, 256)), jnp.float32)
    np.testing.assert_allclose(np.asarray(model.head(x)), _reference(model.head, x), rtol=1e-5,
                               atol=1e-4)


def test_quantize_model_integer_group_scales(rng):
    model = MLP(nnx.Rngs(0), widths=(128, 256, 256, 16))
    quantize_model(model, bits=4, group_size=64, scale_dtype=jnp.float32,
                   integer_group_scales=True, verbose=False)
    weight = model.head.weight  # rebuilt from the layer's arrays: the flag is kept
    assert weight.integer_group_scales and weight.scales.dtype == jnp.float32
    x = jnp.asarray(rng.normal(size=(3, 256)), jnp.float32)
    np.testing.assert_allclose(np.asarray(model.head(x)), _reference(model.head, x), rtol=1e-5,
                               atol=1e-4)


def test_quantized_weights_are_not_params(rng):
    model = quantize_model(MLP(nnx.Rngs(0)), bits=4, verbose=False)
    params = nnx.state(model, nnx.Param)
    quantized = nnx.state(model, QuantizedArray)
    assert all(leaf.dtype != jnp.uint32 for leaf in jax.tree.leaves(params))
    assert any(leaf.dtype == jnp.uint32 for leaf in jax.tree.leaves(quantized))
    x = jnp.asarray(rng.normal(size=(2, 256)), jnp.float32)
    grads = nnx.grad(lambda m: jnp.sum(m(x)))(model)  # biases only
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(grads))


def test_quantize_model_bad_input():
    model = MLP(nnx.Rngs(0))
    with pytest.raises(ValueError, match="bits"):
        quantize_model(model, bits=3, verbose=False)
    with pytest.raises(ValueError, match="group_size"):
        quantize_model(model, bits=4, group_size=100, verbose=False)
    with pytest.raises(ValueError, match="needs bits=4"):
        quantize_model(model, bits=2, sparsity="2:4", verbose=False)
    with pytest.raises(TypeError, match="where"):
        quantize_model(model, bits=4, where=42, verbose=False)
    with pytest.raises(TypeError, match="QuantizedWeight"):
        QuantLinear(jnp.ones((4, 4)))


def test_checkpoint_roundtrip(rng, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    model = quantize_model(MLP(nnx.Rngs(1)), bits=4, group_size=64, symmetric=False,
                           verbose=False)
    x = jnp.asarray(rng.normal(size=(3, 256)), jnp.float32)
    before = np.asarray(model(x))
    _, state = nnx.split(model)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", state)
    checkpointer.wait_until_finished()
    # Restore into a model of the same structure built from other weights.
    fresh = quantize_model(MLP(nnx.Rngs(2)), bits=4, group_size=64, symmetric=False,
                           verbose=False)
    graphdef, target = nnx.split(fresh)
    restored = nnx.merge(graphdef, checkpointer.restore(tmp_path / "ckpt", target))
    np.testing.assert_array_equal(np.asarray(restored(x)), before)
    assert (restored.up.bits, restored.up.group_size, restored.up.symmetric) == (4, 64, False)


class DenseNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(256)(x))
        x = nn.Dense(128, name="middle")(x)
        return nn.Dense(8, use_bias=False)(x)


def test_linen_quantize_params_and_intercept(rng):
    model = DenseNet()
    x = jnp.asarray(rng.normal(size=(3, 128)), jnp.float32)
    params = model.init(jax.random.key(int(rng.integers(1 << 30))), x)["params"]
    qparams = lowbit_linen.quantize_params(params, bits=4, group_size=64, where="Dense")
    assert isinstance(qparams["Dense_0"]["kernel"], jax_lowbit.QuantizedWeight)
    assert not isinstance(qparams["middle"]["kernel"], jax_lowbit.QuantizedWeight)
    # Reference: the same model with dequantized kernels, no interception.
    dequantized = jax.tree.map(lambda a: a, qparams)
    for name in ("Dense_0", "Dense_1"):
        dequantized[name]["kernel"] = qparams[name]["kernel"].dequantize()
    # Highest precision: "middle" stays a float32 Dense, which a GPU would
    # otherwise run in TF32.
    with jax.default_matmul_precision("highest"):
        want = model.apply({"params": dequantized}, x)
        with lowbit_linen.quantized_dense():
            eager = model.apply({"params": qparams}, x)
            jitted = jax.jit(lambda p, a: model.apply({"params": p}, a))(qparams, x)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(want), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(want), rtol=1e-5, atol=1e-4)


def test_linen_checkpoint_roundtrip(rng, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    model = DenseNet()
    x = jnp.asarray(rng.normal(size=(2, 128)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    qparams = lowbit_linen.quantize_params(params, bits=2, group_size=128, symmetric=False)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", qparams)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "ckpt", qparams)
    with lowbit_linen.quantized_dense():
        np.testing.assert_array_equal(np.asarray(model.apply({"params": restored}, x)),
                                      np.asarray(model.apply({"params": qparams}, x)))
    assert restored["Dense_0"]["kernel"].bits == 2


class Mixed(nnx.Module):
    def __init__(self, rngs):
        self.general = nnx.LinearGeneral(128, (4, 16), rngs=rngs)  # plain matmul, 2 output axes
        self.einsum = nnx.Einsum("btk,kn->btn", (64, 32), (32,), rngs=rngs)
        self.attention_like = nnx.Einsum("btk,kn->bnt", (64, 32), rngs=rngs)  # not a plain matmul


def test_linear_general_and_einsum(rng):
    model = Mixed(nnx.Rngs(0))
    x = jnp.asarray(rng.normal(size=(2, 3, 128)), jnp.float32)
    z = jnp.asarray(rng.normal(size=(2, 3, 64)), jnp.float32)
    float_general, float_einsum = np.asarray(model.general(x)), np.asarray(model.einsum(z))
    model, summary = quantize_model(model, bits=8, group_size=32, verbose=False,
                                    return_summary=True)
    assert isinstance(model.general, QuantLinear) and isinstance(model.einsum, QuantLinear)
    assert isinstance(model.attention_like, nnx.Einsum)
    assert [p for p, _ in summary.skipped] == [("attention_like",)]
    y = model.general(x)
    assert y.shape == (2, 3, 4, 16)
    want = _reference(model.general, x).reshape(2, 3, 4, 16)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(model.einsum(z)), _reference(model.einsum, z),
                               rtol=1e-5, atol=1e-4)
    # And close to the float layers they replace (int8).
    for got, want in ((y, float_general), (model.einsum(z), float_einsum)):
        assert np.linalg.norm(np.asarray(got) - want) < 0.02 * np.linalg.norm(want)


def test_quant_linear_with_gptq_act_order(rng):
    """A GPTQ act-order import runs in QuantLinear with its input permutation."""
    from jax_lowbit.importers import load_gptq
    from test_importers import _pack_along

    k, n, group = 256, 32, 64
    codes = rng.integers(0, 16, size=(k, n))
    zeros = rng.integers(1, 17, size=(k // group, n))
    scales = rng.uniform(1e-3, 5e-2, size=(k // group, n)).astype(np.float16)
    g_idx = (np.arange(k) // group)[rng.permutation(k)]
    weight, permutation = load_gptq(_pack_along(codes, 4, 0), _pack_along(zeros - 1, 4, 1),
                                    scales, g_idx)
    layer = QuantLinear(weight, input_permutation=permutation)
    x = jnp.asarray(rng.normal(size=(3, k)), jnp.float32)
    w = scales.astype(np.float64)[g_idx] * (codes - zeros[g_idx])  # the checkpoint's W
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(x, np.float64) @ w,
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="permutation"):
        QuantLinear(weight, input_permutation=np.zeros(k, int))


def _assert_same_codes(got, want, bits):
    """Codes equal but for rare off-by-one rounding at near-ties: quantize_model sums
    the Hessian over a slice of a doubled batch, in another order than a direct call."""
    got, want = (np.asarray(formats.unpack_codes(jnp.asarray(c), bits), np.int64)
                 for c in (got, want))
    differ = got != want
    assert np.all(np.abs(got - want) <= 1) and differ.mean() <= 1e-3, differ.mean()


def test_quantize_model_with_calibration_quantizes_in_call_order(rng):
    """With calibration each layer is quantized by GPTQ from the inputs the
    layers quantized before it give it, towards the float model's outputs; the
    model's output on fresh inputs moves much less than with RTN."""
    from test_gptq import _input_distribution

    model = MLP(nnx.Rngs(int(rng.integers(1 << 30))), widths=(128, 256, 256, 32))
    draw = _input_distribution(rng, 128)
    x = jnp.asarray(draw(256))
    gptq = quantize_model(nnx.clone(model), bits=4, group_size=64, symmetric=False,
                          calibration=x, act_order=True, verbose=False)
    assert isinstance(model.up, nnx.Linear)  # the float model got its layers back

    # The first layer is plain GPTQ; the second sees the quantized first one's outputs.
    up, up_order = gptq_quantize(model.up.kernel[...], input_hessian(x), 4, 64, act_order=True)
    _assert_same_codes(gptq.up.codes[...], up.codes, 4)
    np.testing.assert_array_equal(np.asarray(gptq.up.input_permutation[...]), up_order)
    hidden_float, hidden = nnx.relu(model.up(x)), nnx.relu(gptq.up(x))
    block, _ = gptq_quantize(model.blocks[0].kernel[...], input_hessian(hidden), 4, 64,
                             act_order=True, float_cross=input_hessian(hidden, hidden_float))
    _assert_same_codes(gptq.blocks[0].codes[...], block.codes, 4)

    x_new = jnp.asarray(draw(256))
    float_out = np.asarray(model(x_new))

    def error(quantized):
        return np.linalg.norm(np.asarray(quantized(x_new)) - float_out) / np.linalg.norm(float_out)

    rtn = quantize_model(nnx.clone(model), bits=4, group_size=64, symmetric=False, verbose=False)
    assert error(gptq) < 0.5 * error(rtn), (error(gptq), error(rtn))
    y = nnx.jit(lambda m, a: m(a))(gptq, x_new)
    np.testing.assert_allclose(np.asarray(y), np.asarray(gptq(x_new)), rtol=1e-5, atol=1e-5)


class BatchCentered(nnx.Module):
    """Mixes the examples of a batch: calibration cannot run it on the batch twice over."""

    def __init__(self, rngs):
        self.linear = nnx.Linear(64, 32, rngs=rngs)
        self.unused = nnx.Linear(64, 32, rngs=rngs)

    def __call__(self, x):
        y = self.linear(x)
        return y - jnp.mean(y, axis=0)


def test_quantize_model_calibration_bad_input(rng):
    model = BatchCentered(nnx.Rngs(0))
    x = jnp.asarray(rng.normal(size=(16, 64)), jnp.float32)
    with pytest.raises(ValueError, match="twice over"):
        quantize_model(model, bits=4, group_size=32, calibration=x, where="linear",
                       verbose=False)
    assert isinstance(model.linear, nnx.Linear)  # put back after the error
    with pytest.raises(ValueError, match="never reached"):
        quantize_model(model, bits=4, group_size=32, calibration=x, verbose=False)
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(model, bits=4, calibration=x, method="hqq", verbose=False)
    with pytest.raises(ValueError, match="sparse"):
        quantize_model(model, bits=4, group_size=32, calibration=x, sparsity="2:4",
                       verbose=False)
    with pytest.raises(ValueError, match="integer group scales"):
        quantize_model(model, bits=4, group_size=32, calibration=x, scale_dtype=jnp.float32,
                       integer_group_scales=True, verbose=False)
