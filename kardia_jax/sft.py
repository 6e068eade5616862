"""Supervised fine-tuning (the cold start of Kardia-R1): cross-entropy on the assistant turns.

    python -m kardia_jax.sft --config=configs/tiny_cpu.py [--config.sft.learning_rate=1e-4 ...]

The loss is the mean negative log-likelihood of the assistant target tokens (the four spans and the
end-of-turn id; `loss_mask`), over every such token of the global batch. It is computed with the
decoder's chunked `target_logprobs`, so the [B, T, V] logits never exist at once. The jitted train step
takes the parameters as arguments (`nnx.split`: the graph is static), donates parameters and optimizer
state, runs `sft.grad_accum_steps` microbatches in a `lax.scan` and applies one AdamW update
(warm-up + cosine, global-norm clipping), unless its loss, gradients or update are not finite: then the
parameters and optimizer state stay as they were, the step is counted, and `sft.max_consecutive_nonfinite`
such steps in a row stop the run with an error.

Everything lives under `<workdir>/sft/`:
    <step>/           Orbax checkpoints (params, optimizer, data-iterator position, RNG, step, config)
                      every `sft.save_every` steps, at the end, and on SIGTERM
    run_config.json   the config of the run
    metrics.jsonl     loss, grad norm, learning rate, tokens/s, non-finite counts every `sft.log_every`
                      steps (also TensorBoard; the console: a bar with loss, tokens/s and ETA, and a
                      summary line at each of those steps)
    loss.png          the loss and learning-rate curves
    eval_before.json  greedy test-split metrics of the initial parameters (step 0)
    hf/               the final model in Hugging Face format, with the tokenizer files
    results.json      before/after metrics of the finished run
Rerunning the same command resumes from the newest checkpoint (the same next batch, the same
parameters); a finished run is not repeated: its stored results are returned.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from kardia_jax.models import loading
from kardia_jax import checkpoints, console, metrics, optim, scaffold, sharding
from kardia_jax import config_checks
from kardia_jax.evaluation import generation
from kardia_jax.data.pipeline import BatchConfig, load_samples, sft_pipeline
from kardia_jax.data.prompts import DifficultyRule
from kardia_jax.models import fused_token_loss

LOGITS_CHUNK = 256  # positions per chunk of the vocabulary projection in the loss
# What the console shows (label -> metric key): the bar, and the summary line of each logged step.
CONSOLE_FIGURES = {"loss": "loss", "tokens/s": "tokens_per_second"}
CONSOLE_SUMMARY = {"loss": "loss", "grad_norm": "grad_norm", "lr": "learning_rate", "tokens/s": "tokens_per_second"}
PLOT_PANELS = (metrics.Panel("SFT loss", ("loss",), "mean token NLL"),
               metrics.Panel("learning rate", ("learning_rate",), "learning rate", smooth=False))


# -- the loss ------------------------------------------------------------------------------------


def shifted_targets(batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Next-token targets [B, T] and their loss weights [B, T] float32: position t predicts token t+1,
    weighted by loss_mask[t+1]; the last position predicts nothing (weight 0)."""
    tokens, loss_mask = batch["tokens"], batch["loss_mask"]
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    weights = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)
    return targets, weights.astype(jnp.float32)


def masked_nll(model, batch: dict[str, jax.Array], chunk_size: int = LOGITS_CHUNK) -> tuple[jax.Array, jax.Array]:
    """Summed NLL of the assistant target tokens of `batch` and how many there are (float32 scalars).

    batch: tokens, positions, input_mask, loss_mask [B, T] (right-padded, as `sft_pipeline` makes them).
    """
    targets, weights = shifted_targets(batch)
    hidden, _ = model.hidden_states(batch["tokens"], batch["positions"], batch["input_mask"])  # [B, T, D]
    # A sum of per-token terms: the lm head's gradient is formed chunk by chunk in the forward.
    nll, _, _ = fused_token_loss(hidden, model.unembed_matrix(), targets, lambda logp, w: -logp * w, weights,
                                 chunk_size=chunk_size)
    return nll, jnp.sum(weights)


def sft_loss(model, batch: dict[str, jax.Array], chunk_size: int = LOGITS_CHUNK) -> jax.Array:
    """Mean NLL per assistant target token of the batch."""
    nll, count = masked_nll(model, batch, chunk_size)
    return nll / jnp.maximum(count, 1.0)


