"""GRPO step benchmark: one kardia_jax GRPO step against one TRL `GRPOTrainer` step (PyTorch CPU).

Workload (defaults): bench-tiny (Qwen2, 4 layers, hidden 256, 4 heads / 2 KV heads, mlp 1024, vocab 8192,
float32, random weights, seed 0; the same weights in both); 8 prompts x 128 random token ids, G = 8 samples
each (64 completions), exactly 128 new tokens (no stop token), temperature 1, no top-k / top-p; KL beta 0.04
(both compute reference logprobs), AdamW lr 1e-6 (gradient clipped at norm 1, both frameworks' default), one
update per step on the whole batch (num_iterations 1, no accumulation); the reward is the fraction of even
token ids in a completion (kardia_jax: in-graph, on device; TRL: a Python reward function on completion ids).

Each side runs `--warmup` untimed steps (kardia_jax: compilation), then `--repeats` timed steps: first all of
kardia_jax's, then all of TRL's, so that neither framework's threads (torch's OpenMP workers spin after a step)
or heap (both allocate from the one process heap) disturb the other's timed steps; with `--interleave` they
alternate (a TRL step, then a kardia_jax step), for a machine whose load changes during the run. The median
step time, the median of each phase and every timed step's time are reported:

  kardia_jax   sample (jitted sampler) / reference (teacher-forced ref logprobs) / reward (reward +
               group advantages) / update (GRPO loss, grads, AdamW): each phase blocked on its result.
  TRL          sample (`GRPOTrainer._generate`: tokenize, `generate`, decode) / reference
               (`_get_per_token_logps_and_entropies` on the reference model) / reward (the rest of
               `_generate_and_score_completions`: rewards, advantages, padding, metrics) / update (the rest of
               the optimizer step: loss forward, backward, clipping, `optimizer.step`).

Then the cost of the rubric judge in kardia_jax's step: a judge the size of the policy (bench-tiny, random
weights, seed 1) reading the shipped tokenizer's rubric prompts for the same completions, with the contexts
of shipped sample prompts; the reward phase is re-timed with the judge in it.

The last line is `grpo step speedup vs trl: X.XX` (TRL step time / kardia_jax step time). This module holds
kardia_jax's side and the command line; TRL's side is `grpo_trl`.

    python -m kardia_jax.benchmarks.grpo
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from kardia_jax.benchmarks.common import (BENCH_PRESET, BETA, GRAD_CLIP, LEARNING_RATE, bench_extra, bench_models,
                                         medians, random_prompts, set_torch_threads)
from kardia_jax.benchmarks.grpo_trl import trl_grpo, trl_version

flags.DEFINE_integer("num_prompts", 8, "Distinct prompts per step.")
flags.DEFINE_integer("prompt_len", 128, "Prompt length (tokens).")
flags.DEFINE_integer("num_samples", 8, "Samples per prompt (G).")
flags.DEFINE_integer("new_tokens", 128, "New tokens per completion (exactly; no stop token).")
flags.DEFINE_integer("repeats", 5, "Timed steps (medians are reported).")
flags.DEFINE_integer("warmup", 1, "Untimed steps first (kardia_jax compiles in these).")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads for TRL; 0: os.cpu_count(). On a machine shared with "
                     "other busy processes, torch's OpenMP threads stall one another (1 can be much faster).")
flags.DEFINE_bool("trl", True, "Also time TRL's GRPOTrainer (needs the `bench` extra).")
flags.DEFINE_bool("interleave", False, "Alternate TRL and kardia_jax timed steps instead of timing them in two blocks.")
flags.DEFINE_bool("judge", True, "Also time the rubric judge added to kardia_jax's step.")
flags.DEFINE_integer("judge_context_tokens", 512, "Judge prompt budget for persona + dialogue (config.judge default).")
flags.DEFINE_integer("judge_context_buckets", 3, "Context widths the judge reads (config.judge.context_buckets); the "
                     "benchmark also times 1 (every context at the full budget) for comparison.")
flags.DEFINE_integer("judge_response_tokens", 0, "Judge prompt budget for the response; 0: --new_tokens.")
FLAGS = flags.FLAGS

PHASES = ("sample", "reference", "reward", "update")


def _seconds(t: float) -> str:
    return f"{t:.3f} s" if t >= 0.01 else f"{1e3 * t:.2f} ms"


def _format_phases(times: dict[str, float]) -> str:
    step = times["step"]
    parts = [f"{p} {_seconds(times[p])} ({100 * times[p] / step:.0f}%)" for p in PHASES]
    return f"{_seconds(step)} = " + " + ".join(parts)


# -- kardia_jax -----------------------------------------------------------------------------------


def _even_fraction(completion: jax.Array, mask: jax.Array) -> jax.Array:
    """[N] the fraction of even token ids among a completion's tokens."""
    valid = mask > 0
    return jnp.sum(valid & (completion % 2 == 0), axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1)


