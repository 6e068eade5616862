"""GRPO advantages and loss against a direct NumPy (float64) transcription of the formulas.

The reference below is written from the formulas, not from kardia_jax.grpo.loss: per-token loss
-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta KL, with r = exp(logp - old_logp), and its
gradient with respect to logp derived by hand:
  d/dlogp [-min(r A, clip(r) A)] = -r A where the unclipped term is the minimum, else 0
  d/dlogp KL, q = clamp(ref_logp - logp): k1 -> 1, k2 -> -q, k3 -> 1 - exp(q)  (0 where clamped)
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kardia_jax.grpo.loss import (
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    REWARD_SCALINGS,
    GRPOConfig,
    group_advantages,
    grpo_loss,
    loss_normalizers,
)

GROUP = 4
NUM_SEQ = 8  # two prompts x four samples
T = 12
# float32 losses, gradients and advantages against the float64 NumPy transcription: float32 rounding of
# exp/log and accumulation error of the sums over the 96 tokens (observed: <= 2e-5 relative, 1e-7 absolute).
ATOL = RTOL = 1e-5


# ----------------------------------------------------------------------------- NumPy reference


def np_advantages(rewards, group_size, scale, eps=1e-4):
    groups = rewards.reshape(-1, group_size)
    centered = groups - groups.mean(axis=1, keepdims=True)
    if scale == "group":
        centered = centered / (groups.std(axis=1, ddof=1, keepdims=True) + eps)
    elif scale == "batch":
        centered = centered / (rewards.std(ddof=1) + eps)
    return centered.reshape(-1)


def np_loss_and_grad(logp, old, ref, adv, mask, *, eps_low, eps_high, beta, estimator, clamp, aggregation,
                     num_tokens=None, num_seqs=None, max_len=None):
    """Loss and d loss / d logp in float64; the normalisers default to this batch's."""
    logp, old, ref, adv, mask = (np.asarray(x, np.float64) for x in (logp, old, ref, adv, mask))
    num_tokens = max(mask.sum(), 1.0) if num_tokens is None else num_tokens
    num_seqs = mask.shape[0] if num_seqs is None else num_seqs
    max_len = mask.shape[1] if max_len is None else max_len
    a = adv[:, None]
    ratio = np.exp(logp - old)
    unclipped = ratio * a
    clipped = np.clip(ratio, 1 - eps_low, 1 + eps_high) * a
    loss_tok = -np.minimum(unclipped, clipped)
    grad_tok = np.where(unclipped <= clipped, -unclipped, 0.0)
    q_raw = ref - logp
    inside = np.abs(q_raw) < clamp
    q = np.clip(q_raw, -clamp, clamp)
    kl, dkl = {
        "k1": (-q, np.ones_like(q)),
        "k2": (q**2 / 2, -q),
        "k3": (np.exp(q) - q - 1, 1 - np.exp(q)),
    }[estimator]
    loss_tok = loss_tok + beta * kl
    grad_tok = grad_tok + beta * dkl * inside
    if aggregation == "token_mean":
        w = mask / num_tokens
    elif aggregation == "seq_mean_token_mean":
        w = mask / (np.maximum(mask.sum(1, keepdims=True), 1) * num_seqs)
    else:  # dr_grpo
        w = mask / (num_seqs * max_len)
    return (loss_tok * w).sum(), grad_tok * w


# ----------------------------------------------------------------------------- inputs


def random_batch(seed, clamp_outliers=True):
    rng = np.random.default_rng(seed)
    lengths = np.array([T, 1, 5, T, 0, 7, 3, 9])  # includes an empty and a full-length completion
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    logp = -rng.uniform(0.05, 3.0, (NUM_SEQ, T))
    old = logp + rng.normal(0, 0.4, (NUM_SEQ, T))  # ratios on both sides of the clip range
    ref = logp + rng.normal(0, 0.7, (NUM_SEQ, T))
    if clamp_outliers:
        ref[0, :3] = logp[0, :3] + np.array([4.0, -4.0, 3.5])  # beyond a clamp of 3
    logp = np.where(mask > 0, logp, 100.0)  # garbage on padding must not leak (exp(100) = inf in f32)
    rewards = rng.integers(0, 4, NUM_SEQ).astype(np.float32) / 3.0
    return [x.astype(np.float32) for x in (logp, old, ref, mask)] + [rewards]


