"""The figures of one evaluated checkpoint, each with a 95% confidence interval.

Two kinds of figure, two intervals (both two-sided, z = 1.96; `Figure.interval` says which):

  rates  (emotion accuracy, format-valid rate, truncation rate, unparsable judge replies): the Wilson
         score interval of k successes in n, which stays inside [0, 1] and is not empty at 0 or n
             centre = (p + z²/2n) / (1 + z²/n),  half = z·sqrt(p(1 - p)/n + z²/4n²) / (1 + z²/n)
  means  (the rubric criteria on 1-5, completion length): the normal approximation
             mean ± z·s/sqrt(n),  s the sample standard deviation (ddof 1)
         undefined (NaN) for n < 2.

`summarize(records, modes)` turns the per-sample records of `kardia_jax/evaluate.py` into every figure.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kardia_jax.rewards.combine import RUBRIC_CRITERIA

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclasses.dataclass(frozen=True)
class Figure:
    """One reported figure: its value, the 95% interval [low, high], over n samples."""

    value: float
    low: float
    high: float
    n: int
    interval: str  # "wilson" or "normal"

    def to_json(self) -> dict[str, Any]:
        clean = lambda x: None if math.isnan(x) else x  # JSON has no NaN
        return {"value": clean(self.value), "low": clean(self.low), "high": clean(self.high), "n": self.n,
                "interval": self.interval}


def wilson(successes: int, n: int, z: float = Z95) -> Figure:
    """The rate successes / n with its Wilson score interval (NaN for n = 0)."""
    if n == 0:
        return Figure(math.nan, math.nan, math.nan, 0, "wilson")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return Figure(p, max(0.0, centre - half), min(1.0, centre + half), n, "wilson")


def normal(values: Sequence[float], z: float = Z95) -> Figure:
    """The mean of `values` with the normal-approximation interval (NaN bounds for n < 2)."""
    x = np.asarray(values, np.float64)
    n = len(x)
    if n == 0:
        return Figure(math.nan, math.nan, math.nan, 0, "normal")
    mean = float(x.mean())
    if n < 2:
        return Figure(mean, math.nan, math.nan, n, "normal")
    half = z * float(x.std(ddof=1)) / math.sqrt(n)
    return Figure(mean, mean - half, mean + half, n, "normal")


def rate(flags: Sequence[bool]) -> Figure:
    return wilson(int(sum(bool(f) for f in flags)), len(flags))


def summarize(records: Sequence[Mapping[str, Any]], modes: Sequence[str]) -> dict[str, Any]:
    """Every figure of one checkpoint from its per-sample records (`kardia_jax/evaluate.py` writes them:
    format_valid, emotion_correct, completion_tokens, truncated, has_response, and per judge mode m
    scores[m][criterion] on 1-5 and, for "decoded", parsed[criterion]).

    Returns {"num_samples", "format_valid_rate", "emotion_accuracy", "completion_tokens", "truncation_rate",
    "no_response_span" (a count), "judge": {mode: {criterion: Figure, ..., "unparsable": {criterion: count},
    "unparsable_rate": Figure}}}; rates are fractions (the report prints percentages).
    """
    out: dict[str, Any] = {
        "num_samples": len(records),
        "emotion_accuracy": rate([r["emotion_correct"] for r in records]),
        "format_valid_rate": rate([r["format_valid"] for r in records]),
        "completion_tokens": normal([r["completion_tokens"] for r in records]),
        "truncation_rate": rate([r["truncated"] for r in records]),
        # Known once the judge has read the completions (None without a judge).
        "no_response_span": sum(r["has_response"] is False for r in records) if modes else None,
        "judge": {},
    }
    for mode in modes:
        figures: dict[str, Any] = {c: normal([r["scores"][mode][c] for r in records]) for c in RUBRIC_CRITERIA}
        if mode == "decoded":
            # Replies of completions that have a response span (the others are not sent to the judge).
            asked = [r for r in records if r["has_response"]]
            failed = {c: sum(not r["parsed"][c] for r in asked) for c in RUBRIC_CRITERIA}
            figures["unparsable"] = failed
            figures["unparsable_rate"] = wilson(sum(failed.values()), len(asked) * len(RUBRIC_CRITERIA))
        out["judge"][mode] = figures
    return out


def correlations(records: Sequence[Mapping[str, Any]], first: str, second: str) -> dict[str, float]:
    """Per criterion, Pearson's r between two judge modes' scores on the same samples (completions with a
    response span only: span-less ones are 1 in both by rule). NaN where either is constant."""
    asked = [r for r in records if r["has_response"]]
    out = {}
    for c in RUBRIC_CRITERIA:
        a = np.asarray([r["scores"][first][c] for r in asked], np.float64)
        b = np.asarray([r["scores"][second][c] for r in asked], np.float64)
        ok = len(a) >= 2 and a.std() > 0 and b.std() > 0
        out[c] = float(np.corrcoef(a, b)[0, 1]) if ok else math.nan
    return out


def to_json(tree):
    """`summarize`'s output with every Figure as a dict (for eval.json)."""
    if isinstance(tree, Figure):
        return tree.to_json()
    if isinstance(tree, Mapping):
        return {k: to_json(v) for k, v in tree.items()}
    if isinstance(tree, float) and math.isnan(tree):
        return None
    return tree
