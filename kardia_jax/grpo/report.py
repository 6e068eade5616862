"""What a GRPO run shows: the reward table of greedy test-split completions (before and after), the
console's figures, the curves' panels, and a few decoded samples."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from absl import logging

from kardia_jax import metrics, rewards, scaffold, sharding
from kardia_jax.grpo.steps import Steps
from kardia_jax.sampling import SampleOutput


def reward_table(steps: Steps, params, judge_params, pipeline, mesh, max_new_tokens: int) -> dict[str, float]:
    """Mean reward components of greedy completions over every prompt of `pipeline` (one pass; its
    batches carry the judge's contexts when the rubric is weighted).

    Sums and counts are global (every process's rows, filler rows of a short last batch left out), and
    every process returns the same table."""
    sampler = steps.greedy_sampler(max_new_tokens)
    sums, count = {}, 0
    for batch in pipeline:
        dev = scaffold.shard_batch(batch, mesh)
        out = sampler(params, dev["prompt_tokens"], dev["prompt_mask"], jax.random.key(0))
        _, logs = steps.rewards_of(judge_params, out.tokens, out.mask, dev["emotion_id"], dev.get("judge_context"))
        logs, valid = sharding.to_host((logs, dev["valid"]))  # [B] each, all processes' rows
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + float(np.sum(v * valid))
        count += int(valid.sum())
    return {k: v / max(count, 1) for k, v in sums.items()}


def format_table(before: dict[str, float] | None, after: dict[str, float]) -> str:
    """The reward components before and after GRPO, one per line ("-" before: a resumed run's)."""
    keys = [k for k in after if k.startswith("reward/")]
    lines = [f"{'reward component':36s} {'before':>8s} {'after':>8s}"]
    for k in keys:
        b = f"{before[k]:8.3f}" if before else "       -"
        lines.append(f"{k:36s} {b} {after[k]:8.3f}")
    return "\n".join(lines)


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


def print_samples(tokenizer, out: SampleOutput, samples, group_size: int, count: int = 2) -> None:
    """Logs the first sample of the first `count` prompts (process 0's first rows). Every process must
    call it: the completions are gathered from all of them."""
    tokens, mask = sharding.to_host((out.tokens, out.mask))  # [N, T]
    if jax.process_index() != 0:
        return
    for i in range(min(count, len(samples))):
        row = i * group_size
        text = tokenizer.decode(tokens[row][mask[row] > 0].tolist())
        logging.info("sample %d (gold emotion %s):\n%s", i, samples[i].emotion, text)