def _grpo_config(num_samples: int, new_tokens: int, total_steps: int):
    from kardia_jax.config import base_config

    config = base_config()
    g = config.grpo
    g.num_samples = num_samples
    g.max_new_tokens = new_tokens
    g.temperature, g.top_k, g.top_p = 1.0, 0, 1.0
    g.beta = BETA
    g.kl_estimator = "k3"
    g.loss_aggregation = "token_mean"  # TRL's "dapo": token losses over the batch's token count
    g.scale_rewards = "group"
    g.learning_rate, g.warmup_steps, g.weight_decay, g.grad_clip = LEARNING_RATE, 0, 0.0, GRAD_CLIP
    g.num_iterations, g.num_minibatches = 1, 1
    g.recompute_old_logprobs = False  # the sampler's logprobs are the old ones (TRL: the detached policy's)
    g.max_steps = total_steps
    return config


@dataclasses.dataclass
class KardiaResult:
    times: dict[str, float]  # medians: step and each phase
    steps: list[float]  # every timed step's wall time
    judge: dict[str, Any] | None  # judge timings, if asked for


class KardiaGRPO:
    """kardia_jax GRPO steps of `model` (a `Decoder`, whose parameters are consumed) on `prompts` [B, P], timed.

    The phases are `grpo.steps.Steps`' jitted functions (the run loop's own), except the sampler, rebuilt with no
    stop token, and the reward, the in-graph even-id fraction with `grpo.group_advantages`. `step()` runs one
    step and returns its times; `warm()` marks the end of the warm-up (later steps must not compile).
    """

    def __init__(self, model, prompts: np.ndarray, *, num_samples: int, new_tokens: int, total_steps: int):
        from kardia_jax import optim, scaffold
        from kardia_jax.grpo.loss import group_advantages
        from kardia_jax.models.tokenizer import load_tokenizer, tokenizer_path
        from kardia_jax.sampling import make_sampler
        from kardia_jax.models.config import DTYPES
        from kardia_jax.grpo.steps import Steps, reference_params

        self.num_prompts, self.num_samples, self.new_tokens = prompts.shape[0], num_samples, new_tokens
        self.model_config = model.config
        self.config = _grpo_config(num_samples, new_tokens, total_steps)
        g = self.config.grpo
        self.tokenizer = load_tokenizer(tokenizer_path())  # Steps builds its (unused) format/emotion constants from it
        graphdef, params = scaffold.split_params(model)
        # Committed to the device from the start, as the update's outputs are: a jitted function called with
        # uncommitted arguments once and committed ones next compiles twice (the run loop's params are sharded).
        device = jax.devices()[0]
        self.params = jax.device_put(params, device)
        self.ref_params = reference_params(self.params, DTYPES[model.config.dtype])  # as the trainer makes it
        optimizer = optim.make_optimizer(g.learning_rate, g.warmup_steps, total_steps, g.weight_decay,
                                         g.grad_clip, g.mu_dtype)
        self.opt_state = jax.device_put(jax.jit(optimizer.init)(self.params), device)
        self.steps = Steps(graphdef, self.params, None, self.tokenizer, self.config, optimizer)
        self.steps.sample = make_sampler(graphdef, dataclasses.replace(self.steps.sampling, stop_ids=()))

        @jax.jit
        def score(completion, mask):
            return group_advantages(_even_fraction(completion, mask), num_samples, g.scale_rewards)

        self.score = score
        self.prompt = jax.device_put(np.asarray(prompts, np.int32), device)
        self.prompt_mask = jax.device_put(np.ones(prompts.shape, np.int32), device)
        self.keys = iter(jax.device_put(jax.random.split(jax.random.key(0), total_steps), device))
        self.jitted = {"sample": self.steps.sample, "reference": self.steps.logprobs, "reward": score,
                       "update": self.steps.update}
        self.compiled = None
        self.records: list[dict[str, float]] = []
        self.out = self.stats = None

    def _programs(self) -> dict[str, int]:
        return {k: f._cache_size() for k, f in self.jitted.items()}  # pylint: disable=protected-access

    def warm(self) -> None:
        self.compiled = self._programs()

    def step(self) -> dict[str, float]:
        from kardia_jax.grpo.steps import Rollout

        steps, t = self.steps, {}
        start = time.perf_counter()
        out = jax.block_until_ready(steps.sample(self.params, self.prompt, self.prompt_mask, next(self.keys)))
        t["sample"] = time.perf_counter() - start
        mark = time.perf_counter()
        ref_logp = jax.block_until_ready(
            steps.logprobs(self.ref_params, self.prompt, self.prompt_mask, out.tokens, out.mask))
        t["reference"] = time.perf_counter() - mark
        mark = time.perf_counter()
        advantages = jax.block_until_ready(self.score(out.tokens, out.mask))
        t["reward"] = time.perf_counter() - mark
        mark = time.perf_counter()
        rollout = Rollout(self.prompt, self.prompt_mask, out.tokens, out.mask, out.truncated, out.logprobs,
                          ref_logp, advantages)
        self.params, self.opt_state, self.stats = steps.update(self.params, self.opt_state, rollout)
        jax.block_until_ready((self.params, self.opt_state, self.stats))
        end = time.perf_counter()
        t["update"] = end - mark
        t["step"] = end - start
        self.out = out
        if self.compiled is not None:
            self.records.append(t)
        return t

    def result(self) -> KardiaResult:
        """Checks the timed steps (no compilation, full-length completions, finite loss); their medians."""
        if self.compiled is not None and self.compiled != self._programs():
            raise AssertionError(f"kardia_jax compiled during the timed steps: {self.compiled} programs after the "
                                 f"warm-up, {self._programs()} after.")
        lengths = np.asarray(self.out.lengths)
        if lengths.min() != self.new_tokens or lengths.max() != self.new_tokens:
            raise AssertionError(f"kardia_jax completions are {lengths.min()}..{lengths.max()} tokens, not "
                                 f"{self.new_tokens}.")
        if not np.isfinite(float(self.stats["loss"])):
            raise AssertionError(f"kardia_jax GRPO loss is {float(self.stats['loss'])}.")
        return KardiaResult(medians(self.records), [r["step"] for r in self.records], None)

    def judge_cost(self, repeats: int, context_tokens: int, response_tokens: int,
                   context_buckets: int = 1) -> dict[str, Any]:
        """The reward phase re-timed with a policy-sized rubric judge in it, on the last step's completions."""
        return _judge_cost(self.model_config, self.tokenizer, self.out, self.num_prompts, self.num_samples, repeats,
                           context_tokens, response_tokens or self.new_tokens, medians(self.records)["reward"],
                           self.config.grpo, context_buckets)


