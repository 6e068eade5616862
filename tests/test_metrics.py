"""Tests for kardia_jax.metrics: JSON lines across resumes, TensorBoard, plots, process-0 only, Timer."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kardia_jax import metrics
from kardia_jax.metrics import MetricsLogger, Timer, plot_curves, read_jsonl


def test_jsonl_continues_across_a_resume(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"loss": jnp.float32(2.5), "reward/mean": np.float64(0.25), "tokens": 7})
        logger.log(2, {"loss": jnp.array([1.5]), "reward/mean": jnp.array(0.5)})
    with MetricsLogger(tmp_path) as logger:  # A resumed run appends to the same file.
        logger.progress(total_steps=4, initial_step=2)
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
        logger.progress(total_steps=10)
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
    plot_curves(tmp_path / "metrics.jsonl", ["reward/total", "reward/format"], png, smoothing_window=4)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = metrics._last_row_per_step(read_jsonl(tmp_path / "metrics.jsonl"))
    assert [row["step"] for row in rows] == list(range(1, 31))
    assert rows[17]["reward/total"] == 0.5

    with pytest.raises(KeyError, match="available"):
        plot_curves(tmp_path / "metrics.jsonl", ["reward/rubric"], png)


def test_moving_average_skips_nan():
    values = np.array([1.0, 3.0, np.nan, 5.0, 7.0])
    np.testing.assert_allclose(metrics._moving_average(values, 2), [1.0, 2.0, 3.0, 5.0, 6.0])


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
