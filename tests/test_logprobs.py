"""kardia_jax.models.logprobs: chunked log-probabilities and entropies, and the fused per-token loss's
custom VJP, against the direct formula (log_softmax of the full [B, T, V] logits) and jax.grad of it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers_float import assert_trees_close
from helpers_models import SAME_SUMS, direct_logprobs, forward, loss_grads, next_targets
from kardia_jax.models import chunked_logprobs, from_pretrained, fused_token_loss, positions_from_mask


@pytest.mark.parametrize("chunk_size", [1, 5, 12, 64])
def test_chunked_logprobs_function(chunk_size):
    kh, kw, kt = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(kh, (2, 12, 16))
    w = jax.random.normal(kw, (16, 40))
    targets = jax.random.randint(kt, (2, 12), 0, 40)
    logp, ent = chunked_logprobs(h, w, targets, temperature=1.3, chunk_size=chunk_size, with_entropy=True)
    expected, logp_all = direct_logprobs(h @ w, targets, 1.3)
    np.testing.assert_allclose(logp, expected, **SAME_SUMS)
    np.testing.assert_allclose(ent, -jnp.sum(jnp.exp(logp_all) * logp_all, -1), **SAME_SUMS)
    assert chunked_logprobs(h, w, targets, 1.3, chunk_size).shape == (2, 12)


def _ppo_token_loss(logp, aux):
    """A GRPO-like per-token loss: clipped ratio times an advantage, weighted; nonlinear in logp."""
    old, adv, weight = aux
    ratio = jnp.exp(logp - old)
    return -jnp.minimum(ratio * adv, jnp.clip(ratio, 0.8, 1.2) * adv) * weight


@pytest.mark.parametrize("chunk_size", [1, 4, 13, 64])  # 4 does not divide T = 13; 64 > T
def test_fused_token_loss_equals_autodiff_of_the_unfused_loss(chunk_size):
    """Loss, logp, entropy and the gradients to h and unembed equal plain autodiff through the full
    [B, T, V] logits (within float32 accumulation error), under an outer scale (the backward multiplies
    by the cotangent)."""
    kh, kw, kt, ko, ka = jax.random.split(jax.random.key(0), 5)
    b, t, d, v = 3, 13, 16, 40
    h = jax.random.normal(kh, (b, t, d))
    w = jax.random.normal(kw, (d, v))
    targets = jax.random.randint(kt, (b, t), 0, v)
    # old logprobs near the current ones, so some ratios fall inside and some outside the clip range
    logp_now, _ = direct_logprobs(h @ w, targets, 1.3)
    old = logp_now + 0.3 * jax.random.normal(ko, (b, t))
    aux = (old, jnp.broadcast_to(jax.random.normal(ka, (b, 1)), (b, t)), jnp.linspace(0.0, 1.0, b * t).reshape(b, t))

    def direct(h, w):
        logp, logp_all = direct_logprobs(h @ w, targets, 1.3)
        entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, -1)
        return 2.5 * jnp.sum(_ppo_token_loss(logp, aux)), (logp, entropy)

    def fused(h, w):
        loss, logp, entropy = fused_token_loss(h, w, targets, _ppo_token_loss, aux, temperature=1.3,
                                               chunk_size=chunk_size, with_entropy=True)
        return 2.5 * loss, (logp, entropy)

    (loss_d, aux_d), grads_d = jax.value_and_grad(direct, argnums=(0, 1), has_aux=True)(h, w)
    (loss_f, aux_f), grads_f = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(h, w)
    np.testing.assert_allclose(loss_f, loss_d, rtol=1e-5)
    for got, want in zip(aux_f + grads_f, aux_d + grads_d):
        assert_trees_close(got, want)  # each array against its own largest entry
    assert float(jnp.mean(jnp.abs(jnp.exp(aux_d[0] - old) - 1) > 0.2)) > 0.2  # the clip is exercised

    # Not differentiated (evaluation): the same values, and no gradient work in the program.
    loss_e, logp_e, entropy_e = jax.jit(lambda h, w: fused_token_loss(
        h, w, targets, _ppo_token_loss, aux, temperature=1.3, chunk_size=chunk_size))(h, w)
    np.testing.assert_allclose(loss_e, loss_d / 2.5, rtol=1e-5)
    np.testing.assert_allclose(logp_e, aux_d[0], **SAME_SUMS)
    assert entropy_e is None


@pytest.mark.parametrize("name", ["qwen2", "gemma"])
def test_target_logprobs_match_log_softmax(zoo, padded_batch, name):
    model = from_pretrained(zoo(name)[1])
    tokens, mask = padded_batch
    targets = next_targets(tokens)
    positions = positions_from_mask(jnp.asarray(mask))
    logp, ent = model.target_logprobs(
        jnp.asarray(tokens), positions, jnp.asarray(mask), jnp.asarray(targets),
        temperature=0.7, chunk_size=5, with_entropy=True,
    )  # chunk 5 does not divide T = 12
    expected, logp_all = direct_logprobs(forward(model, tokens, mask), jnp.asarray(targets), 0.7)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logp)[valid], np.asarray(expected)[valid], **SAME_SUMS)
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, -1)
    np.testing.assert_allclose(np.asarray(ent)[valid], np.asarray(entropy)[valid], **SAME_SUMS)
    assert float(jnp.min(entropy)) > 0.1  # temperature 0.7 on these logits is far from one-hot

    value_c, grads_c = loss_grads(model, tokens, mask, targets, chunked=True)
    value_d, grads_d = loss_grads(model, tokens, mask, targets, chunked=False)
    np.testing.assert_allclose(value_c, value_d, rtol=1e-6)
    assert jax.tree.structure(grads_c) == jax.tree.structure(grads_d)
    assert_trees_close(grads_c, grads_d)  # float32 accumulation error (|grad| reaches ~20 here)
    assert float(jnp.max(jnp.abs(grads_d["layers"]["q"][...]))) > 1e-2  # gradients are not trivially 0
