"""GRPO: group-relative advantages and the clipped policy-gradient loss with a KL penalty.

Everything here is a pure function of arrays (plus a static, hashable `GRPOConfig`), usable under
`jax.jit`. Shapes, with N = completions in the batch (prompts x group_size, one prompt's group_size
samples contiguous) and T = completion length:

  logp, old_logp, ref_logp, completion_mask   [N, T] float32  (mask: 1 on generated tokens)
  rewards, advantages, truncated               [N]

Per token, with ratio = exp(logp - old_logp) and A the sequence's advantage,

  loss_t = -min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A) + beta * KL_t

where KL_t estimates KL(policy || reference) from q = ref_logp - logp (see `kl_divergence`).

Gradient accumulation. Every aggregation mode is a weighted sum of per-token losses divided by a
normaliser that depends on the whole batch (its masked-token count, its number of sequences, its
completion length). `loss_normalizers` computes those once on the full batch; passing the result to
`grpo_loss` for each of k minibatches (split by rows) makes the k losses, their gradients and their
metrics add up exactly to the full-batch values. Without it, `grpo_loss` normalises by the batch it is
given, which is the full-batch loss when that batch is the full batch.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "dr_grpo")
REWARD_SCALINGS = ("group", "batch", "none")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO loss hyper-parameters (frozen, so it can be a static argument of `jax.jit`).

    epsilon_low / epsilon_high: the ratio is clipped to [1 - epsilon_low, 1 + epsilon_high]
        (equal values: PPO/GRPO; epsilon_high > epsilon_low: DAPO's clip-higher).
    beta: weight of the KL penalty to the frozen reference; 0 disables it (no reference needed).
    kl_estimator: "k1" (-q), "k2" (q^2 / 2) or "k3" (exp(q) - q - 1), q = ref_logp - logp.
    kl_clamp: q is clamped to [-kl_clamp, kl_clamp] before the estimator (None: no clamp).
    loss_aggregation: "token_mean", "seq_mean_token_mean" or "dr_grpo" (see `grpo_loss`).
    scale_rewards: "group", "batch" or "none" (see `group_advantages`).
    mask_truncated_completions: completions that hit the length limit without a stop token get a
        zero mask (they neither contribute to the loss nor count as tokens).
    """

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.04
    kl_estimator: str = "k3"
    kl_clamp: float | None = 10.0
    loss_aggregation: str = "token_mean"
    scale_rewards: str = "group"
    mask_truncated_completions: bool = False

    @classmethod
    def from_config(cls, section) -> "GRPOConfig":
        """The loss settings of a config's `grpo` section: every field it declares (kl_clamp, which it
        does not, keeps its default)."""
        return cls(**{f.name: section[f.name] for f in dataclasses.fields(cls) if f.name in section})

    def __post_init__(self):
        for name, value, allowed in (
            ("kl_estimator", self.kl_estimator, KL_ESTIMATORS),
            ("loss_aggregation", self.loss_aggregation, LOSS_AGGREGATIONS),
            ("scale_rewards", self.scale_rewards, REWARD_SCALINGS),
        ):
            if value not in allowed:
                raise ValueError(f"GRPOConfig.{name}={value!r}; choose one of {allowed}.")
        if not (0 <= self.epsilon_low < 1 and self.epsilon_high >= 0):
            raise ValueError(
                f"GRPOConfig: need 0 <= epsilon_low < 1 and epsilon_high >= 0, got "
                f"epsilon_low={self.epsilon_low}, epsilon_high={self.epsilon_high}."
            )
        if self.beta < 0:
            raise ValueError(f"GRPOConfig.beta={self.beta} must be >= 0.")
        if self.kl_clamp is not None and self.kl_clamp <= 0:
            raise ValueError(f"GRPOConfig.kl_clamp={self.kl_clamp} must be > 0 or None.")


def group_advantages(
    rewards: jax.Array, group_size: int, scale_rewards: str = "group", eps: float = 1e-4
) -> jax.Array:
    """Group-relative advantages: each reward minus its group's mean, optionally scaled.

    rewards: [N], groups of `group_size` consecutive samples (one prompt each). Returns [N] float32.
    scale_rewards: "group" divides by (the group's std + eps), "batch" by (the std of all N rewards
    + eps), "none" does not divide (Dr. GRPO). The std is the sample (unbiased, ddof=1) standard
    deviation, as `torch.std` in TRL, so group sizes below 2 are rejected for "group".
    A group whose rewards are all equal gets zero advantages.
    """
    if scale_rewards not in REWARD_SCALINGS:
        raise ValueError(f"scale_rewards={scale_rewards!r}; choose one of {REWARD_SCALINGS}.")
    num = rewards.shape[0]
    if group_size < 1 or num % group_size:
        raise ValueError(f"{num} rewards do not split into groups of group_size={group_size}.")
    if scale_rewards == "group" and group_size < 2:
        raise ValueError("scale_rewards='group' needs group_size >= 2 (the std uses ddof=1).")
    if scale_rewards == "batch" and num < 2:
        raise ValueError("scale_rewards='batch' needs at least 2 rewards (the std uses ddof=1).")
    rewards = rewards.astype(jnp.float32)
    grouped = rewards.reshape(-1, group_size)  # [N / group_size, group_size]
    centered = grouped - grouped.mean(axis=1, keepdims=True)  # [N / group_size, group_size]
    if scale_rewards == "group":
        centered = centered / (grouped.std(axis=1, ddof=1, keepdims=True) + eps)
    elif scale_rewards == "batch":
        centered = centered / (rewards.std(ddof=1) + eps)
    return centered.reshape(num)