def kardia_grpo(model, prompts: np.ndarray, *, num_samples: int, new_tokens: int, repeats: int = 3, warmup: int = 1,
                judge: bool = False, judge_context_tokens: int = 512, judge_response_tokens: int = 0) -> KardiaResult:
    """kardia_jax alone: `warmup` steps, `repeats` timed steps, then (if `judge`) the judge's cost."""
    runner = KardiaGRPO(model, prompts, num_samples=num_samples, new_tokens=new_tokens, total_steps=warmup + repeats)
    for _ in range(warmup):
        runner.step()
    runner.warm()
    for _ in range(repeats):
        runner.step()
    result = runner.result()
    if judge:
        result.judge = runner.judge_cost(repeats, judge_context_tokens, judge_response_tokens)
    return result


def _judge_cost(model_config, tokenizer, out, num_prompts: int, num_samples: int, repeats: int, context_tokens: int,
                response_tokens: int, reward_time: float, g, context_buckets: int = 1) -> dict[str, Any]:
    """Median time of the reward phase with a policy-sized rubric judge in it, on completions `out`, the
    judge contexts cut to `context_buckets` widths as the GRPO pipeline cuts them."""
    from kardia_jax.data.pipeline import cut_contexts, load_samples
    from kardia_jax.data.sources import sample_path
    from kardia_jax.grpo.loss import group_advantages
    from kardia_jax.models.decoder import Decoder
    from kardia_jax.rewards.judge import RubricJudge

    judge_model = Decoder(model_config, rngs=nnx.Rngs(1))
    judge = RubricJudge(judge_model, tokenizer, tokenizer, max_context_tokens=context_tokens,
                        max_response_tokens=response_tokens)
    judge_params = nnx.split(judge_model)[1]
    samples, _ = load_samples(sample_path(), "train")
    contexts = judge.prepare_contexts([samples[i % len(samples)] for i in range(num_prompts)])
    contexts = jax.tree.map(jnp.asarray, cut_contexts(contexts, context_buckets))

    @jax.jit
    def score_with_judge(judge_params, completion, mask, contexts):
        rubric = judge.score_ids(judge_params, completion, mask, contexts).mean(axis=1)  # [N]
        total = 0.5 * _even_fraction(completion, mask) + 0.5 * rubric
        return group_advantages(total, num_samples, g.scale_rewards), rubric

    def run():
        return jax.block_until_ready(score_with_judge(judge_params, out.tokens, out.mask, contexts))

    _, rubric = run()  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    with_judge = statistics.median(times)
    rubric = np.asarray(rubric)
    if not np.all(np.isfinite(rubric)):
        raise AssertionError("judge scores are not finite")
    return {
        "reward_with_judge": with_judge,
        "judge": with_judge - reward_time,
        "prompt_length": judge.prompt_length - context_tokens + contexts["context_ids"].shape[1],
        "rows": out.tokens.shape[0],
        "shared_vocab": judge.shared_vocab,
        "tokenizer_vocab": tokenizer.vocab_size,
        "judge_vocab": judge.vocab_size,
        "ids_beyond_tokenizer": float(np.mean(np.asarray(out.tokens) >= tokenizer.vocab_size)),
        "rubric_mean": float(rubric.mean()),
    }


