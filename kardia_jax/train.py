"""GRPO with the rubric judge: `python -m kardia_jax.train --config=configs/qwen7b_tpu.py`.

One step, with B prompts, G samples each (N = B·G completions of up to T tokens):

    prompts [B, P] --sample--> completions [N, T], old logprobs [N, T]        (jitted sampler)
            --reference--> ref logprobs [N, T]                                 (skipped when beta = 0)
            --score-->  format, emotion [N]; judge's five criteria [N, 5]; total reward and group
                        advantages [N]                                          (judge read in-graph)
            --update x num_iterations--> new params, optimizer state            (num_minibatches
                        accumulated in one jitted scan, normalized over the whole batch; an update
                        that is not finite is skipped and counted, `grpo.max_consecutive_nonfinite`
                        in a row stop the run)

The learning-rate schedule counts updates: `grpo.warmup_steps` and the run's steps are multiplied by
num_iterations, and the logged learning rate is the one the step's last update used (read from the
optimizer state's count).

Only the reward components with a positive `grpo.reward_weights` are computed and logged: with
`--config.grpo.reward_weights.rubric=0` no judge is loaded and nothing is logged under `reward/rubric`.

Arrays stay on device from one phase to the next; the host only fetches metrics (and, every
`print_samples_every` steps, a few completions to print). Each phase is its own jitted function so the
time split sample / reference / judge / update is measured, not guessed.

Start: the SFT model at `<workdir>/sft/hf` if it exists (or `grpo.init_from`), else `model.*`.
Checkpoints (params, optimizer, data iterator, RNG, step) go to `<workdir>/grpo`; a rerun resumes. The
final policy is exported in Hugging Face format (with its tokenizer) to `<workdir>/grpo/hf`. Every
step's metrics go to `<workdir>/grpo/metrics.jsonl` and TensorBoard; the console shows a progress bar
(total reward, KL, s/step, ETA) and a summary line every `grpo.log_every` steps; at the end the reward,
loss and KL curves are drawn into `<workdir>/grpo/rewards.png` and the job prints where its files are.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from kardia_jax.models import loading
from kardia_jax import checkpoints, console, metrics, rewards, sharding, storage, training
from kardia_jax import config as config_lib
from kardia_jax.data.pipeline import BatchConfig, grpo_pipeline, load_samples
from kardia_jax.data.prompts import DifficultyRule
from kardia_jax.grpo import GRPOConfig, group_advantages, grpo_metrics, loss_normalizers, token_loss, token_terms
from kardia_jax.models.config import DTYPES
from kardia_jax.models import Decoder, chunked_logprobs, fused_token_loss, positions_from_mask
from kardia_jax.rewards.judge import RubricJudge, load_judge
from kardia_jax.sampling import SampleOutput, SamplingConfig, make_sampler



# -- the pieces of one step --------------------------------------------------------------------


def completion_hidden(model: Decoder, prompt, prompt_mask, completion, completion_mask):
    """The hidden states [N, T, D] that predict each completion token: row n, position t predicts
    completion[n, t] (the prompt's last position predicts the first).

    prompt, prompt_mask: [B, P] left-padded; completion, completion_mask: [N, T], rows i·G … i·G + G - 1
    continuing prompt i (G = N // B). Each prompt goes through the model once, not G times
    (`Decoder.shared_prefix_hidden`): for GRPO's prompts as long as the completions that is ~(G + 1) / (2G)
    of the work of a forward over N full sequences.
    """
    g = completion.shape[0] // prompt.shape[0]
    positions = jnp.repeat(prompt_mask.sum(-1, keepdims=True), g, axis=0) + positions_from_mask(completion_mask)
    prompt_hidden, hidden = model.shared_prefix_hidden(
        prompt, positions_from_mask(prompt_mask), prompt_mask, completion, positions, completion_mask
    )
    return jnp.concatenate([jnp.repeat(prompt_hidden[:, -1:], g, axis=0), hidden[:, :-1]], axis=1)  # [N, T, D]


def completion_logprobs(model: Decoder, prompt, prompt_mask, completion, completion_mask, temperature, chunk_size=256):
    """log p(completion[t] | prompt, completion[:t]) [N, T] under `model` (shapes as `completion_hidden`)."""
    hidden = completion_hidden(model, prompt, prompt_mask, completion, completion_mask)
    return chunked_logprobs(hidden, model.unembed_matrix(), completion, temperature, chunk_size)


class Rollout(NamedTuple):
    """Everything the update needs, on device. B prompts, N = B·G rows; row i·G + g is prompt i's g-th sample."""

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


class Steps:
    """The jitted phases of a GRPO step for one policy graph, judge and config (checked by
    `kardia_jax.config.validate`). `judge` may be None when the rubric's weight is 0: only the reward
    components with a positive weight are computed and logged."""

    def __init__(self, graphdef, params, judge: RubricJudge | None, tokenizer, config: ml_collections.ConfigDict, optimizer):
        g = config.grpo
        self.config = config
        self.graphdef = graphdef
        # Gradients are pinned to the parameters' shardings: left to XLA they can come out replicated
        # over fsdp, which multiplies gradient memory by the fsdp size.
        self.param_shardings = jax.tree.map(lambda x: x.sharding, params)
        self.judge = judge
        self.optimizer = optimizer
        self.loss_config = GRPOConfig(
            epsilon_low=g.epsilon_low,
            epsilon_high=g.epsilon_high,
            beta=g.beta,
            kl_estimator=g.kl_estimator,
            loss_aggregation=g.loss_aggregation,
            scale_rewards=g.scale_rewards,
            mask_truncated_completions=g.mask_truncated_completions,
        )
        self.temperature = g.temperature if g.temperature > 0 else 1.0
        self.sampling = SamplingConfig(
            num_samples=g.num_samples,
            max_new_tokens=g.max_new_tokens,
            temperature=g.temperature,
            top_k=g.top_k,
            top_p=g.top_p,
            stop_ids=tuple(tokenizer.stop_ids),
            pad_id=tokenizer.pad_id,
        )
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
        return make_sampler(self.graphdef, dataclasses.replace(self.sampling, num_samples=1, temperature=0.0, max_new_tokens=max_new_tokens))

    def _logprobs(self, params, prompt, prompt_mask, completion, completion_mask):
        """Teacher-forced completion logprobs [N, T] (reference model, or the policy's old logprobs), in
        `num_minibatches` sequential parts as the update does: that bounds the activations and the
        [rows, chunk, V] logits alike."""
        model = nnx.merge(self.graphdef, params)
        parts = _minibatches((prompt, prompt_mask, completion, completion_mask), self.config.grpo.num_minibatches)
        chunk = self.config.grpo.logits_chunk_size
        logp = jax.lax.map(lambda part: completion_logprobs(model, *part, self.temperature, chunk), parts)  # [k, N/k, T]
        return logp.reshape(completion.shape)

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
        g = self.sampling.num_samples
        advantages = group_advantages(total, g, self.loss_config.scale_rewards)
        stats = {k: v.mean() for k, v in logs.items()}
        stats["reward/std"] = total.std()
        stats["reward/zero_std_groups"] = jnp.mean(total.reshape(-1, g).std(axis=1) < 1e-6)
        return advantages, stats

    def _update(self, params, opt_state, rollout: Rollout):
        """One optimizer step over the whole rollout batch, as `num_minibatches` accumulated parts (each a
        whole number of prompts with their G samples). `self.optimizer` is a `training.skip_nonfinite` one:
        an update whose loss, gradients or updates are not finite leaves params and opt_state as they were."""
        k = self.config.grpo.num_minibatches
        norms = loss_normalizers(rollout.completion_mask, self.loss_config, rollout.truncated)
        parts = _minibatches(rollout, k)

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
        params = training.apply_updates(params, updates, opt_state)  # unchanged if the update was not finite
        stats["grad_norm"] = optax.tree.norm(grads)
        return params, opt_state, stats


# -- the run -----------------------------------------------------------------------------------


def _minibatches(tree, k: int):
    """Splits every array's leading (row) axis into k equal parts: [R, ...] -> [k, R / k, ...]. Rows of
    a prompt's group are contiguous, so with prompts and completions alike each part holds whole groups."""
    return jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), tree)


