"""What an evaluation shows: the printed table, eval.json and the radar chart.

The table has one row per checkpoint and judge mode, in the paper's column order: Emotion accuracy (%),
then Relevance, Fluency, Empathy, Persona (consistency) and Safety on 1-5, then the format-valid rate,
the mean completion length and the truncation rate; every figure with its 95% interval: "mean±half" for
the normal interval of a mean, "rate (low-high)" for the Wilson interval of a rate (`stats.py`).

The radar chart puts the six paper axes around a circle, each scaled from its worst (centre: 0% or 1) to
its best (rim: 100% or 5), one polygon per checkpoint.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kardia_jax.evaluation.stats import Figure  # noqa: E402

# The paper's order of the rubric criteria, with the table's short labels.
CRITERIA_COLUMNS = {"relevance": "Relevance", "fluency": "Fluency", "empathy": "Empathy",
                    "persona_consistency": "Persona", "safety": "Safety"}


def _cell(figure: Figure, percent: bool = False, digits: int = 2) -> str:
    """"value ± half-width" for a normal interval (symmetric), "value (low-high)" for a Wilson one."""
    scale, digits = (100.0, 1) if percent else (1.0, digits)
    if math.isnan(figure.value):
        return "n/a"
    value = f"{figure.value * scale:.{digits}f}"
    if math.isnan(figure.low):
        return value
    if figure.interval == "normal":
        return f"{value}±{(figure.high - figure.value) * scale:.{digits}f}"
    return f"{value} ({figure.low * scale:.{digits}f}-{figure.high * scale:.{digits}f})"


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """results: checkpoint label -> `stats.summarize` output. One row per checkpoint and judge mode."""
    header = ["checkpoint", "judge", "n", "Emotion acc %", *CRITERIA_COLUMNS.values(), "format %", "tokens", "trunc %"]
    rows = []
    for label, summary in results.items():
        modes = list(summary["judge"]) or ["none"]
        for k, mode in enumerate(modes):
            judged = summary["judge"].get(mode, {})
            rubric = [_cell(judged[c]) if c in judged else "-" for c in CRITERIA_COLUMNS]
            first = [str(summary["num_samples"]), _cell(summary["emotion_accuracy"], percent=True)]
            rest = [_cell(summary["format_valid_rate"], percent=True), _cell(summary["completion_tokens"], digits=1),
                    _cell(summary["truncation_rate"], percent=True)]
            if k:  # the generation figures once per checkpoint
                first, rest = ["", ""], ["", "", ""]
            rows.append([label if not k else "", mode, *first, *rubric, *rest])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(x).rjust(w) if i > 1 else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def format_notes(results: Mapping[str, Mapping[str, Any]], correlations: Mapping[str, Mapping[str, float]]) -> str:
    """The lines under the table: span-less completions, unparsable decoded replies, and the read vs
    decoded correlation per criterion (when both modes ran)."""
    lines = []
    for label, summary in results.items():
        n = summary["num_samples"]
        if summary["no_response_span"] is not None:
            lines.append(f"{label}: {summary['no_response_span']} of {n} completions have no response span "
                         "(scored 1 on every criterion)")
        decoded = summary["judge"].get("decoded")
        if decoded is not None:
            failed = decoded["unparsable"]
            asked = decoded["unparsable_rate"].n
            lines.append(f"{label}: decoded judge replies that do not parse (scored 1): {sum(failed.values())} of "
                         f"{asked} (" + ", ".join(f"{CRITERIA_COLUMNS[c]} {failed[c]}" for c in CRITERIA_COLUMNS) + ")")
        if label in correlations:
            r = correlations[label]
            lines.append(f"{label}: read vs decoded, Pearson r over the completions with a response span: "
                         + ", ".join(f"{CRITERIA_COLUMNS[c]} {r[c]:.2f}" if not math.isnan(r[c])
                                     else f"{CRITERIA_COLUMNS[c]} n/a (constant)" for c in CRITERIA_COLUMNS))
    return "\n".join(lines)


def radar_axes(summary: Mapping[str, Any], mode: str) -> list[float]:
    """The six radar values of one checkpoint in [0, 1]: emotion accuracy, then the criteria (1-5 -> 0-1)."""
    judged = summary["judge"][mode]
    return [summary["emotion_accuracy"].value] + [(judged[c].value - 1.0) / 4.0 for c in CRITERIA_COLUMNS]


def plot_radar(results: Mapping[str, Mapping[str, Any]], mode: str, title: str = "") -> bytes:
    """Every checkpoint's six paper axes (judge `mode`) as a PNG image."""
    labels = ["Emotion acc."] + list(CRITERIA_COLUMNS.values())
    angles = [2 * math.pi * k / len(labels) for k in range(len(labels))]
    fig, ax = plt.subplots(figsize=(6.4, 6.0), subplot_kw={"projection": "polar"})
    for label, summary in results.items():
        values = radar_axes(summary, mode)
        ax.plot(angles + angles[:1], values + values[:1], linewidth=2, label=label)
        ax.fill(angles + angles[:1], values + values[:1], alpha=0.12)
    ax.set_xticks(angles, labels)
    ax.set_ylim(0, 1)
    ax.set_yticks([0.25, 0.5, 0.75, 1.0], ["25% | 2", "50% | 3", "75% | 4", "100% | 5"], fontsize=7, color="0.4")
    ax.set_rlabel_position(90 / len(labels))
    ax.tick_params(axis="x", pad=10)
    ax.set_title(title or f"Emotion accuracy (%) and rubric scores (1-5, judge {mode})", pad=24)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=min(len(results), 4), frameon=False)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120, bbox_inches="tight")  # the outer labels and legend included
    plt.close(fig)
    return png.getvalue()


def primary_mode(modes: Sequence[str]) -> str | None:
    """The judge mode the radar draws: read when it ran (training's scorer), else decoded."""
    return "read" if "read" in modes else (modes[0] if modes else None)