def accumulated_grads(graphdef: nnx.GraphDef, params, batch: dict[str, jax.Array], num_microbatches: int = 1,
                      chunk_size: int = LOGITS_CHUNK, rules=None):
    """Gradient of the global-batch mean token NLL, accumulated over `num_microbatches` row slices.

    Each microbatch's summed NLL is divided by the target-token count of the *whole* batch, so the
    microbatch gradients add up exactly to the one-big-batch gradient. The microbatches are
    `scaffold.split_minibatches`' (every row its own group: microbatch a holds rows a, k + a, ..., spread
    over all devices). Returns (grads, loss, tokens).
    """
    total = jnp.maximum(jnp.sum(shifted_targets(batch)[1]), 1.0)

    def loss_fn(p, mb):
        nll, _ = masked_nll(nnx.merge(graphdef, p), mb, chunk_size)
        return nll / total

    grad_fn = jax.value_and_grad(loss_fn)
    if num_microbatches == 1:
        loss, grads = grad_fn(params, batch)
        return grads, loss, total

    def body(carry, mb):
        grads, loss = carry
        mb_loss, mb_grads = grad_fn(params, mb)
        return (jax.tree.map(jnp.add, grads, mb_grads), loss + mb_loss), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, loss), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)),
                                    scaffold.split_minibatches(batch, num_microbatches, rules=rules))
    return grads, loss, total


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, *, num_microbatches: int,
                    param_shardings, opt_shardings, chunk_size: int = LOGITS_CHUNK, rules=None):
    """The jitted `step(params, opt_state, batch) -> (params, opt_state, stats)`; params and opt_state
    are donated and keep their shardings. stats: loss, grad_norm (before clipping), target_tokens.
    `optimizer` is an `optim.make_optimizer` one: a non-finite update leaves params and state as they were."""

    def step(params, opt_state, batch):
        grads, loss, tokens = accumulated_grads(graphdef, params, batch, num_microbatches, chunk_size, rules)
        updates, opt_state = optimizer.update(grads, opt_state, params, loss=loss)
        params = optim.apply_updates(params, updates, opt_state)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "target_tokens": tokens}

    return jax.jit(step, donate_argnums=(0, 1), out_shardings=(param_shardings, opt_shardings, None))


# -- the run -------------------------------------------------------------------------------------


def _evaluate(graphdef, params, tokenizer, samples, config, mesh) -> dict[str, Any]:
    sft = config.sft
    return generation.evaluate_generations(
        nnx.merge(graphdef, params), tokenizer, samples, max_new_tokens=sft.eval_max_new_tokens,
        batch_size=sft.eval_batch_size, max_prompt_len=config.data.max_length - sft.eval_max_new_tokens, mesh=mesh)


def _summary(before: dict | None, after: dict, steps: int) -> dict[str, Any]:
    flat = {"steps": steps}
    for key in ("format_valid_rate", "emotion_accuracy", "mean_completion_length", "truncation_rate"):
        if before is not None:
            flat[f"{key}_before"] = before[key]
        flat[f"{key}_after"] = after[key]
    return flat | {"before": before, "after": after}