@functools.partial(jax.jit, static_argnames="config")
def loss_and_grad(logp, old, ref, adv, mask, config, normalizers=None, truncated=None):
    def f(lp):
        return grpo_loss(lp, old, ref, adv, mask, config, truncated=truncated, normalizers=normalizers)

    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(logp)
    return loss, grad, metrics


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("scale", REWARD_SCALINGS)
def test_advantages_match_numpy(scale):
    rewards = np.random.default_rng(0).uniform(0, 1, 16).astype(np.float32)
    got = jax.jit(group_advantages, static_argnums=(1, 2))(rewards, GROUP, scale)
    np.testing.assert_allclose(got, np_advantages(rewards.astype(np.float64), GROUP, scale), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("scale", REWARD_SCALINGS)
def test_equal_rewards_give_zero_advantage(scale):
    rewards = jnp.array([0.5, 0.5, 0.5, 0.5, 0.0, 1.0, 1.0, 0.0])
    adv = group_advantages(rewards, GROUP, scale)
    np.testing.assert_array_equal(adv[:GROUP], 0.0)
    assert jnp.all(adv[GROUP:] != 0)


def test_advantages_reject_bad_groups():
    with pytest.raises(ValueError, match="groups"):
        group_advantages(jnp.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(jnp.zeros(6), 1, "group")


@pytest.mark.parametrize(
    "aggregation,estimator,scale", list(itertools.product(LOSS_AGGREGATIONS, KL_ESTIMATORS, REWARD_SCALINGS))
)
def test_loss_and_grad_match_numpy(aggregation, estimator, scale):
    logp, old, ref, mask, rewards = random_batch(seed=1)
    config = GRPOConfig(beta=0.1, kl_estimator=estimator, kl_clamp=3.0, loss_aggregation=aggregation,
                        scale_rewards=scale, epsilon_low=0.2, epsilon_high=0.28)
    adv = group_advantages(jnp.asarray(rewards), GROUP, scale)
    loss, grad, metrics = loss_and_grad(logp, old, ref, adv, mask, config)
    want_loss, want_grad = np_loss_and_grad(
        logp, old, ref, np.asarray(adv), mask, eps_low=0.2, eps_high=0.28, beta=0.1, estimator=estimator,
        clamp=3.0, aggregation=aggregation)
    np.testing.assert_allclose(loss, want_loss, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(grad, want_grad, atol=ATOL, rtol=RTOL)
    assert np.all(np.asarray(grad)[mask == 0] == 0)
    assert np.isfinite(np.asarray(grad)).all() and np.isfinite(loss)


def test_metrics_match_numpy():
    logp, old, ref, mask, rewards = random_batch(seed=2)
    config = GRPOConfig(epsilon_low=0.2, epsilon_high=0.28, kl_clamp=None)
    adv = np.asarray(group_advantages(jnp.asarray(rewards), GROUP))
    _, _, metrics = loss_and_grad(logp, old, ref, adv, mask, config)
    on = mask > 0
    ratio = np.exp(logp.astype(np.float64) - old)[on]
    a = np.broadcast_to(adv[:, None], mask.shape)[on]
    q = (ref.astype(np.float64) - logp)[on]
    low, high = (ratio < 0.8) & (a < 0), (ratio > 1.28) & (a > 0)
    assert low.any() and high.any()
    # Fractions of 0/1 flags: float32 sums of integers are exact, the division rounds once.
    np.testing.assert_allclose(metrics["clip_ratio/low"], low.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_ratio/high"], high.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_ratio/region"], (low | high).mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["ratio_mean"], ratio.mean(), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(metrics["kl"], (np.exp(q) - q - 1).mean(), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("aggregation", LOSS_AGGREGATIONS)
def test_on_policy_zero_loss_nonzero_grad(aggregation):
    """Ratio 1, beta 0, equal lengths: group advantages sum to zero, so does the loss; its gradient does not."""
    _, _, _, _, rewards = random_batch(seed=3)
    logp = -np.random.default_rng(3).uniform(0.05, 3.0, (NUM_SEQ, T)).astype(np.float32)
    mask = np.ones_like(logp)
    config = GRPOConfig(beta=0.0, loss_aggregation=aggregation)
    adv = group_advantages(jnp.asarray(rewards), GROUP)
    for old in (logp, None):  # explicit old logprobs, and on-policy stop_gradient(logp)
        loss, grad, metrics = loss_and_grad(logp, old, None, adv, mask, config)
        # The target is 0, so only an atol applies: the float32 sum of 96 advantage-weighted terms of size ~1
        # cancels to within float32 accumulation error (observed 1.5e-7).
        np.testing.assert_allclose(loss, 0.0, atol=1e-6)
        assert np.abs(np.asarray(grad)).max() > 1e-3
        assert "kl" not in metrics
        np.testing.assert_allclose(metrics["ratio_mean"], 1.0, rtol=1e-6)  # exp(0) = 1; the mean rounds at most once


def test_beta_zero_needs_no_reference():
    logp, old, ref, mask, rewards = random_batch(seed=4)
    adv = group_advantages(jnp.asarray(rewards), GROUP)
    config = GRPOConfig(beta=0.0)
    loss_none, grad_none, _ = loss_and_grad(logp, old, None, adv, mask, config)
    loss_ref, grad_ref, metrics = loss_and_grad(logp, old, ref, adv, mask, config)
    # Two programs (with and without the reference input) may order the float32 sums differently.
    np.testing.assert_allclose(loss_none, loss_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad_none, grad_ref, rtol=1e-6, atol=1e-7)
    assert "kl" in metrics  # still logged when a reference is given
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(jnp.asarray(logp), old, None, adv, mask, GRPOConfig(beta=0.04))


@pytest.mark.parametrize("aggregation", LOSS_AGGREGATIONS)
def test_gradient_accumulation_equals_full_batch(aggregation):
    logp, old, ref, mask, rewards = random_batch(seed=5)
    truncated = np.zeros(NUM_SEQ, bool)
    truncated[[0, 3]] = True
    config = GRPOConfig(loss_aggregation=aggregation, kl_clamp=3.0, mask_truncated_completions=True)
    adv = group_advantages(jnp.asarray(rewards), GROUP)
    full_loss, full_grad, full_metrics = loss_and_grad(logp, old, ref, adv, mask, config, truncated=truncated)
    norm = loss_normalizers(jnp.asarray(mask), config, jnp.asarray(truncated))
    for k in (2, 4):
        rows = np.split(np.arange(NUM_SEQ), k)
        parts = [loss_and_grad(logp[r], old[r], ref[r], adv[r], mask[r], config, norm, truncated[r]) for r in rows]
        np.testing.assert_allclose(sum(p[0] for p in parts), full_loss, atol=1e-6, rtol=1e-5)
        np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), full_grad, atol=1e-7, rtol=1e-5)
        for key, value in full_metrics.items():
            np.testing.assert_allclose(sum(p[2][key] for p in parts), value, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("aggregation", LOSS_AGGREGATIONS)
def test_mask_truncated_completions(aggregation):
    logp, old, ref, mask, rewards = random_batch(seed=6)
    truncated = np.zeros(NUM_SEQ, bool)
    truncated[[0, 5]] = True
    adv = group_advantages(jnp.asarray(rewards), GROUP)
    config = GRPOConfig(loss_aggregation=aggregation, mask_truncated_completions=True)
    loss, grad, _ = loss_and_grad(logp, old, ref, adv, mask, config, truncated=truncated)
    assert np.all(np.asarray(grad)[truncated] == 0)
    manual_mask = mask * ~truncated[:, None]
    want_loss, want_grad = np_loss_and_grad(
        logp, old, ref, np.asarray(adv), manual_mask, eps_low=0.2, eps_high=0.2, beta=0.04, estimator="k3",
        clamp=10.0, aggregation=aggregation)
    np.testing.assert_allclose(loss, want_loss, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(grad, want_grad, atol=ATOL, rtol=RTOL)
    unmasked_loss, _, _ = loss_and_grad(logp, old, ref, adv, mask, GRPOConfig(loss_aggregation=aggregation))
    assert not np.isclose(loss, unmasked_loss)
    with pytest.raises(ValueError, match="truncated"):
        grpo_loss(jnp.asarray(logp), old, ref, adv, mask, config)


def test_config_rejects_unknown_choices():
    with pytest.raises(ValueError, match="kl_estimator"):
        GRPOConfig(kl_estimator="k4")
    with pytest.raises(ValueError, match="loss_aggregation"):
        GRPOConfig(loss_aggregation="sum")
