"""The phases of one GRPO step, each its own jitted function, and the reward wiring.

With B prompts and group_size (`grpo.num_samples`) samples each, N = B·group_size completions of up to T tokens:

    prompts [B, P] --sample--> completions [N, T], old logprobs [N, T]        (jitted sampler)
            --logprobs--> ref logprobs [N, T]                                  (skipped when beta = 0)
            --score-->  format, emotion [N]; judge's five criteria [N, 5]; total reward and group
                        advantages [N]                                          (judge read in-graph)
            --update x num_iterations--> new params, optimizer state            (num_minibatches
                        accumulated in one jitted scan, normalized over the whole batch; an update
                        that is not finite is skipped and counted)

Row i·group_size + s of every [N, ...] array is prompt i's s-th sample. Arrays stay on device from one
phase to the next; each phase is its own jitted function so the time split sample / reference / judge
/ update is measured, not guessed (`Steps.rollout` runs the first three under a `metrics.Timer`).
Minibatches (`scaffold.split_minibatches` with one group per prompt) hold whole groups, dealt
round-robin so each is spread over every device.

Only the reward components with a positive `grpo.reward_weights` are computed (`RewardSpec`): with
`--config.grpo.reward_weights.rubric=0` no judge is needed and nothing is logged under `reward/rubric`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from kardia_jax import metrics, optim, rewards, scaffold, sharding
from kardia_jax.grpo.loss import GRPOConfig, group_advantages, grpo_metrics, loss_normalizers, token_loss, token_terms
from kardia_jax.models import Decoder, chunked_logprobs, fused_token_loss, positions_from_mask
from kardia_jax.rewards.judge import RubricJudge
from kardia_jax.sampling import SampleOutput, SamplingConfig, make_sampler


def completion_hidden(model: Decoder, prompt, prompt_mask, completion, completion_mask):
    """The hidden states [N, T, D] that predict each completion token: row n, position t predicts
    completion[n, t] (the prompt's last position predicts the first).

    prompt, prompt_mask: [B, P] left-padded; completion, completion_mask: [N, T], rows
    i·group_size … i·group_size + group_size - 1 continuing prompt i (group_size = N // B). Each prompt
    goes through the model once, not group_size times (`Decoder.shared_prefix_hidden`): for GRPO's prompts
    as long as the completions that is ~(group_size + 1) / (2·group_size) of the work of a forward over N
    full sequences.
    """
    group_size = completion.shape[0] // prompt.shape[0]
    positions = (jnp.repeat(prompt_mask.sum(-1, keepdims=True), group_size, axis=0)
                 + positions_from_mask(completion_mask))  # [N, T]
    prompt_hidden, hidden = model.shared_prefix_hidden(
        prompt, positions_from_mask(prompt_mask), prompt_mask, completion, positions, completion_mask
    )
    return jnp.concatenate([jnp.repeat(prompt_hidden[:, -1:], group_size, axis=0), hidden[:, :-1]], axis=1)


def completion_logprobs(model: Decoder, prompt, prompt_mask, completion, completion_mask, temperature, chunk_size=256):
    """log p(completion[t] | prompt, completion[:t]) [N, T] under `model` (shapes as `completion_hidden`)."""
    hidden = completion_hidden(model, prompt, prompt_mask, completion, completion_mask)
    return chunked_logprobs(hidden, model.unembed_matrix(), completion, temperature, chunk_size)


class Rollout(NamedTuple):
    """Everything the update needs, on device. B prompts, N = B·group_size rows; row i·group_size + s is
    prompt i's s-th sample."""

    prompt: jax.Array  # [B, P]
    prompt_mask: jax.Array  # [B, P]
    completion: jax.Array  # [N, T]
    completion_mask: jax.Array  # [N, T]
    truncated: jax.Array  # [N]
    old_logp: jax.Array  # [N, T]
    ref_logp: jax.Array | None  # [N, T], None when beta = 0
    advantages: jax.Array  # [N]


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """Host-built constants of the format and emotion rewards (ids of one tokenizer)."""

    marker_ids: tuple[tuple[str, int], ...]
    stop_ids: tuple[int, ...]
    whitespace_ids: tuple[int, ...]
    weights: tuple[tuple[str, float], ...]  # the components with a positive weight only

    @classmethod
    def build(cls, tokenizer, weights) -> "RewardSpec":
        return cls(
            marker_ids=tuple(tokenizer.marker_ids.items()),
            stop_ids=tuple(tokenizer.stop_ids),
            whitespace_ids=tuple(int(i) for i in rewards.whitespace_token_ids(tokenizer)),
            weights=tuple((name, float(weights[name])) for name in rewards.active_components(weights)),
        )


def reference_params(params, dtype):
    """The frozen reference: a copy of the policy's parameters stored in the compute dtype. Its forward
    casts every weight to that dtype anyway, so float32 masters would only double its memory."""
    cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.copy(x)
    return jax.jit(lambda tree: jax.tree.map(cast, tree))(params)


class Steps:
    """The jitted phases of a GRPO step for one policy graph, judge and config (checked by
    `kardia_jax.config.validate`). `params` (a pure dict, `scaffold.split_params`) gives the parameters'
    shardings. `judge` may be None when the rubric's weight is 0: only the reward components with a
    positive weight are computed and logged."""

    def __init__(self, graphdef, params, judge: RubricJudge | None, tokenizer, config: ml_collections.ConfigDict,
                 optimizer):
        g = config.grpo
        self.config = config
        self.graphdef = graphdef
        # Gradients are pinned to the parameters' shardings: left to XLA they can come out replicated
        # over fsdp, which multiplies gradient memory by the fsdp size.
        self.param_shardings = jax.tree.map(lambda x: x.sharding, params)
        self.rules = sharding.rules_from_config(config.rules)
        self.judge = judge
        self.optimizer = optimizer
        self.loss_config = GRPOConfig.from_config(g)
        self.temperature = g.temperature if g.temperature > 0 else 1.0
        self.sampling = SamplingConfig.from_config(g, tokenizer)
        self.group_size = self.sampling.num_samples
        self.rewards = RewardSpec.build(tokenizer, dict(g.reward_weights))
        self.label_table = jnp.asarray(rewards.build_label_table(tokenizer))
        self.sample = make_sampler(graphdef, self.sampling)
        self.logprobs = jax.jit(self._logprobs)
        self.score = jax.jit(self._score)
        self.rewards_of = jax.jit(self._rewards)
        self.update = jax.jit(self._update, donate_argnums=(0, 1))

    @functools.cache
    def greedy_sampler(self, max_new_tokens: int):
        """One jitted greedy sampler per length, shared by the before and after evaluations."""
        return make_sampler(self.graphdef, dataclasses.replace(self.sampling, num_samples=1, temperature=0.0,
                                                               max_new_tokens=max_new_tokens))

    def rollout(self, params, ref_params, judge_params, batch, key: jax.Array, timer: metrics.Timer
                ) -> tuple[Rollout, SampleOutput, dict[str, jax.Array]]:
        """Sample, old logprobs (if `grpo.recompute_old_logprobs`), reference logprobs (if `ref_params`)
        and scores of one sharded `grpo_pipeline` batch, each phase timed under its name in `timer`
        ("sample", "old_logprobs", "reference", "judge"). Returns (the update's input, the sampler's
        output, the batch's reward metrics)."""
        prompt, prompt_mask = batch["prompt_tokens"], batch["prompt_mask"]  # [B, P]
        contexts = batch.get("judge_context")  # {"context_ids", "context_mask"} [B, C], from the pipeline
        if self.judge is not None and contexts is None:
            raise ValueError("GRPO with the rubric judge needs batches with the judge's contexts: build the "
                             "pipeline with grpo_pipeline(..., contexts=judge.prepare_contexts).")
        with timer("sample"):
            out: SampleOutput = jax.block_until_ready(self.sample(params, prompt, prompt_mask, key))
        old_logp = out.logprobs
        if self.config.grpo.recompute_old_logprobs:
            with timer("old_logprobs"):
                old_logp = jax.block_until_ready(self.logprobs(params, prompt, prompt_mask, out.tokens, out.mask))
        with timer("reference"):
            ref_logp = None
            if ref_params is not None:
                ref_logp = jax.block_until_ready(self.logprobs(ref_params, prompt, prompt_mask, out.tokens, out.mask))
        with timer("judge"):
            emotion_id = jnp.repeat(batch["emotion_id"], self.group_size, axis=0)  # [N]
            advantages, reward_stats = jax.block_until_ready(
                self.score(judge_params, out.tokens, out.mask, emotion_id, contexts))
        rollout = Rollout(prompt, prompt_mask, out.tokens, out.mask, out.truncated, old_logp, ref_logp, advantages)
        return rollout, out, reward_stats

    def _logprobs(self, params, prompt, prompt_mask, completion, completion_mask):
        """Teacher-forced completion logprobs [N, T] (reference model, or the policy's old logprobs), in
        `num_minibatches` sequential parts as the update does: that bounds the activations and the
        [rows, chunk, V] logits alike."""
        model = nnx.merge(self.graphdef, params)
        num_prompts = prompt.shape[0]
        parts = scaffold.split_minibatches((prompt, prompt_mask, completion, completion_mask),
                                           self.config.grpo.num_minibatches, num_groups=num_prompts, rules=self.rules)
        chunk = self.config.grpo.logits_chunk_size
        logp = jax.lax.map(lambda part: completion_logprobs(model, *part, self.temperature, chunk), parts)  # [k, N/k, T]
        return scaffold.join_minibatches(logp, num_prompts)  # [N, T]

    def _rewards(self, judge_params, completion, completion_mask, emotion_id, contexts):
        """Total reward [N] and per-sample logs {"reward/...": [N]} of N completions, of the components
        with a positive weight only (judge_params and contexts are unused, may be None, without the rubric)."""
        spec = self.rewards
        markers = dict(spec.marker_ids)
        compute = {
            "format": lambda: rewards.format_reward(completion, completion_mask, markers, spec.stop_ids, spec.whitespace_ids),
            "emotion": lambda: rewards.emotion_reward(completion, completion_mask, markers, emotion_id, self.label_table,
                                                      spec.whitespace_ids),
            "rubric": lambda: self.judge.score_ids(judge_params, completion, completion_mask, contexts),
        }
        weights = dict(spec.weights)
        if "rubric" in weights and self.judge is None:
            raise ValueError(f"grpo.reward_weights.rubric={weights['rubric']} needs a judge (config.judge); build "
                             "Steps with one, or set the weight to 0 to train without the rubric.")
        return rewards.total_reward({name: compute[name]() for name in weights}, weights)

    def _score(self, judge_params, completion, completion_mask, emotion_id, contexts):
        """Group advantages [N] and the batch's reward metrics (means of every component/criterion)."""
        total, logs = self._rewards(judge_params, completion, completion_mask, emotion_id, contexts)
        advantages = group_advantages(total, self.group_size, self.loss_config.scale_rewards)
        stats = {k: v.mean() for k, v in logs.items()}
        stats["reward/std"] = total.std()
        stats["reward/zero_std_groups"] = jnp.mean(total.reshape(-1, self.group_size).std(axis=1) < 1e-6)
        return advantages, stats

    def _update(self, params, opt_state, rollout: Rollout):
        """One optimizer step over the whole rollout batch, as `num_minibatches` accumulated parts (each a
        whole number of prompts with their group_size samples). `self.optimizer` is an `optim.skip_nonfinite`
        one: an update whose loss, gradients or updates are not finite leaves params and opt_state as they were."""
        norms = loss_normalizers(rollout.completion_mask, self.loss_config, rollout.truncated)
        parts = scaffold.split_minibatches(rollout, self.config.grpo.num_minibatches,
                                           num_groups=rollout.prompt.shape[0], rules=self.rules)

        def loss_fn(params, part: Rollout):
            # The loss is a sum of per-token terms, so the lm head's gradient is formed chunk by chunk in the
            # forward (`fused_token_loss`): the [rows, T, V] logits never exist whole, and are computed once.
            model = nnx.merge(self.graphdef, params)
            hidden = completion_hidden(model, part.prompt, part.prompt_mask, part.completion, part.completion_mask)
            terms = token_terms(part.completion_mask, part.advantages, self.loss_config, part.truncated, norms)
            loss, logp, entropy = fused_token_loss(
                hidden, model.unembed_matrix(), part.completion,
                lambda lp, aux: token_loss(lp, *aux, self.loss_config), (part.old_logp, part.ref_logp, terms),
                temperature=self.temperature, chunk_size=self.config.grpo.logits_chunk_size, with_entropy=True,
            )
            stats = grpo_metrics(logp, part.old_logp, part.ref_logp, terms, self.loss_config, norms)
            stats["entropy"] = jnp.sum(entropy * part.completion_mask) / norms.num_tokens
            return loss, stats

        def accumulate(carry, part):
            grads, stats = carry
            (loss, part_stats), part_grads = jax.value_and_grad(loss_fn, has_aux=True)(params, part)
            part_stats["loss"] = loss
            return (jax.tree.map(jnp.add, grads, part_grads), jax.tree.map(jnp.add, stats, part_stats)), None

        zero_stats = jax.eval_shape(lambda: loss_fn(params, jax.tree.map(lambda x: x[0], parts))[1] | {"loss": 0.0})
        zeros = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_stats))
        (grads, stats), _ = jax.lax.scan(accumulate, zeros, parts)
        grads = jax.lax.with_sharding_constraint(grads, self.param_shardings)
        updates, opt_state = self.optimizer.update(grads, opt_state, params, loss=stats["loss"])
        params = optim.apply_updates(params, updates, opt_state)  # unchanged if the update was not finite
        stats["grad_norm"] = optax.tree.norm(grads)
        return params, opt_state, stats