# -- main -----------------------------------------------------------------------------------------


def _load() -> str:
    try:
        one, five, _ = os.getloadavg()
        return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"
    except OSError:
        return "load average unavailable"


def main(_):
    cores = set_torch_threads()
    if FLAGS.torch_threads:
        with bench_extra():
            import torch

        torch.set_num_threads(FLAGS.torch_threads)
        cores = FLAGS.torch_threads
    hf, ours = bench_models()
    prompts = random_prompts(FLAGS.num_prompts, FLAGS.prompt_len, ours.config.vocab_size)
    n = FLAGS.num_prompts * FLAGS.num_samples
    warmup, repeats = FLAGS.warmup, FLAGS.repeats
    sizes = dict(num_samples=FLAGS.num_samples, new_tokens=FLAGS.new_tokens)
    interleave = FLAGS.trl and FLAGS.interleave
    print(f"device: {jax.devices()[0].platform} x{jax.device_count()}, torch threads: {cores}; {_load()} at start")
    print(f"model: {BENCH_PRESET}, float32; workload: {FLAGS.num_prompts} prompts x {FLAGS.prompt_len} tokens, "
          f"G={FLAGS.num_samples} ({n} completions) x {FLAGS.new_tokens} new tokens, beta={BETA}, AdamW lr={LEARNING_RATE}, "
          f"one update per step; medians of {repeats} steps after {warmup} warm-up, "
          f"{'interleaved' if interleave else 'kardia_jax then TRL' if FLAGS.trl else 'kardia_jax only'}", flush=True)

    # kardia_jax warms up (compiles) first; then its timed steps, then TRL's (or, with --interleave, a TRL step
    # then a kardia_jax step, so that both see the same load on a machine shared with other work).
    runner = KardiaGRPO(ours, prompts, total_steps=warmup + repeats, **sizes)
    for _ in range(warmup):
        runner.step()
    runner.warm()
    if not interleave:
        for _ in range(repeats):
            runner.step()
    t_trl = trl_steps = None
    if FLAGS.trl:
        t_trl, trl_steps = trl_grpo(hf, prompts, repeats=repeats, warmup=warmup,
                                    after_timed_step=runner.step if interleave else None, **sizes)
    result = runner.result()
    t_ours = result.times
    print(f"kardia_jax step:  {_format_phases(t_ours)}")
    print(f"  steps: {', '.join(_seconds(t) for t in result.steps)}", flush=True)
    if t_trl is not None:
        print(f"TRL {trl_version()} step:  {_format_phases(t_trl)}")
        print(f"  steps: {', '.join(_seconds(t) for t in trl_steps)}")
        print("  (TRL sample = _generate incl. tokenize/decode; reward = rest of _generate_and_score_completions; "
              "update = loss forward + backward + clip + optimizer.step)", flush=True)

    if FLAGS.judge:
        full = runner.judge_cost(repeats, FLAGS.judge_context_tokens, FLAGS.judge_response_tokens, 1)
        j = runner.judge_cost(repeats, FLAGS.judge_context_tokens, FLAGS.judge_response_tokens,
                              FLAGS.judge_context_buckets)
        for label, cost in (("contexts at the full budget", full),
                            (f"contexts in {FLAGS.judge_context_buckets} widths", j)):
            share = cost["judge"] / (t_ours["step"] + cost["judge"])
            print(f"judge, {label}: {cost['prompt_length']}-token prompts, {_seconds(cost['judge'])} per step, "
                  f"{100 * share:.0f}% of the step with the judge", flush=True)
        step_with_judge = t_ours["step"] + j["judge"]
        print(f"kardia_jax + rubric judge ({BENCH_PRESET} judge, {j['rows']} rows x {j['prompt_length']}-token prompts, "
              f"5 criteria): reward phase {_seconds(j['reward_with_judge'])} (was {_seconds(t_ours['reward'])}); judge "
              f"{_seconds(j['judge'])} per step = +{100 * j['judge'] / t_ours['step']:.0f}% on the step, "
              f"{100 * j['judge'] / step_with_judge:.0f}% of the step with the judge ({_seconds(step_with_judge)})")
        print(f"  judge input: {'in-graph (shared vocabulary)' if j['shared_vocab'] else 'host re-tokenization'}; "
              f"tokenizer vocab {j['tokenizer_vocab']}, judge embedding rows {j['judge_vocab']}: "
              f"{100 * j['ids_beyond_tokenizer']:.0f}% of completion ids are beyond the tokenizer's vocabulary but "
              f"within the judge's embedding, so the judge reads them; mean rubric score {j['rubric_mean']:.3f}",
              flush=True)
    print(f"{_load()} at end")
    if t_trl is None:
        return
    for p in PHASES:
        print(f"  {p:9s} kardia_jax {_seconds(t_ours[p]):>9s}   TRL {_seconds(t_trl[p]):>9s}   x{t_trl[p] / t_ours[p]:.2f}")
    print(f"grpo step speedup vs trl: {t_trl['step'] / t_ours['step']:.2f}")


if __name__ == "__main__":
    app.run(main)
