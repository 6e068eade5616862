"""Training metrics: a JSON-lines file, TensorBoard scalars, a console progress bar, and plots.

`MetricsLogger.log(step, scalars)` writes, on process 0 only (other processes do nothing):

    <workdir>/metrics.jsonl     one line per call: {"step": 12, "loss": 0.53, ...}; appended, so a
                                resumed run continues the same file (plots keep the last row per step)
    <workdir>/tensorboard/      TensorBoard event files (tensorboardX)
    the console                 after `progress(...)`: one tqdm bar with a few chosen figures and its
                                ETA, and a summary line every `log_every` steps; nothing without it

Values are scalars: Python numbers, NumPy scalars or 0-d/one-element jax.Arrays. They are fetched from
the device with one `jax.device_get` per call. Non-finite values are written as JSON `null` (strict JSON)
and read back as NaN by `read_jsonl`.

`workdir` may be `gs://...`. Objects cannot be appended to, so the logger then writes both files into a
local mirror directory exactly as above (an existing metrics.jsonl is downloaded into it first, so a
resumed run continues it) and uploads the mirror's files, each rewritten whole, at most once every
`upload_interval_s` seconds (default 60) from `log`, and on `flush()` / `close()`. Cost: one upload of
metrics.jsonl and of this run's event file per interval, each as large as the file so far (a 10,000-step
run logging 30 metrics grows them to ~8 MB and ~20 MB); a crash loses at most the last interval's rows,
which the resumed run, restarting from its last checkpoint, logs again. (tensorboardX can write gs://
itself, but re-uploads the whole file from a garbage-collected writer too, and retries for 120 s when
the endpoint is gone, e.g. at interpreter exit; and it would be a second way to write GCS.)

`plot_curves` draws panels of metrics (raw values faint, TensorBoard's smoothing on top) into one PNG; it
reads and writes through `kardia_jax.storage`, so both paths may be local or gs://.

`Timer` measures the wall-time split of a step (sampling / judging / update).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tensorboardX
import tqdm
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kardia_jax import storage

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
    return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"


def _figures(values: Mapping[str, float], figures: Mapping[str, str], separator: str) -> str:
    """"label value" for each (label, metric key) of `figures` that `values` has, in that order."""
    return separator.join(f"{label} {_format_value(values[key])}" for label, key in figures.items() if key in values)


@dataclasses.dataclass(frozen=True)
class Console:
    """What `MetricsLogger.progress` shows: the bar's postfix holds `figures`, and every `log_every`
    steps (and at the last) a line holds `summary` (default: `figures`). Both map a short label to a
    metric key; keys a step did not log are left out."""

    job: str  # the bar's description and each summary line's first word, e.g. "sft"
    figures: Mapping[str, str]
    summary: Mapping[str, str] | None = None
    log_every: int = 1


class MetricsLogger:
    """Writes scalar metrics to `<workdir>/metrics.jsonl`, TensorBoard and the console, on process 0.

    `workdir` is local or gs:// (see the module docstring for how gs:// is written). Use as a context
    manager (or call `close()`) so the TensorBoard file, the bar and a gs:// workdir's files are flushed.
    """

    def __init__(self, workdir: str | os.PathLike, *, upload_interval_s: float = 60.0):
        workdir = os.fspath(workdir)
        self.workdir = workdir
        self.jsonl_path = os.path.join(workdir, METRICS_FILENAME)
        self.enabled = jax.process_index() == 0
        self._upload_interval_s = upload_interval_s
        self._last_upload = time.monotonic()
        self._tensorboard: tensorboardX.SummaryWriter | None = None
        self._bar: tqdm.tqdm | None = None
        self._console: Console | None = None
        # Where the files are written: the workdir itself, or a local mirror of a gs:// workdir.
        self._local_dir = workdir
        if not self.enabled:
            return
        if storage.is_gcs(workdir):
            self._local_dir = tempfile.mkdtemp(prefix="kardia_metrics_")
            if storage.exists(self.jsonl_path):
                with open(os.path.join(self._local_dir, METRICS_FILENAME), "wb") as f:
                    f.write(storage.read_bytes(self.jsonl_path))
        else:
            os.makedirs(workdir, exist_ok=True)

    def progress(self, total_steps: int, console: Console, initial_step: int = 0) -> None:
        """Shows a progress bar over `total_steps` (elapsed and ETA, no rate: `console.figures` say it);
        `advance` and `log` move it, `log` shows `console`'s figures and summary lines."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._console = console
        self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, desc=console.job, unit="step",
                              dynamic_ncols=True,
                              bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")

    def advance(self, step: int) -> None:
        """Moves the bar to `step` (done steps), e.g. on a step that logs nothing."""
        if self._bar is not None:
            self._bar.update(max(0, step - self._bar.n))

    def log(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Records `scalars` (name -> numeric scalar) for `step`. A no-op on processes other than 0."""
        if not self.enabled:
            return
        step = int(step)
        values = _scalars_to_floats(step, scalars)

        row = {"step": step, **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
        with open(os.path.join(self._local_dir, METRICS_FILENAME), "a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")

        if self._tensorboard is None:
            # purge_step: TensorBoard hides events a crashed run wrote after the step this run resumes at.
            # The suffix keeps a resumed run's file from replacing the last one's (names carry only the
            # second and the host), which matters on gs://, where each upload rewrites the whole file.
            self._tensorboard = tensorboardX.SummaryWriter(
                os.path.join(self._local_dir, TENSORBOARD_DIRNAME), purge_step=step, filename_suffix=f".from{step}"
            )
        for key, value in values.items():
            self._tensorboard.add_scalar(key, value, global_step=step)

        if self._bar is not None:
            console = self._console
            self._bar.set_postfix_str(_figures(values, console.figures, ", "), refresh=False)
            self.advance(step)
            if step % console.log_every == 0 or step == self._bar.total:
                summary = _figures(values, console.summary or console.figures, " | ")
                tqdm.tqdm.write(f"{console.job} step {step}/{self._bar.total} | {summary}")
        if time.monotonic() - self._last_upload >= self._upload_interval_s:
            self.flush()

    def flush(self) -> None:
        """Flushes TensorBoard's file; for a gs:// workdir, uploads the files (whole) now."""
        if self._tensorboard is not None:
            self._tensorboard.flush()
        if self.enabled and self._local_dir != self.workdir:
            storage.copy_dir_to(self._local_dir, self.workdir)
        self._last_upload = time.monotonic()

    def close(self) -> None:
        """Closes the TensorBoard writer and the progress bar; uploads a gs:// workdir's files a last time."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.enabled and self._local_dir != self.workdir and os.path.isdir(self._local_dir):
            self.flush()
            shutil.rmtree(self._local_dir)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, float]]:
    """All rows of a metrics.jsonl file (local or gs://), in file order; `null` values come back as NaN."""
    rows = []
    for line_number, line in enumerate(storage.read_text(path).splitlines(), start=1):
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


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average with debiasing, so the first points are
    not pulled towards 0. Point i is sum_j w^(i-j) v_j / sum_j w^(i-j) over the finite v_j up to i;
    non-finite points stay NaN and do not enter the average. weight 0: the values themselves."""
    smoothed = np.full(len(values), np.nan)
    mean, count = 0.0, 0
    for i, value in enumerate(values):
        if np.isfinite(value):
            mean, count = weight * mean + (1.0 - weight) * value, count + 1
            smoothed[i] = mean / (1.0 - weight**count)
    return smoothed


@dataclasses.dataclass(frozen=True)
class Panel:
    """One axes of a `plot_curves` figure: `keys` (metric names) against step, one line each."""

    title: str
    keys: tuple[str, ...]
    ylabel: str = ""
    labels: tuple[str, ...] | None = None  # the legend's names of `keys` (default: the keys), shown when 2+
    smooth: bool = True  # False for exact, noiseless curves (a learning rate), which smoothing only delays


def plot_curves(
    jsonl_path: str | os.PathLike,
    panels: Sequence[Panel | str],
    png_path: str | os.PathLike,
    *,
    title: str | None = None,
    smoothing: float = 0.8,
    columns: int = 4,
) -> Figure | None:
    """Draws `panels` (a `Panel`, or a metric name for a panel of its own) from a metrics.jsonl file into
    one PNG, `columns` panels a row, and returns the matplotlib Figure (None on processes other than 0).

    Both paths may be local or gs://; only process 0 reads and writes (every process may call it). Each
    line is drawn faintly as logged and, with `smoothing` > 0, in full as `smooth(values, smoothing)`
    (0.8: a window of ~5 points, heavier than TensorBoard's default 0.6, for the few noisy points of a
    short run). A resumed run's repeated steps count once (the last row).
    """
    if jax.process_index() != 0:
        return None
    panels = [Panel(p, (p,)) if isinstance(p, str) else p for p in panels]
    rows = _last_row_per_step(read_jsonl(jsonl_path))
    available = sorted({key for row in rows for key in row} - {"step"})
    missing = [key for panel in panels for key in panel.keys if key not in available]
    if missing:
        raise KeyError(f"{jsonl_path} has no metric(s) {missing}; available: {available}.")

    columns = min(columns, len(panels))
    grid_rows = -(-len(panels) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.2 * grid_rows + (0.4 if title else 0)), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(grid_rows, columns, squeeze=False)
    for axes in grid.flat[len(panels):]:
        axes.remove()
    for axes, panel in zip(grid.flat, panels):
        for key, label in zip(panel.keys, panel.labels or panel.keys):
            points = np.array([(row["step"], row[key]) for row in rows if key in row], dtype=np.float64)  # [n, 2]
            steps, values = points[:, 0], points[:, 1]
            if smoothing > 0 and panel.smooth:
                (raw,) = axes.plot(steps, values, alpha=0.25, linewidth=1)
                axes.plot(steps, smooth(values, smoothing), color=raw.get_color(), linewidth=1.6, label=label)
            else:
                axes.plot(steps, values, linewidth=1.4, label=label)
        axes.set_title(panel.title, fontsize=11)
        axes.set_xlabel("step")
        axes.set_ylabel(panel.ylabel)
        axes.grid(alpha=0.3)
        if len(panel.keys) > 1:  # under the axes, where it hides no line
            axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=3, frameon=False)
    if title:
        figure.suptitle(title + (f" (smoothed: EMA {smoothing:g}, raw faint)" if smoothing > 0 else ""), fontsize=13)
    png = io.BytesIO()
    figure.savefig(png, format="png")
    storage.write_bytes(png_path, png.getvalue())
    return figure


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