def kl_divergence(
    logp: jax.Array, ref_logp: jax.Array, estimator: str = "k3", clamp: float | None = 10.0
) -> jax.Array:
    """Per-token estimate of KL(policy || reference) from samples of the policy. [N, T] -> [N, T].

    With q = ref_logp - logp (the log of reference / policy at the sampled token):
    k1 = -q (unbiased, can be negative), k2 = q^2 / 2, k3 = exp(q) - q - 1 (unbiased, >= 0).
    If `clamp` is set, q itself is clamped to [-clamp, clamp] before the estimator, which bounds
    exp(q) and zeroes the gradient of tokens whose |q| exceeds the clamp.
    """
    q = ref_logp - logp
    if clamp is not None:
        q = jnp.clip(q, -clamp, clamp)
    if estimator == "k1":
        return -q
    if estimator == "k2":
        return 0.5 * q * q
    if estimator == "k3":
        return jnp.expm1(q) - q
    raise ValueError(f"kl estimator {estimator!r}; choose one of {KL_ESTIMATORS}.")


class LossNormalizers(NamedTuple):
    """Batch-level denominators of the loss and metrics (scalars, float32), see `loss_normalizers`."""

    num_tokens: jax.Array  # [] masked completion tokens in the full batch (at least 1)
    num_sequences: jax.Array  # [] completions in the full batch
    max_completion_len: jax.Array  # [] T, the completion length the batch is padded to


def effective_mask(
    completion_mask: jax.Array, config: GRPOConfig, truncated: jax.Array | None = None
) -> jax.Array:
    """The completion mask [N, T] float32, with truncated rows zeroed if the config says so."""
    mask = completion_mask.astype(jnp.float32)
    if config.mask_truncated_completions:
        if truncated is None:
            raise ValueError(
                "GRPOConfig.mask_truncated_completions=True needs `truncated` [N] (True where a "
                "completion reached the length limit without a stop token)."
            )
        mask = mask * (1.0 - truncated.astype(jnp.float32))[:, None]
    return mask


def loss_normalizers(
    completion_mask: jax.Array, config: GRPOConfig, truncated: jax.Array | None = None
) -> LossNormalizers:
    """The denominators of the full batch: compute once per batch, pass to every minibatch's loss.

    completion_mask: [N, T] of the full batch; truncated: [N] bool (needed if the config masks
    truncated completions, which then do not count as tokens).
    """
    mask = effective_mask(completion_mask, config, truncated)
    num_sequences, max_completion_len = mask.shape
    return LossNormalizers(
        num_tokens=jnp.maximum(mask.sum(), 1.0),
        num_sequences=jnp.asarray(num_sequences, jnp.float32),
        max_completion_len=jnp.asarray(max_completion_len, jnp.float32),
    )


class TokenTerms(NamedTuple):
    """What the per-token loss needs besides the logprobs, every field [N, T] float32 (so a chunk of
    positions of each can be taken together): see `token_terms`."""

    mask: jax.Array  # the effective completion mask (truncated rows zeroed if configured)
    weights: jax.Array  # w with loss = sum(w * per-token loss), from the aggregation mode
    advantages: jax.Array  # each sequence's advantage, repeated over its positions


def token_terms(
    completion_mask: jax.Array,
    advantages: jax.Array,
    config: GRPOConfig,
    truncated: jax.Array | None = None,
    normalizers: LossNormalizers | None = None,
) -> TokenTerms:
    """The [N, T] terms of `token_loss` for a batch (completion_mask [N, T], advantages [N]).

    normalizers: the full batch's `loss_normalizers` when this is one of several minibatches (default:
    this batch's own). Aggregation weights of the per-token losses l (m = mask, n_i = tokens of sequence i):
      token_mean           sum(l * m) / num_tokens
      seq_mean_token_mean  sum_i [sum_t l * m / max(n_i, 1)] / num_sequences
      dr_grpo              sum(l * m) / (num_sequences * max_completion_len)
    """
    mask = effective_mask(completion_mask, config, truncated)  # [N, T]
    norm = normalizers if normalizers is not None else loss_normalizers(completion_mask, config, truncated)
    if config.loss_aggregation == "token_mean":
        weights = mask / norm.num_tokens
    elif config.loss_aggregation == "seq_mean_token_mean":
        seq_len = jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)  # [N, 1]
        weights = mask / (seq_len * norm.num_sequences)
    elif config.loss_aggregation == "dr_grpo":
        weights = mask / (norm.num_sequences * norm.max_completion_len)
    else:
        raise ValueError(f"loss_aggregation {config.loss_aggregation!r}; choose one of {LOSS_AGGREGATIONS}.")
    adv = jnp.broadcast_to(advantages.astype(jnp.float32)[:, None], mask.shape)  # [N, T]
    return TokenTerms(mask, weights, adv)


