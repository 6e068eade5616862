"""Training metrics: a JSON-lines file, TensorBoard scalars, a console progress bar, and plots.

`MetricsLogger.log(step, scalars)` writes, on process 0 only (other processes do nothing):

    <workdir>/metrics.jsonl     one line per call: {"step": 12, "loss": 0.53, ...}; appended, so a
                                resumed run continues the same file (plots keep the last row per step)
    <workdir>/tensorboard/      TensorBoard event files (tensorboardX)
    the console                 a tqdm bar (after `progress(total_steps)`) or one concise line per call

Values are scalars: Python numbers, NumPy scalars or 0-d/one-element jax.Arrays. They are fetched from
the device with one `jax.device_get` per call. Non-finite values are written as JSON `null` (strict JSON)
and read back as NaN by `read_jsonl`.

`workdir` must be a local directory: appending to a `gs://` object is not possible. Keep metrics on the
VM's disk (checkpoints may still go to GCS) and copy them afterwards, e.g. with `gsutil rsync`.

`Timer` measures the wall-time split of a step (sampling / judging / update).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tensorboardX
import tqdm
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tensorboard"


def _scalars_to_floats(step: int, scalars: Mapping[str, Any]) -> dict[str, float]:
    """One device->host transfer for the whole dict, then a float per key (clear error if not scalar)."""
    if "step" in scalars:
        raise ValueError(f"metrics at step {step}: the key 'step' is reserved; rename that metric.")
    host_values = jax.device_get(dict(scalars))
    floats = {}
    for key, value in host_values.items():
        array = np.asarray(value)
        numeric = np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_
        if array.size != 1 or not numeric:
            raise TypeError(
                f"metric {key!r} at step {step} is not a numeric scalar (shape {array.shape}, dtype "
                f"{array.dtype}); reduce it (e.g. .mean()) before logging."
            )
        floats[key] = float(array.reshape(()))
    return floats


def _format_value(value: float) -> str:
    return f"{value:.4g}"


class MetricsLogger:
    """Writes scalar metrics to `<workdir>/metrics.jsonl`, TensorBoard and the console, on process 0.

    Use as a context manager (or call `close()`) so the TensorBoard file and the bar are flushed.
    """

    def __init__(self, workdir: str | os.PathLike):
        workdir = os.fspath(workdir)
        if "://" in workdir:
            raise ValueError(
                f"MetricsLogger needs a local workdir, got {workdir!r}: files on object stores cannot be "
                "appended to. Log to the VM's disk and copy the files to GCS afterwards."
            )
        self.workdir = workdir
        self.jsonl_path = os.path.join(workdir, METRICS_FILENAME)
        self.enabled = jax.process_index() == 0
        self._tensorboard: tensorboardX.SummaryWriter | None = None
        self._bar: tqdm.tqdm | None = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)

    def progress(self, total_steps: int, initial_step: int = 0) -> None:
        """Shows a progress bar over `total_steps`; `log` then advances it and shows the latest values."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Records `scalars` (name -> numeric scalar) for `step`. A no-op on processes other than 0."""
        if not self.enabled:
            return
        step = int(step)
        values = _scalars_to_floats(step, scalars)

        row = {"step": step, **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
        with open(self.jsonl_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")

        if self._tensorboard is None:
            # purge_step: TensorBoard hides events a crashed run wrote after the step this run resumes at.
            self._tensorboard = tensorboardX.SummaryWriter(
                os.path.join(self.workdir, TENSORBOARD_DIRNAME), purge_step=step
            )
        for key, value in values.items():
            self._tensorboard.add_scalar(key, value, global_step=step)

        line = " | ".join(f"{key} {_format_value(value)}" for key, value in values.items())
        if self._bar is None:
            tqdm.tqdm.write(f"step {step} | {line}")
        else:
            self._bar.set_postfix_str(line, refresh=False)
            self._bar.update(max(0, step - self._bar.n))

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer and the progress bar."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, float]]:
    """All rows of a metrics.jsonl file, in file order; `null` values come back as NaN."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}, line {line_number}: not valid JSON ({error}); a crash mid-write can leave a "
                    "truncated last line: delete that line."
                ) from error
            rows.append({k: (math.nan if v is None else v) for k, v in row.items()})
    return rows


def _last_row_per_step(rows: Sequence[dict[str, float]]) -> list[dict[str, float]]:
    """After a resume, steps after the restored checkpoint appear twice: the later row wins."""
    by_step = {}
    for row in rows:
        by_step[row["step"]] = row
    return [by_step[step] for step in sorted(by_step)]


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` finite values; the first points average what exists so far."""
    finite = np.isfinite(values)
    sums = np.cumsum(np.where(finite, values, 0.0))
    counts = np.cumsum(finite)
    sums[window:] = sums[window:] - sums[:-window]
    counts[window:] = counts[window:] - counts[:-window]
    with np.errstate(invalid="ignore"):
        return sums / counts


def plot_curves(
    jsonl_path: str | os.PathLike,
    keys: Sequence[str],
    png_path: str | os.PathLike,
    *,
    title: str | None = None,
    smoothing_window: int = 1,
) -> None:
    """Plots `keys` against step from a metrics.jsonl file into one PNG (e.g. the GRPO reward curves).

    With `smoothing_window > 1` the raw values are drawn faintly and their trailing mean on top.
    """
    rows = _last_row_per_step(read_jsonl(jsonl_path))
    available = sorted({key for row in rows for key in row} - {"step"})
    missing = [key for key in keys if key not in available]
    if missing:
        raise KeyError(f"{jsonl_path} has no metric(s) {missing}; available: {available}.")

    figure = Figure(figsize=(8, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for key in keys:
        points = [(row["step"], row[key]) for row in rows if key in row]
        steps = np.array([p[0] for p in points], dtype=np.float64)
        values = np.array([p[1] for p in points], dtype=np.float64)
        if smoothing_window > 1:
            (raw,) = axes.plot(steps, values, alpha=0.25, linewidth=1)
            axes.plot(steps, _moving_average(values, smoothing_window), color=raw.get_color(), label=key)
        else:
            axes.plot(steps, values, label=key)
    axes.set_xlabel("step")
    axes.grid(alpha=0.3)
    axes.legend()
    if title:
        axes.set_title(title)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    figure.savefig(png_path)


class Timer:
    """Accumulates wall time per named phase; `summary()` returns {"time/<phase>": seconds} and resets.

        timer = Timer()
        with timer("sample"):
            rollout = jax.block_until_ready(sample(...))  # Block, or the time lands in a later phase.
        logger.log(step, {**losses, **timer.summary()})

    JAX dispatches asynchronously: block on a phase's outputs inside its `with` block.
    """

    def __init__(self):
        self._seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[phase] = self._seconds.get(phase, 0.0) + time.perf_counter() - start

    def summary(self) -> dict[str, float]:
        summary = {f"time/{phase}": seconds for phase, seconds in self._seconds.items()}
        self._seconds = {}
        return summary