def reference_params(params, dtype):
    """The frozen reference: a copy of the policy's parameters stored in the compute dtype. Its forward
    casts every weight to that dtype anyway, so float32 masters would only double its memory."""
    cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.copy(x)
    return jax.jit(lambda tree: jax.tree.map(cast, tree))(params)


def _repeat(x: jax.Array, g: int) -> jax.Array:
    return jnp.repeat(x, g, axis=0)


def _initial_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config whose `model.*` and `tokenizer.*` `loading.load_policy` reads: grpo.init_from if set,
    else the SFT export `<workdir>/sft/hf` once it is complete (local or gs://), with the tokenizer saved
    there (it carries the span markers SFT trained), else the config's own model."""
    sft_hf = os.path.join(config.workdir, "sft", "hf")
    start = config.grpo.init_from or (sft_hf if storage.is_complete(sft_hf) else "")
    logging.info("GRPO starts from %s", start or f"model preset {config.model.preset!r}")
    return loading.with_checkpoint(config, start) if start else ml_collections.ConfigDict(config.to_dict())


def reward_table(steps: Steps, params, judge_params, judge, pipeline, mesh, max_new_tokens: int) -> dict[str, float]:
    """Mean reward components of greedy completions over every prompt of `pipeline` (one pass).

    Sums and counts are global (every process's rows, filler rows of a short last batch left out), and
    every process returns the same table."""
    sampler = steps.greedy_sampler(max_new_tokens)
    sums, count = {}, 0
    for batch in pipeline:
        samples = [pipeline.samples[i] for i in batch["sample_index"]]
        contexts = training.shard_batch(judge.prepare_contexts(samples), mesh) if judge else None
        dev = training.shard_batch(batch, mesh)
        out = sampler(params, dev["prompt_tokens"], dev["prompt_mask"], jax.random.key(0))
        _, logs = steps.rewards_of(judge_params, out.tokens, out.mask, dev["emotion_id"], contexts)
        logs, valid = sharding.to_host((logs, dev["valid"]))  # [B] each, all processes' rows
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + float(np.sum(v * valid))
        count += int(valid.sum())
    return {k: v / max(count, 1) for k, v in sums.items()}


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """GRPO from config; returns {"before": reward table, "after": reward table, "steps": n}."""
    config_lib.validate(config, "grpo")
    g = config.grpo
    mesh = sharding.mesh_from_config(config.mesh)
    workdir = os.path.join(config.workdir, "grpo")
    with jax.set_mesh(mesh):
        policy_config = _initial_model_config(config)
        model, tokenizer = loading.load_policy(policy_config, mesh)
        config_lib.check_policy_positions(config, "grpo", model.config)
        graphdef, params = nnx.split(model)
        ref_params = reference_params(params, DTYPES[config.model.dtype]) if g.beta > 0 else None
        judge, judge_params = (None, None)
        if g.reward_weights.rubric > 0:
            judge, judge_params = load_judge(config, mesh, tokenizer, model)

        data = config.data
        rule = DifficultyRule(kind=data.difficulty_rule)
        samples, _ = load_samples(training.data_source(data), data.train_split, data.on_bad_row, rule,
                                  data.history)
        test_samples, _ = load_samples(training.data_source(data), data.test_split, data.on_bad_row, rule,
                                       data.history)
        test_samples = test_samples[:g.eval_max_samples or None]
        batch_config = BatchConfig(
            global_batch_size=g.prompts_per_step,
            max_length=data.max_length,
            overlong=data.overlong,
            seed=config.seed,
            num_epochs=g.num_epochs,
            worker_count=data.worker_count,
        )
        pipeline = grpo_pipeline(samples, tokenizer, batch_config, subset=g.subset)
        eval_pipeline = grpo_pipeline(
            test_samples, tokenizer, dataclasses.replace(batch_config, shuffle=False, num_epochs=1, drop_remainder=False), subset="all"
        )
        total_steps = pipeline.batches_per_epoch * g.num_epochs
        if g.max_steps:
            total_steps = min(total_steps, g.max_steps)
        if total_steps == 0:
            raise ValueError(
                f"GRPO has no full batch: {len(pipeline.samples)} {g.subset!r} prompts < grpo.prompts_per_step="
                f"{g.prompts_per_step}; lower prompts_per_step or use another subset."
            )
        # The schedule counts updates, num_iterations (mu) per step: warm-up and decay span mu times the steps.
        mu = g.num_iterations
        optimizer = training.make_optimizer(g.learning_rate, g.warmup_steps * mu, total_steps * mu, g.weight_decay,
                                            g.grad_clip)
        opt_state = training.init_optimizer(optimizer, params)
        steps = Steps(graphdef, params, judge, tokenizer, config, optimizer)
        nonfinite_limit = training.nonfinite_limit(g, "grpo")

        iterator = iter(pipeline)
        ckpt = checkpoints.Checkpointer(workdir, save_interval_steps=g.save_every, max_to_keep=g.max_to_keep)
        start, params, opt_state, rng = training.restore_or_init(
            ckpt, params, opt_state, jax.random.key(config.seed), iterator)

        before = reward_table(steps, params, judge_params, judge, eval_pipeline, mesh, g.max_new_tokens) if start == 0 else None
        timer = metrics.Timer()
        with metrics.MetricsLogger(workdir) as logger, checkpoints.PreemptionGuard() as preemption:
            logger.progress(total_steps, console_view(config), initial_step=start)
            for step in range(start, total_steps):
                batch = next(iterator)
                host_samples = [pipeline.samples[i] for i in batch["sample_index"]]
                rng, key = jax.random.split(rng)
                with timer("sample"):
                    dev = training.shard_batch(batch, mesh)
                    out: SampleOutput = jax.block_until_ready(steps.sample(params, dev["prompt_tokens"], dev["prompt_mask"], key))
                prompt, prompt_mask = dev["prompt_tokens"], dev["prompt_mask"]
                old_logp = out.logprobs
                if g.recompute_old_logprobs:
                    with timer("old_logprobs"):
                        old_logp = jax.block_until_ready(steps.logprobs(params, prompt, prompt_mask, out.tokens, out.mask))
                with timer("reference"):
                    ref_logp = None
                    if ref_params is not None:
                        ref_logp = jax.block_until_ready(steps.logprobs(ref_params, prompt, prompt_mask, out.tokens, out.mask))
                with timer("judge"):
                    contexts = training.shard_batch(judge.prepare_contexts(host_samples), mesh) if judge else None
                    advantages, reward_stats = jax.block_until_ready(
                        steps.score(judge_params, out.tokens, out.mask, _repeat(dev["emotion_id"], g.num_samples), contexts)
                    )
                rollout = Rollout(prompt, prompt_mask, out.tokens, out.mask, out.truncated, old_logp, ref_logp, advantages)
                with timer("update"):
                    for _ in range(mu):
                        params, opt_state, update_stats = steps.update(params, opt_state, rollout)
                    jax.block_until_ready(params)
                progress = training.optimizer_progress(opt_state)
                times = timer.summary()
                step_seconds = sum(times.values())
                generated = jnp.sum(out.mask)
                logger.log(
                    step + 1,
                    reward_stats
                    | update_stats
                    | times
                    | {
                        "time/step": step_seconds,
                        "completion/length": out.lengths.mean(),
                        "completion/truncated": out.truncated.mean(),
                        "tokens_per_second": generated / step_seconds,
                        # The rate the step's last update used (its loss etc. are logged too).
                        "learning_rate": training.learning_rate_at(g.learning_rate, g.warmup_steps * mu, total_steps * mu,
                                                                   progress.latest_update),
                    }
                    | progress.metrics(),
                )
                error = training.nonfinite_error(progress, section="grpo", limit=nonfinite_limit, step=step + 1,
                                                 stats=update_stats, checkpoint_dir=ckpt.directory)
                if error is not None:
                    ckpt.close()  # waits for pending saves, all of finite parameters
                    raise error
                if g.print_samples_every and (step + 1) % g.print_samples_every == 0:
                    _print_samples(tokenizer, out, host_samples, g.num_samples)
                stop = preemption.reached(step + 1)
                ckpt.save(
                    step + 1, params, opt_state, data_iterator=iterator, rng=rng,
                    metadata=config.to_dict(), force=stop or step + 1 == total_steps,
                )
                if stop:
                    logging.warning("Preempted at step %d: checkpoint saved, exiting.", step + 1)
                    ckpt.close()
                    return {"before": before, "after": None, "steps": step + 1}
        ckpt.close()
        after = reward_table(steps, params, judge_params, judge, eval_pipeline, mesh, g.max_new_tokens)
        loading.export_hf(graphdef, params, tokenizer, os.path.join(workdir, "hf"))
        plot = os.path.join(workdir, "rewards.png")
        metrics.plot_curves(logger.jsonl_path, plot_panels(config), plot, title="GRPO")
        console.print_outputs("GRPO", {
            "checkpoints": workdir, "model (HF)": os.path.join(workdir, "hf"),
            "metrics": logger.jsonl_path, "TensorBoard": os.path.join(workdir, metrics.TENSORBOARD_DIRNAME),
            "plots": plot,
        })
    return {"before": before, "after": after, "steps": total_steps}


def console_view(config: ml_collections.ConfigDict) -> metrics.Console:
    """What the console shows of a GRPO step: the bar's few figures, and a summary line every
    `grpo.log_every` steps (every step still goes to metrics.jsonl and TensorBoard)."""
    summary = {"reward": "reward/total"}
    summary |= {name: f"reward/{name}" for name in rewards.active_components(config.grpo.reward_weights)}
    summary |= {"kl": "kl", "loss": "loss", "length": "completion/length", "s/step": "time/step"}
    return metrics.Console("grpo", figures={"reward": "reward/total", "kl": "kl", "s/step": "time/step"},
                           summary=summary, log_every=config.grpo.log_every)


def plot_panels(config: ml_collections.ConfigDict) -> list[metrics.Panel]:
    """The curves of a GRPO run: one panel per weighted reward component (and the total), the judge's
    five criteria when the rubric is weighted, the loss, and the KL when beta > 0."""
    g = config.grpo
    active = rewards.active_components(g.reward_weights)
    panels = [metrics.Panel("total reward", ("reward/total",), "reward")]
    panels += [metrics.Panel(f"{name} reward", (f"reward/{name}",), "reward") for name in active]
    if "rubric" in active:
        criteria = rewards.RUBRIC_CRITERIA
        panels.append(metrics.Panel("rubric criteria (judge)", tuple(f"reward/rubric/{c}" for c in criteria),
                                    "expected score, in [0, 1]", tuple(c.replace("_", " ") for c in criteria)))
    panels.append(metrics.Panel("GRPO loss", ("loss",), "loss"))
    if g.beta > 0:
        panels.append(metrics.Panel("KL to the reference", ("kl",), f"KL ({g.kl_estimator})"))
    return panels


def _print_samples(tokenizer, out: SampleOutput, samples, group_size: int, count: int = 2) -> None:
    """Logs the first sample of the first `count` prompts (process 0's first rows). Every process must
    call it: the completions are gathered from all of them."""
    tokens, mask = sharding.to_host((out.tokens, out.mask))  # [N, T]
    if jax.process_index() != 0:
        return
    for i in range(min(count, len(samples))):
        row = i * group_size
        text = tokenizer.decode(tokens[row][mask[row] > 0].tolist())
        logging.info("sample %d (gold emotion %s):\n%s", i, samples[i].emotion, text)


def format_table(before: dict[str, float] | None, after: dict[str, float]) -> str:
    keys = [k for k in after if k.startswith("reward/")]
    lines = [f"{'reward component':36s} {'before':>8s} {'after':>8s}"]
    for k in keys:
        b = f"{before[k]:8.3f}" if before else "       -"
        lines.append(f"{k:36s} {b} {after[k]:8.3f}")
    return "\n".join(lines)


def main(argv):
    del argv
    config = flags.FLAGS.config
    console.setup(config.distributed)
    result = run(config)
    if result["after"] is not None:
        print(format_table(result["before"], result["after"]))


if __name__ == "__main__":
    # Defined here, not at import, so that entry points importing this module keep their own --config.
    config_flags.DEFINE_config_file("config", "configs/tiny_cpu.py", "Config file (get_config()).")
    app.run(main)