def _ratio_and_kl(logp, old_logp, ref_logp, mask, config: GRPOConfig):
    """Policy ratio [N, T] and KL estimate [N, T] (None without ref_logp); elementwise in logp."""
    on_token = mask > 0
    if old_logp is None:
        old_logp = jax.lax.stop_gradient(logp)
    # Padding positions may hold anything; zero their log-ratios before exp so they cannot give inf/NaN.
    ratio = jnp.exp(jnp.where(on_token, logp - old_logp, 0.0))
    if ref_logp is None:
        return ratio, None
    return ratio, kl_divergence(logp, jnp.where(on_token, ref_logp, logp), config.kl_estimator, config.kl_clamp)


def token_loss(logp, old_logp, ref_logp, terms: TokenTerms, config: GRPOConfig) -> jax.Array:
    """The weighted per-token losses [N, T] whose sum is the GRPO loss:

      w * (-min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A) + beta * KL)

    Entry [n, t] depends only on logp[n, t] (and the other arrays at [n, t]), so a chunk of positions
    can be computed on its own (as `models.fused_token_loss` does). Arguments as in `grpo_loss`.
    """
    if config.beta != 0 and ref_logp is None:
        raise ValueError(f"GRPOConfig.beta={config.beta} needs ref_logp; pass it or set beta=0.")
    ratio, kl = _ratio_and_kl(logp, old_logp, ref_logp, terms.mask, config)
    adv = terms.advantages
    clipped_ratio = jnp.clip(ratio, 1.0 - config.epsilon_low, 1.0 + config.epsilon_high)
    per_token = -jnp.minimum(ratio * adv, clipped_ratio * adv)  # [N, T]
    if config.beta != 0:
        per_token = per_token + config.beta * kl
    return per_token * terms.weights


def grpo_metrics(logp, old_logp, ref_logp, terms: TokenTerms, config: GRPOConfig, normalizers: LossNormalizers
                 ) -> dict[str, jax.Array]:
    """The loss's metrics (scalars, no gradient), each a masked token mean normalised by `num_tokens`
    (so they add up across minibatches): "kl" (when ref_logp is given), "ratio_mean", and the TRL/DAPO
    clip fractions "clip_ratio/low" (ratio < 1 - epsilon_low and A < 0: the clip stops pushing the
    token further down), "clip_ratio/high" (ratio > 1 + epsilon_high and A > 0) and
    "clip_ratio/region" (either)."""
    ratio, kl = _ratio_and_kl(logp, old_logp, ref_logp, terms.mask, config)
    mean = lambda values: jnp.sum(values.astype(jnp.float32) * terms.mask) / normalizers.num_tokens
    adv = terms.advantages
    clipped_low = (ratio < 1.0 - config.epsilon_low) & (adv < 0)  # [N, T]
    clipped_high = (ratio > 1.0 + config.epsilon_high) & (adv > 0)
    metrics = {} if kl is None else {"kl": mean(kl)}
    metrics["ratio_mean"] = mean(ratio)
    metrics["clip_ratio/low"] = mean(clipped_low)
    metrics["clip_ratio/high"] = mean(clipped_high)
    metrics["clip_ratio/region"] = mean(clipped_low | clipped_high)
    return {k: jax.lax.stop_gradient(v) for k, v in metrics.items()}


def grpo_loss(
    logp: jax.Array,
    old_logp: jax.Array | None,
    ref_logp: jax.Array | None,
    advantages: jax.Array,
    completion_mask: jax.Array,
    config: GRPOConfig,
    truncated: jax.Array | None = None,
    normalizers: LossNormalizers | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The GRPO loss (a scalar) and its metrics (scalars, no host sync, see `grpo_metrics`).

    logp: [N, T] log-probabilities of the sampled tokens under the policy being trained.
    old_logp: [N, T] the same under the policy that sampled them; None means on-policy
        (stop_gradient(logp): the ratio is 1 but its gradient is not zero).
    ref_logp: [N, T] the same under the frozen reference; may be None when config.beta == 0.
    advantages: [N]; completion_mask: [N, T]; truncated: [N] bool, see `GRPOConfig`.
    normalizers: the full batch's `loss_normalizers` when this is one of several minibatches.
    The aggregation modes are those of `token_terms`.
    """
    if normalizers is None:
        normalizers = loss_normalizers(completion_mask, config, truncated)
    terms = token_terms(completion_mask, advantages, config, truncated, normalizers)
    loss = jnp.sum(token_loss(logp, old_logp, ref_logp, terms, config))
    return loss, grpo_metrics(logp, old_logp, ref_logp, terms, config, normalizers)
