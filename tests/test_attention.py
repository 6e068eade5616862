"""kardia_jax.models.attention: the KV cache (prefill + one-token decode == the full forward) and
prefix blocks shared in place by several rows (fan-out == independent full forwards)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers_hf import left_padded_batch, make_hf_model
from helpers_models import FAMILY_MODELS, VS_OTHER_ORDER, forward
from kardia_jax.models import KVCache, fan_out_prefix, from_pretrained, init_cache, positions_from_mask


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, state, tokens, positions, mask, cache):
    return nnx.merge(graphdef, state)(tokens, positions, mask, cache)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_kv_cache_prefill_then_decode(zoo, name):
    model = from_pretrained(zoo(name)[1])
    graphdef, state = nnx.split(model)
    prompt, prompt_mask = left_padded_batch(256, (7, 4, 1), 7, seed=3)
    new = np.random.default_rng(4).integers(1, 256, (3, 4)).astype(np.int32)
    full_tokens = np.concatenate([prompt, new], axis=1)
    full_mask = np.concatenate([prompt_mask, np.ones_like(new)], axis=1)
    expected = np.asarray(forward(model, full_tokens, full_mask))  # [3, 11, V]

    cache = init_cache(model.config, batch=3, length=7 + 4 + 2)  # 2 spare columns, never valid
    positions = positions_from_mask(jnp.asarray(prompt_mask))
    logits, cache = _step(graphdef, state, jnp.asarray(prompt), positions, jnp.asarray(prompt_mask), cache)
    valid = prompt_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[valid], expected[:, :7][valid], **VS_OTHER_ORDER)
    assert isinstance(cache, KVCache) and int(cache.end) == 7
    np.testing.assert_array_equal(np.asarray(cache.own.valid)[:, :7], valid)

    next_pos = positions[:, -1:] + 1
    for i in range(4):
        tok = jnp.asarray(new[:, i : i + 1])
        logits, cache = _step(graphdef, state, tok, next_pos, jnp.ones((3, 1), jnp.int32), cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], expected[:, 7 + i], **VS_OTHER_ORDER, err_msg=f"step {i}")
        next_pos = next_pos + 1
    assert int(cache.end) == 11
    assert not np.asarray(cache.own.valid)[:, 11:].any()


def test_prefill_prefix_fan_out_equals_full_forward(tmp_path):
    """A prompt prefilled once and shared (no copies) by F continuations, with and without an own cache,
    gives the logits of F independent full forwards."""
    _, path = make_hf_model("qwen2", tmp_path)
    model = from_pretrained(path)
    prompt, prompt_mask = left_padded_batch(256, (7, 4), 7, seed=3)
    fan, t = 3, 4
    suffix = np.random.default_rng(4).integers(1, 256, (2 * fan, t)).astype(np.int32)
    suffix_mask = np.ones_like(suffix)
    _, cache = model.prefill(jnp.asarray(prompt), positions_from_mask(jnp.asarray(prompt_mask)), jnp.asarray(prompt_mask))
    start = jnp.repeat(jnp.asarray(prompt_mask).sum(-1), fan)[:, None]
    full_tokens = np.concatenate([np.repeat(prompt, fan, 0), suffix], 1)
    full_mask = np.concatenate([np.repeat(prompt_mask, fan, 0), suffix_mask], 1)
    ref, _ = model(jnp.asarray(full_tokens), positions_from_mask(jnp.asarray(full_mask)), jnp.asarray(full_mask))
    for own_length in (0, t):
        shared = fan_out_prefix(cache, fan, own_length)
        logits, _ = model(jnp.asarray(suffix), start + positions_from_mask(jnp.asarray(suffix_mask)), jnp.asarray(suffix_mask), shared)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref)[:, -t:], **VS_OTHER_ORDER)
