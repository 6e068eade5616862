"""The GRPO run loop (`kardia_jax.train`): a short run logs, checkpoints and exports, a SIGTERM stops it and
the rerun resumes to the uninterrupted result, the rubric can be off, and the schedule and non-finite stop
follow the updates."""

import json
import math
import os
import signal
import threading
import time

import jax
import numpy as np
import pytest

from helpers_training import assert_same_bits, checkpoint_item, grpo_config
from kardia_jax import checkpoints, train
from kardia_jax.metrics import read_jsonl

tiny_config = grpo_config


def test_short_run_logs_and_checkpoints(tmp_path, capsys):
    config = tiny_config(tmp_path, max_steps=2)
    first = train.run(config)
    out = capsys.readouterr().out
    assert "grpo step 2/2 | reward " in out  # the summary line of the last step (grpo.log_every=10)
    for name in ("hf", "metrics.jsonl", "tensorboard", "rewards.png"):
        assert os.path.join(str(tmp_path), "grpo", name) in out, out
    assert first["steps"] == 2 and first["before"] is not None
    assert set(first["after"]) >= {"reward/total", "reward/format", "reward/emotion", "reward/rubric/empathy"}
    workdir = os.path.join(tmp_path, "grpo")
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    expected = {
        "reward/total", "reward/format", "reward/emotion", "reward/rubric", "reward/std",
        "reward/zero_std_groups", "kl", "clip_ratio/low", "clip_ratio/high", "entropy", "loss", "grad_norm",
        "completion/length", "completion/truncated", "tokens_per_second", "learning_rate",
        "time/sample", "time/reference", "time/judge", "time/update", "time/step",
    } | {f"reward/rubric/{c}" for c in ("relevance", "empathy", "persona_consistency", "safety", "fluency")}
    assert expected <= set(rows[0])
    assert os.path.exists(os.path.join(workdir, "rewards.png"))


def test_a_run_stopped_by_sigterm_saves_and_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGTERM during a run: it saves a checkpoint at the next step boundary and returns; the rerun resumes
    there (same next batch, same RNG) and ends with the parameters and optimizer state of a run that was
    never interrupted, bit for bit."""
    steps = 4
    train.run(tiny_config(tmp_path / "whole", max_steps=steps, print_samples_every=0))
    interrupted = tiny_config(tmp_path / "cut", max_steps=steps, print_samples_every=0)
    metrics_file = tmp_path / "cut" / "grpo" / "metrics.jsonl"

    def send_sigterm_after_the_first_step():
        deadline = time.monotonic() + 600
        while not metrics_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_sigterm_after_the_first_step, daemon=True).start()
    stopped = train.run(interrupted)
    assert stopped["after"] is None and 1 <= stopped["steps"] < steps, stopped
    cut_dir = str(tmp_path / "cut" / "grpo")
    assert checkpoints.Checkpointer(cut_dir).latest_step() == stopped["steps"]
    resumed = train.run(interrupted)
    assert resumed["before"] is None and resumed["steps"] == steps
    rows = read_jsonl(metrics_file)
    assert sorted({r["step"] for r in rows}) == list(range(1, steps + 1))
    for item in ("params", "opt_state"):
        assert_same_bits(checkpoint_item(cut_dir, steps, item), checkpoint_item(str(tmp_path / "whole" / "grpo"),
                                                                               steps, item))


def test_rubric_weight_zero_runs_without_a_judge(tmp_path, monkeypatch):
    """grpo.reward_weights.rubric=0: no judge is loaded or read, and nothing is logged as reward/rubric."""
    def no_judge(*args, **kwargs):
        raise AssertionError("load_judge was called with rubric weight 0")

    monkeypatch.setattr(train, "load_judge", no_judge)
    config = tiny_config(tmp_path, max_steps=1)
    config.grpo.reward_weights.rubric = 0.0
    config.judge.from_policy = False  # no judge configured at all: none is needed
    result = train.run(config)
    rows = [json.loads(line) for line in open(os.path.join(tmp_path, "grpo", "metrics.jsonl"))]
    for logged in (rows[0], result["before"], result["after"]):
        rewards = {k for k in logged if k.startswith("reward/")}
        assert {"reward/total", "reward/format", "reward/emotion"} <= rewards
        assert not any(k.startswith("reward/rubric") for k in rewards), rewards
    np.testing.assert_allclose(rows[0]["reward/total"], (rows[0]["reward/format"] + rows[0]["reward/emotion"]) / 3,
                               rtol=1e-5, atol=1e-7)  # float32 means of per-sample sums
    assert os.path.exists(os.path.join(tmp_path, "grpo", "rewards.png"))


def test_mu_updates_per_step_follow_one_schedule_and_a_nonfinite_run_stops(tmp_path):
    """num_iterations = 2: the schedule spans steps x 2 updates (warm-up too), the logged learning rate is the
    one the step's last update used, and the checkpointed count is steps x 2. Then, resumed with an infinite
    learning rate (finite loss and gradients, non-finite updates), every update is skipped and counted, the
    checkpoints keep the last finite parameters, and the run stops with the error at the limit."""
    lr, grpo_dir = 1e-3, os.path.join(tmp_path, "grpo")
    train.run(tiny_config(tmp_path, max_steps=3, num_iterations=2, warmup_steps=1, learning_rate=lr,
                          print_samples_every=0))
    rows = read_jsonl(os.path.join(grpo_dir, "metrics.jsonl"))
    # 6 updates, 2 of warm-up: the last updates of the steps are updates 1, 3, 5 (0-based).
    cosine = lambda u: 0.5 * (1 + math.cos(math.pi * (u - 2) / 4))
    np.testing.assert_allclose([r["learning_rate"] for r in rows], [lr * 0.5, lr * cosine(3), lr * cosine(5)],
                               rtol=1e-6, atol=1e-12)
    assert [r["train/nonfinite_updates"] for r in rows] == [0, 0, 0]
    state = checkpoint_item(grpo_dir, 3, "opt_state")
    assert int(state["inner"][1][2]["count"]) == 6 == int(state["inner"][1][0]["count"])  # schedule, Adam

    with pytest.raises(FloatingPointError, match=r"4 updates in a row were not finite, the last at step 5 "
                                                 r"\(grpo.max_consecutive_nonfinite=3\): the loss .* finite but the "
                                                 r"optimizer's update is not"):
        train.run(tiny_config(tmp_path, max_steps=6, num_iterations=2, learning_rate=math.inf,
                              max_consecutive_nonfinite=3, print_samples_every=0))
    rows = read_jsonl(os.path.join(grpo_dir, "metrics.jsonl"))
    assert [(r["step"], r["train/consecutive_nonfinite"]) for r in rows[3:]] == [(4, 2), (5, 4)]
    with checkpoints.Checkpointer(grpo_dir) as ckpt:
        assert ckpt.all_steps() == [2, 3, 4]  # step 5 raised before saving; max_to_keep = 3
    skipped, finite = checkpoint_item(grpo_dir, 4, "opt_state"), state
    assert (int(skipped["consecutive"]), int(skipped["total"])) == (2, 2)
    assert_same_bits(skipped["inner"], finite["inner"])
    params = [checkpoint_item(grpo_dir, step, "params") for step in (3, 4)]
    assert_same_bits(params[1], params[0])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params[1]))
