"""GRPO with the rubric judge: `python -m kardia_jax.train --config=configs/qwen7b_tpu.py`.

The run loop only; the algorithm is `kardia_jax.grpo` (its loss, the jitted phases of a step, the
reward table), the pieces shared with SFT are `kardia_jax.scaffold` and `kardia_jax.optim`. A step:
sample `grpo.num_samples` completions of each of B prompts, score them (format, emotion, the judge's
rubric), `grpo.num_iterations` updates on the rollout (`kardia_jax.grpo.steps`), then the scaffold's
end of step (log, non-finite stop after `grpo.max_consecutive_nonfinite` skipped updates in a row,
checkpoint, preemption).

The learning-rate schedule counts updates: `grpo.warmup_steps` and the run's steps are multiplied by
num_iterations, and the logged learning rate is the one the step's last update used (read from the
optimizer state's count).

Start: the SFT model at `<workdir>/sft/hf` if it exists (or `grpo.init_from`), else `model.*`.
Checkpoints (params, optimizer, data iterator, RNG, step) go to `<workdir>/grpo`; a rerun resumes. The
final policy is exported in Hugging Face format (with its tokenizer) to `<workdir>/grpo/hf`. Every
step's metrics go to `<workdir>/grpo/metrics.jsonl` and TensorBoard; the console shows a progress bar
(total reward, KL, s/step, ETA) and a summary line every `grpo.log_every` steps; at the end the reward,
loss and KL curves are drawn into `<workdir>/grpo/rewards.png` and the job prints where its files are.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from kardia_jax import checkpoints, console, metrics, optim, scaffold, sharding
from kardia_jax import config_checks
from kardia_jax.data.pipeline import BatchConfig, grpo_pipeline, load_samples
from kardia_jax.data.prompts import DifficultyRule
from kardia_jax.grpo import report
from kardia_jax.grpo.steps import Steps, reference_params
from kardia_jax.models import loading
from kardia_jax.models.config import DTYPES
from kardia_jax.rewards.judge import load_judge


# -- set-up ----------------------------------------------------------------------------------------


def _pipelines(config: ml_collections.ConfigDict, tokenizer, judge):
    """The training prompts and the test prompts of the reward table, their batches carrying the judge's
    contexts when there is a judge."""
    g, data = config.grpo, config.data
    rule = DifficultyRule(kind=data.difficulty_rule)
    load = lambda split: load_samples(scaffold.data_source(data), split, data.on_bad_row, rule, data.history)[0]
    samples, test_samples = load(data.train_split), load(data.test_split)[:g.eval_max_samples or None]
    batch_config = BatchConfig(global_batch_size=g.prompts_per_step, max_length=data.max_length,
                               overlong=data.overlong, seed=config.seed, num_epochs=g.num_epochs,
                               worker_count=data.worker_count)
    contexts = judge.prepare_contexts if judge is not None else None
    buckets = config.judge.context_buckets
    pipeline = grpo_pipeline(samples, tokenizer, batch_config, subset=g.subset, contexts=contexts,
                             context_buckets=buckets)
    eval_pipeline = grpo_pipeline(
        test_samples, tokenizer, dataclasses.replace(batch_config, shuffle=False, num_epochs=1, drop_remainder=False),
        subset="all", contexts=contexts, context_buckets=buckets)
    return pipeline, eval_pipeline


# -- the run ---------------------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """GRPO from config; returns {"before": reward table, "after": reward table, "steps": n}."""
    config_checks.validate(config, "grpo")
    g = config.grpo
    mesh = sharding.mesh_from_config(config.mesh)
    workdir = os.path.join(config.workdir, "grpo")
    snapshot = scaffold.config_snapshot(config)
    with jax.set_mesh(mesh):
        model, tokenizer = loading.load_policy(loading.grpo_start_config(config), mesh)
        config_checks.check_policy_positions(config, "grpo", model.config)
        judge, judge_params = load_judge(config, mesh, tokenizer, model) if g.reward_weights.rubric > 0 else (None, None)
        graphdef, params = scaffold.split_params(model)
        del model
        ref_params = reference_params(params, DTYPES[config.model.dtype]) if g.beta > 0 else None
        pipeline, eval_pipeline = _pipelines(config, tokenizer, judge)

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
        optimizer = optim.make_optimizer(g.learning_rate, g.warmup_steps * mu, total_steps * mu, g.weight_decay,
                                         g.grad_clip, g.mu_dtype)
        opt_state = optim.init_optimizer(optimizer, params)
        steps = Steps(graphdef, params, judge, tokenizer, config, optimizer)

        iterator = iter(pipeline)
        ckpt = checkpoints.Checkpointer(workdir, save_interval_steps=g.save_every, max_to_keep=g.max_to_keep)
        start, params, opt_state, rng = scaffold.restore_or_init(
            ckpt, params, opt_state, jax.random.key(config.seed), iterator, snapshot=snapshot)

        table = lambda: report.reward_table(steps, params, judge_params, eval_pipeline, mesh, g.max_new_tokens)
        before = table() if start == 0 else None
        timer = metrics.Timer()
        with metrics.MetricsLogger(workdir) as logger, checkpoints.PreemptionGuard() as preemption:
            logger.progress(total_steps, report.console_view(config), initial_step=start)
            end = scaffold.StepEnd(
                section="grpo", limit=optim.nonfinite_limit(g, "grpo"),
                schedule=optim.make_schedule(g.learning_rate, g.warmup_steps * mu, total_steps * mu),
                total_steps=total_steps, ckpt=ckpt, logger=logger, preemption=preemption, iterator=iterator,
                metadata=snapshot)
            for step in range(start, total_steps):
                batch = next(iterator)
                rng, key = jax.random.split(rng)
                with timer("sample"):
                    dev = scaffold.shard_batch(batch, mesh)
                rollout, out, reward_stats = steps.rollout(params, ref_params, judge_params, dev, key, timer)
                with timer("update"):
                    for _ in range(mu):
                        params, opt_state, update_stats = steps.update(params, opt_state, rollout)
                    jax.block_until_ready(params)
                progress = optim.optimizer_progress(opt_state)
                times = timer.summary()
                step_seconds = sum(times.values())
                logged = reward_stats | update_stats | times | {
                    "time/step": step_seconds,
                    "completion/length": out.lengths.mean(),
                    "completion/truncated": out.truncated.mean(),
                    "tokens_per_second": jnp.sum(out.mask) / step_seconds,
                }
                if g.print_samples_every and (step + 1) % g.print_samples_every == 0:
                    host_samples = [pipeline.samples[i] for i in batch["sample_index"]]
                    report.print_samples(tokenizer, out, host_samples, g.num_samples)
                if end(step + 1, progress, params, opt_state, rng, update_stats, logged):
                    return {"before": before, "after": None, "steps": step + 1}
        ckpt.close()
        after = table()
        loading.export_hf(graphdef, params, tokenizer, os.path.join(workdir, "hf"))
        plot = os.path.join(workdir, "rewards.png")
        metrics.plot_curves(logger.jsonl_path, report.plot_panels(config), plot, title="GRPO")
        console.print_outputs("GRPO", {
            "checkpoints": workdir, "model (HF)": os.path.join(workdir, "hf"),
            "metrics": logger.jsonl_path, "TensorBoard": os.path.join(workdir, metrics.TENSORBOARD_DIRNAME),
            "plots": plot,
        })
    return {"before": before, "after": after, "steps": total_steps}


# -- command line ----------------------------------------------------------------------------------


def main(argv):
    del argv
    config = flags.FLAGS.config
    console.setup(config.distributed)
    result = run(config)
    if result["after"] is not None:
        print(report.format_table(result["before"], result["after"]))


if __name__ == "__main__":
    # Defined here, not at import: `kardia_jax.demo` imports this module and defines its own --config.
    config_flags.DEFINE_config_file("config", "configs/tiny_cpu.py", "Config file (get_config()).")
    app.run(main)
