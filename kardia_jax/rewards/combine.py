"""The Kardia-R1 reward: a weighted sum of the format, emotion and rubric components.

  r = 1/3 format + 1/3 emotion + 1/3 rubric,   rubric = mean of the judge's five criterion scores

The judge (rewards/judge.py) produces `criterion_scores [N, 5]`, already normalized to [0, 1], in the
order of RUBRIC_CRITERIA; this module owns that order.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

RUBRIC_CRITERIA = ("relevance", "empathy", "persona_consistency", "safety", "fluency")

DEFAULT_WEIGHTS = {"format": 1 / 3, "emotion": 1 / 3, "rubric": 1 / 3}


def rubric_reward(criterion_scores: jax.Array) -> jax.Array:
    """[N, 5] per-criterion scores in [0, 1] (RUBRIC_CRITERIA order) -> [N] their mean."""
    if criterion_scores.ndim != 2 or criterion_scores.shape[1] != len(RUBRIC_CRITERIA):
        raise ValueError(
            f"rubric scores have shape {criterion_scores.shape}; expected [N, {len(RUBRIC_CRITERIA)}] "
            f"with columns {RUBRIC_CRITERIA}."
        )
    return criterion_scores.astype(jnp.float32).mean(axis=1)


def total_reward(
    components: Mapping[str, jax.Array], weights: Mapping[str, float] | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted reward [N] and a flat dict of per-sample arrays [N] for logging.

    components: name -> [N] reward, except "rubric", which is the judge's criterion scores [N, 5] and
    enters the sum as their mean. Its keys must be those of `weights` (default DEFAULT_WEIGHTS).
    Logging keys: "reward/total", "reward/<component>" for each component, and
    "reward/rubric/<criterion>" for each of RUBRIC_CRITERIA when a rubric is given.
    """
    weights = DEFAULT_WEIGHTS if weights is None else weights
    if set(components) != set(weights):
        raise ValueError(
            f"reward components {sorted(components)} do not match the weights {sorted(weights)}; "
            "give one weight per component."
        )
    logs = {}
    for name, value in components.items():
        if name == "rubric":
            logs["reward/rubric"] = rubric_reward(value)
            for i, criterion in enumerate(RUBRIC_CRITERIA):
                logs[f"reward/rubric/{criterion}"] = value[:, i].astype(jnp.float32)
        else:
            logs[f"reward/{name}"] = value.astype(jnp.float32)
    total = sum(weights[name] * logs[f"reward/{name}"] for name in components)
    logs["reward/total"] = total
    return total, logs
