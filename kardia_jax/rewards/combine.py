"""The Kardia-R1 reward: a weighted sum of the format, emotion and rubric components.

  r = 1/3 format + 1/3 emotion + 1/3 rubric,   rubric = mean of the judge's five criterion scores

The judge (rewards/judge.py) produces `criterion_scores [N, 5]`, already normalized to [0, 1], in the
order of RUBRIC_CRITERIA; this module owns that order.

A component whose weight is 0 is switched off: it is neither computed (the trainer asks only for the
`active_components`, so a rubric weight of 0 needs no judge) nor logged, and the total is the weighted
sum of the others. Weights are non-negative (`kardia_jax.config.validate` checks the config's).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

RUBRIC_CRITERIA = ("relevance", "empathy", "persona_consistency", "safety", "fluency")

DEFAULT_WEIGHTS = {"format": 1 / 3, "emotion": 1 / 3, "rubric": 1 / 3}


def active_components(weights: Mapping[str, float]) -> tuple[str, ...]:
    """The names of the components with a positive weight, in `weights` order: the ones to compute."""
    return tuple(name for name, weight in weights.items() if weight > 0)


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
    enters the sum as their mean. Every component with a positive weight in `weights` (default
    DEFAULT_WEIGHTS) must be given; one whose weight is 0 need not be, and is dropped if it is.
    Logging keys: "reward/total", "reward/<component>" for each weighted component, and
    "reward/rubric/<criterion>" for each of RUBRIC_CRITERIA when the rubric is weighted.
    """
    weights = DEFAULT_WEIGHTS if weights is None else weights
    active = active_components(weights)
    unknown, missing = sorted(set(components) - set(weights)), sorted(set(active) - set(components))
    if unknown or missing:
        raise ValueError(
            f"reward components {sorted(components)} do not match the weights {dict(weights)} (no weight: "
            f"{unknown}; weighted but not given: {missing}). Give every component with a positive weight, "
            "and a weight for each component."
        )
    logs = {}
    for name in active:
        value = components[name]
        if name == "rubric":
            logs["reward/rubric"] = rubric_reward(value)
            for i, criterion in enumerate(RUBRIC_CRITERIA):
                logs[f"reward/rubric/{criterion}"] = value[:, i].astype(jnp.float32)
        else:
            logs[f"reward/{name}"] = value.astype(jnp.float32)
    total = sum(weights[name] * logs[f"reward/{name}"] for name in active)
    logs["reward/total"] = total
    return total, logs
