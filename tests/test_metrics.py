"""Tests for kardia_jax.metrics and kardia_jax.console: JSON lines across resumes, TensorBoard, the
console (bar figures, summary lines, library logs, end-of-job paths), plots, process-0 only, Timer."""

import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging as absl_logging

from kardia_jax import checkpoints, console, metrics, sft
from kardia_jax.grpo import report
from kardia_jax.config import base_config
from kardia_jax.metrics import Console, MetricsLogger, Timer, plot_curves, read_jsonl


def test_jsonl_continues_across_a_resume(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"loss": jnp.float32(2.5), "reward/mean": np.float64(0.25), "tokens": 7})
        logger.log(2, {"loss": jnp.array([1.5]), "reward/mean": jnp.array(0.5)})
    with MetricsLogger(tmp_path) as logger:  # A resumed run appends to the same file.
        logger.progress(4, Console("test", {"loss": "loss"}), initial_step=2)
        logger.log(3, {"loss": jnp.nan, "reward/mean": 0.75})

    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert rows[0] == {"step": 1, "loss": 2.5, "reward/mean": 0.25, "tokens": 7.0}
    assert rows[1]["loss"] == 1.5
    assert math.isnan(rows[2]["loss"])
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()  # Strict JSON: null, not NaN.


def test_tensorboard_event_file_is_written(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(5, {"loss": 1.0})
    event_files = os.listdir(tmp_path / "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in event_files)
    assert all(os.path.getsize(tmp_path / "tensorboard" / name) > 0 for name in event_files)


def test_bad_values_are_rejected_with_the_key(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        with pytest.raises(TypeError, match="'logits' at step 4"):
            logger.log(4, {"logits": jnp.ones(3)})
        with pytest.raises(ValueError, match="reserved"):
            logger.log(4, {"step": 4})


def test_other_processes_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    workdir = tmp_path / "run"
    with MetricsLogger(workdir) as logger:
        logger.progress(10, Console("test", {"loss": "loss"}))
        logger.log(1, {"loss": 1.0})
    assert not workdir.exists()


def test_plot_keeps_last_row_per_step(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 21):
            logger.log(step, {"reward/total": step / 20, "reward/format": 1.0})
    with MetricsLogger(tmp_path) as logger:  # Resumed from step 15: steps 16-20 are written again.
        for step in range(16, 31):
            logger.log(step, {"reward/total": 0.5, "reward/format": 1.0})

    png = tmp_path / "plots" / "rewards.png"
    plot_curves(tmp_path / "metrics.jsonl", ["reward/total", "reward/format"], png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = metrics._last_row_per_step(read_jsonl(tmp_path / "metrics.jsonl"))
    assert [row["step"] for row in rows] == list(range(1, 31))
    assert rows[17]["reward/total"] == 0.5

    with pytest.raises(KeyError, match="available"):
        plot_curves(tmp_path / "metrics.jsonl", ["reward/rubric"], png)


def test_smoothing_is_the_debiased_ema_and_skips_nan():
    values = np.array([1.0, 3.0, np.nan, 5.0, 7.0])
    w = 0.5
    # TensorBoard's smoothing: the i-th finite point becomes sum_j w^(i-j) v_j / sum_j w^(i-j) over the
    # finite points j <= i (a NaN neither enters nor decays the average).
    finite = [1.0, 3.0, 5.0, 7.0]
    expected = []
    for i in range(len(finite)):
        weights = [w ** (i - j) for j in range(i + 1)]
        expected.append(sum(wj * v for wj, v in zip(weights, finite)) / sum(weights))
    smoothed = metrics.smooth(values, w)
    assert math.isnan(smoothed[2])
    np.testing.assert_allclose(smoothed[[0, 1, 3, 4]], expected, rtol=1e-12, atol=1e-12)  # float64
    np.testing.assert_allclose(smoothed[:2], [1.0, 7 / 3], rtol=1e-12, atol=1e-12)  # debiased: starts at v_0
    np.testing.assert_array_equal(metrics.smooth(values, 0.0), values)


def _grpo_rows(tmp_path, steps=12):
    """A synthetic GRPO metrics.jsonl with the default weights' keys (and a few the plot does not use)."""
    rng = np.random.default_rng(0)
    criteria = ("relevance", "empathy", "persona_consistency", "safety", "fluency")
    with MetricsLogger(tmp_path) as logger:
        for step in range(1, steps + 1):
            row = {f"reward/{name}": rng.uniform() for name in ("total", "format", "emotion", "rubric")}
            row |= {f"reward/rubric/{c}": rng.uniform() for c in criteria}
            logger.log(step, row | {"loss": rng.normal(), "kl": rng.uniform(), "entropy": 1.0, "time/step": 2.0})
    return tmp_path / "metrics.jsonl"


def _panels(figure):
    return {axes.get_title(): axes for axes in figure.axes}


def test_grpo_plot_has_a_panel_per_weighted_component_and_the_criteria(tmp_path):
    jsonl = _grpo_rows(tmp_path)
    figure = plot_curves(jsonl, report.plot_panels(base_config()), tmp_path / "rewards.png", title="GRPO")
    assert (tmp_path / "rewards.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = _panels(figure)
    assert list(panels) == ["total reward", "emotion reward", "format reward", "rubric reward",
                            "rubric criteria (judge)", "GRPO loss", "KL to the reference"]
    for title, axes in panels.items():
        assert axes.get_xlabel() == "step" and axes.get_ylabel()
        lines = axes.get_lines()
        assert len(lines) == (10 if title == "rubric criteria (judge)" else 2)  # raw + smoothed per key
        raw, smoothed = lines[0], lines[1]
        assert raw.get_alpha() < 1 and smoothed.get_alpha() is None  # raw faint under the smoothed line
        np.testing.assert_array_equal(raw.get_xdata(), np.arange(1, 13))
        np.testing.assert_allclose(smoothed.get_ydata(), metrics.smooth(raw.get_ydata(), 0.8), rtol=1e-12, atol=0)
    legend = [t.get_text() for t in panels["rubric criteria (judge)"].get_legend().get_texts()]
    assert legend == ["relevance", "empathy", "persona consistency", "safety", "fluency"]
    rows = read_jsonl(jsonl)
    np.testing.assert_array_equal(panels["format reward"].get_lines()[0].get_ydata(), [r["reward/format"] for r in rows])

    # Only weighted components get a panel; no KL panel without a reference model.
    config = base_config()
    config.grpo.reward_weights.rubric = 0.0
    config.grpo.beta = 0.0
    figure = plot_curves(jsonl, report.plot_panels(config), tmp_path / "rewards.png")
    assert list(_panels(figure)) == ["total reward", "emotion reward", "format reward", "GRPO loss"]


def test_sft_plot_has_loss_and_learning_rate(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": 5.0 / step, "learning_rate": 1e-4, "grad_norm": 1.0})
    figure = plot_curves(tmp_path / "metrics.jsonl", sft.PLOT_PANELS, tmp_path / "loss.png", title="SFT")
    panels = _panels(figure)
    assert list(panels) == ["SFT loss", "learning rate"]
    np.testing.assert_allclose(panels["SFT loss"].get_lines()[0].get_ydata(), [5.0 / s for s in range(1, 6)],
                               rtol=1e-12, atol=0)
    assert len(panels["SFT loss"].get_lines()) == 2 and len(panels["learning rate"].get_lines()) == 1  # exact: unsmoothed


# -- the console ---------------------------------------------------------------------------------


def test_bar_shows_only_the_chosen_figures_and_a_summary_every_log_every_steps(tmp_path, capsys):
    view = Console("grpo", figures={"reward": "reward/total", "s/step": "time/step"},
                   summary={"reward": "reward/total", "kl": "kl"}, log_every=3)
    with MetricsLogger(tmp_path) as logger:
        logger.progress(7, view)
        for step in range(1, 8):
            logger.log(step, {"reward/total": step / 10, "kl": 0.5, "time/step": 2.0, "grad_norm": 9.0,
                              "clip_ratio/low": 0.125})
            if step == 2:
                assert logger._bar.postfix == "reward 0.2, s/step 2"
    out, err = capsys.readouterr()
    assert out.splitlines() == ["grpo step 3/7 | reward 0.3 | kl 0.5", "grpo step 6/7 | reward 0.6 | kl 0.5",
                                "grpo step 7/7 | reward 0.7 | kl 0.5"]  # every 3 steps, and at the last
    assert "reward 0.7, s/step 2" in err and "7/7" in err  # the bar, on stderr
    assert "grad_norm" not in out + err and "clip_ratio" not in out + err
    assert {"grad_norm", "clip_ratio/low", "kl"} <= set(read_jsonl(tmp_path / "metrics.jsonl")[0])  # all kept


def test_sft_and_grpo_bars_show_a_handful_of_figures():
    assert set(sft.CONSOLE_FIGURES) == {"loss", "tokens/s"}
    view = report.console_view(base_config())
    assert set(view.figures) == {"reward", "kl", "s/step"} and view.log_every == base_config().grpo.log_every


class _Records(logging.Handler):
    """Keeps the records that pass its filters."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def records():
    handler = _Records()
    root = logging.getLogger()
    root.addHandler(handler)
    verbosity = absl_logging.get_verbosity()
    yield handler
    root.removeHandler(handler)
    absl_logging.set_verbosity(verbosity)


def _save_a_checkpoint(directory):
    with checkpoints.Checkpointer(directory, async_save=False) as ckpt:
        ckpt.save(1, {"w": jnp.ones(4)}, force=True)


def _orbax_info(handler):
    return [r for r in handler.records if r.levelno == logging.INFO and f"{os.sep}orbax{os.sep}" in r.pathname]


def test_library_info_logs_are_off_by_default_and_on_with_verbosity(tmp_path, records):
    console.configure_logging(verbosity=1, handler=records)  # what -v 1 does
    _save_a_checkpoint(tmp_path / "verbose")
    assert _orbax_info(records)  # Orbax does log INFO lines on a save...

    records.records.clear()
    console.configure_logging(handler=records)  # the default
    _save_a_checkpoint(tmp_path / "default")
    assert not _orbax_info(records)  # ...which the default hides
    ours = logging.LogRecord("absl", logging.INFO, sft.__file__, 1, "SFT: %d steps", (6,), None)
    assert records.filter(ours)  # while kardia_jax's own INFO lines pass

    console.configure_logging(primary=False, handler=records)  # a process other than 0
    assert not records.filter(ours)


def test_a_warning_is_shown_once(records):
    console.configure_logging(handler=records)
    for step in range(3):  # a library warning repeated with new numbers, from one line of its source
        records.handle(logging.LogRecord("jax", logging.WARNING, "/site-packages/jax/x.py", 7, "slow %d", (step,), None))
    for kind in ("a", "b", "a"):  # kardia_jax's: once per text
        records.handle(logging.LogRecord("absl", logging.WARNING, sft.__file__, 9, "bad row %s", (kind,), None))
    assert [r.getMessage() for r in records.records] == ["slow 0", "bad row a", "bad row b"]


def test_end_of_job_lines_name_the_paths(monkeypatch, capsys):
    paths = {"checkpoints": "gs://bucket/run/sft", "model (HF)": "gs://bucket/run/sft/hf",
             "metrics": "gs://bucket/run/sft/metrics.jsonl", "plots": "/tmp/run/sft/loss.png", "absent": None}
    console.print_outputs("SFT", paths)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "SFT outputs:" and len(lines) == 5
    for (what, path), line in zip(list(paths.items())[:4], lines[1:]):
        assert line.split() == [*what.split(), path]
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    console.print_outputs("SFT", paths)
    assert capsys.readouterr().out == ""


def test_timer_accumulates_and_resets():
    timer = Timer()
    with timer("sample"):
        pass
    with timer("sample"):
        pass
    with timer("update"):
        pass
    summary = timer.summary()
    assert set(summary) == {"time/sample", "time/update"} and all(v >= 0 for v in summary.values())
    assert timer.summary() == {}
