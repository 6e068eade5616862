"""Shared pieces of the model tests (tests/test_decoder.py, test_attention.py, test_logprobs.py,
test_weights.py, test_model_config.py): the named tiny HF models, their tolerances, and jitted
forwards and gradients (graphdef static, state as an argument). The `zoo` and `padded_batch`
fixtures over them live in conftest.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kardia_jax.models import positions_from_mask

# Named tiny HF models: name -> (family, config overrides).
MODELS = {
    "qwen2": ("qwen2", {"tie_word_embeddings": False}),
    "qwen2_tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {}),
    "gemma": ("gemma", {}),
}
FAMILY_MODELS = ["qwen2", "qwen3", "gemma"]

# A left-padded batch [3, 12]: one full row, one with 3 pads, one with 8 pads.
LENGTHS, T = (12, 9, 4), 12

# float32 accumulation error of the tiny models' logits, logprobs and entropies (|value| <= ~15; observed
# <= 5e-6 absolute). VS_OTHER_ORDER: another computation of them (transformers' torch kernels, a KV cache,
# sums split over devices). SAME_SUMS: one forward's logits read another way (chunked log-softmax, a
# resized vocabulary).
VS_OTHER_ORDER = dict(rtol=1e-4, atol=1e-5)
SAME_SUMS = dict(rtol=1e-5, atol=1e-5)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, mask):
    model = nnx.merge(graphdef, state)
    logits, _ = model(tokens, positions_from_mask(mask), mask)
    return logits


def forward(model, tokens, mask) -> jax.Array:
    """Logits [B, T, V] float32 of a full (cache-less) forward."""
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask))


def direct_logprobs(logits, targets, temperature):
    """(log p(targets) [B, T], log_softmax [B, T, V]) of logits / temperature, the direct formula."""
    logp_all = jax.nn.log_softmax(logits / temperature, axis=-1)
    return jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0], logp_all


@functools.partial(jax.jit, static_argnums=(0, 1))
def _loss_grads(graphdef, chunked, state, tokens, mask, targets):
    """d/dparams of sum(mask * log p(targets)), by target_logprobs (chunked) or log_softmax (direct)."""

    def loss(state):
        model = nnx.merge(graphdef, state)
        positions = positions_from_mask(mask)
        if chunked:
            logp = model.target_logprobs(tokens, positions, mask, targets, temperature=0.7, chunk_size=5)
        else:
            logits, _ = model(tokens, positions, mask)
            logp, _ = direct_logprobs(logits, targets, 0.7)
        return jnp.sum(logp * mask)

    return jax.value_and_grad(loss)(state)


def loss_grads(model, tokens, mask, targets, chunked=True):
    graphdef, state = nnx.split(model)
    return _loss_grads(graphdef, chunked, state, *map(jnp.asarray, (tokens, mask, targets)))


def count_remat(model, tokens, mask, targets) -> int:
    """How many remat (jax.checkpoint) regions the gradient's jaxpr has."""
    graphdef, state = nnx.split(model)
    args = tuple(map(jnp.asarray, (tokens, mask, targets)))
    return str(jax.make_jaxpr(lambda s: _loss_grads.__wrapped__(graphdef, True, s, *args))(state)).count("remat")


def next_targets(tokens):
    """Next-token targets [B, T] (the last column wraps; it is as good a target as any)."""
    return np.roll(tokens, -1, axis=1)