def run(config: ml_collections.ConfigDict, *, stop_after: int = 0) -> dict[str, Any]:
    """Runs (or resumes) SFT as `config` says and returns its results.

    `stop_after` > 0 stops after that many steps have been done, the way a preemption does (checkpoint,
    then return), without changing the schedule; calling `run` again continues. The result then has
    "stopped_at" and no "after".

    Returns {"steps", "format_valid_rate_before/_after", "emotion_accuracy_before/_after",
    "mean_completion_length_*", "truncation_rate_*", "before": {...}, "after": {...}, "final_loss",
    "start_step"}.
    """
    config_checks.validate(config, "sft")
    sft, data = config.sft, config.data
    workdir = os.path.join(config.workdir, "sft")
    mesh = sharding.mesh_from_config(config.mesh)
    rules = sharding.rules_from_config(config.rules)
    snapshot = scaffold.config_snapshot(config)
    with jax.set_mesh(mesh):
        model, tokenizer = loading.load_policy(config, mesh)
        config_checks.check_policy_positions(config, "sft", model.config)
        graphdef, params = scaffold.split_params(model)
        del model

        rule = DifficultyRule(kind=data.difficulty_rule)
        samples, _ = load_samples(scaffold.data_source(data), data.train_split, data.on_bad_row, rule,
                                  data.history)
        pipeline = sft_pipeline(samples, tokenizer, BatchConfig(
            global_batch_size=sft.global_batch_size, max_length=data.max_length, overlong=data.overlong,
            seed=config.seed, num_epochs=sft.num_epochs, worker_count=data.worker_count), subset=sft.subset)
        test_samples = generation.test_samples(config, sft.eval_max_samples)

        total_steps = pipeline.batches_per_epoch * sft.num_epochs
        if sft.max_steps:
            total_steps = min(total_steps, sft.max_steps)
        warmup_steps = int(round(sft.warmup_ratio * total_steps))
        k = sft.grad_accum_steps
        logging.info("SFT: %d steps (%d per epoch x %d epochs, batch %d in %d microbatch(es)), %d warm-up.",
                     total_steps, pipeline.batches_per_epoch, sft.num_epochs, sft.global_batch_size, k, warmup_steps)

        optimizer = optim.make_optimizer(sft.learning_rate, warmup_steps, total_steps, sft.weight_decay,
                                         sft.grad_clip, sft.mu_dtype)
        opt_state = optim.init_optimizer(optimizer, params)
        iterator = iter(pipeline)
        ckpt = checkpoints.Checkpointer(workdir, save_interval_steps=sft.save_every,
                                        max_to_keep=sft.max_to_keep)
        start, params, opt_state, rng = scaffold.restore_or_init(
            ckpt, params, opt_state, jax.random.key(config.seed), iterator, snapshot=snapshot)

        results_path = os.path.join(workdir, "results.json")
        stored = scaffold.read_json(results_path)
        if start >= total_steps and stored is not None:
            logging.info("SFT already finished (%s, step %d): returning its results.", workdir, start)
            ckpt.close()
            _print_results(stored, workdir)
            return stored

        before_path = os.path.join(workdir, "eval_before.json")
        before = scaffold.read_json(before_path)
        if start == 0:
            logging.info("Evaluating the initial parameters on %d test samples.", len(test_samples))
            before = _evaluate(graphdef, params, tokenizer, test_samples, config, mesh)
            scaffold.write_json(before_path, before)
            logging.info("Before SFT: %s", before)

        param_shardings = jax.tree.map(lambda x: x.sharding, params)
        opt_shardings = jax.tree.map(lambda x: x.sharding, opt_state)
        train_step = make_train_step(graphdef, optimizer, num_microbatches=k, param_shardings=param_shardings,
                                     opt_shardings=opt_shardings, chunk_size=sft.logits_chunk_size, rules=rules)
        final_loss = None
        with metrics.MetricsLogger(workdir) as logger, checkpoints.PreemptionGuard() as preemption:
            logger.progress(total_steps, metrics.Console("sft", CONSOLE_FIGURES, CONSOLE_SUMMARY, sft.log_every),
                            initial_step=start)
            end = scaffold.StepEnd(
                section="sft", limit=optim.nonfinite_limit(sft, "sft"),
                schedule=optim.make_schedule(sft.learning_rate, warmup_steps, total_steps), total_steps=total_steps,
                ckpt=ckpt, logger=logger, preemption=preemption, iterator=iterator, metadata=snapshot)
            clock, tokens_seen = time.perf_counter(), 0
            for step in range(start, total_steps):
                host_batch = next(iterator)
                params, opt_state, stats = train_step(params, opt_state, scaffold.shard_batch(host_batch, mesh))
                tokens_seen += int(host_batch["input_mask"].sum()) * jax.process_count()
                done = step + 1
                progress = optim.optimizer_progress(opt_state)  # waits for the step
                logged = None
                # A skipped (non-finite) step is always logged.
                if (done % sft.log_every == 0 or done == total_steps or done == stop_after
                        or progress.consecutive_nonfinite):
                    stats = jax.device_get(stats)
                    final_loss = float(stats["loss"])
                    logged = {"loss": stats["loss"], "grad_norm": stats["grad_norm"],
                              "tokens_per_second": tokens_seen / (time.perf_counter() - clock),
                              "target_tokens": stats["target_tokens"]}
                    clock, tokens_seen = time.perf_counter(), 0
                if end(done, progress, params, opt_state, rng, stats, logged,
                       stop=stop_after > 0 and done >= stop_after):
                    return {"steps": done, "stopped_at": done, "start_step": start, "before": before,
                            "final_loss": final_loss}
        ckpt.close()  # waits for the last save

        after = _evaluate(graphdef, params, tokenizer, test_samples, config, mesh)
        loading.export_hf(graphdef, params, tokenizer, os.path.join(workdir, "hf"))
    metrics.plot_curves(os.path.join(workdir, metrics.METRICS_FILENAME), PLOT_PANELS, os.path.join(workdir, "loss.png"),
                        title="SFT")
    results = _summary(before, after, total_steps) | {"final_loss": final_loss, "start_step": start}
    scaffold.write_json(results_path, results)
    _print_results(results, workdir)
    return results


def _print_results(results: dict[str, Any], workdir: str) -> None:
    """The before/after table, then where the run's files are (`workdir`: `<config.workdir>/sft`)."""
    if jax.process_index() == 0:
        print("\n".join(generation.format_comparison(results.get("before"), results["after"])), flush=True)
    console.print_outputs("SFT", {
        "checkpoints": workdir, "model (HF)": os.path.join(workdir, "hf"),
        "metrics": os.path.join(workdir, metrics.METRICS_FILENAME),
        "TensorBoard": os.path.join(workdir, metrics.TENSORBOARD_DIRNAME), "plots": os.path.join(workdir, "loss.png"),
        "results": os.path.join(workdir, "results.json"),
    })


# -- command line --------------------------------------------------------------------------------


def main(argv):
    del argv
    config = flags.FLAGS.config
    console.setup(config.distributed)
    run(config)


if __name__ == "__main__":
    # Defined here, not at import, so that entry points importing this module keep their own --config.
    config_flags.DEFINE_config_file("config", "configs/tiny_cpu.py", "Config file (get_config()).")
    app.run(main)
