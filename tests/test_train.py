"""The GRPO trainer: accumulation equals one big batch, and a short run logs, checkpoints and resumes."""

import json
import math
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers_float import assert_trees_close
from helpers_training import assert_same_bits, checkpoint_item
from kardia_jax.models import loading
from kardia_jax import checkpoints, train, training
from kardia_jax.config import base_config
from kardia_jax.metrics import read_jsonl
from kardia_jax.models import Decoder, chunked_logprobs, positions_from_mask, preset
from kardia_jax.models.tokenizer import load_tokenizer, tokenizer_path


def tiny_config(workdir, **grpo):
    c = base_config()
    c.workdir = str(workdir)
    c.model.preset = "tiny-qwen2"
    # All 8 fake devices: the run is sharded like a pod's (batch over data x fsdp, heads over tensor).
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    c.data.max_length = 256
    c.grpo.subset = "all"
    c.grpo.prompts_per_step = 4
    c.grpo.num_samples = 4
    c.grpo.max_new_tokens = 8
    c.grpo.learning_rate = 1e-3
    c.grpo.save_every = 1
    c.grpo.print_samples_every = 1
    c.judge.from_policy = True
    c.judge.max_context_tokens = 32
    c.judge.max_response_tokens = 8
    for key, value in grpo.items():
        setattr(c.grpo, key, value)
    return c


def random_rollout(b, g, p, t, vocab, seed=0):
    """B prompts (left-padded, of different lengths) with G completions each (right-padded)."""
    rng = np.random.default_rng(seed)
    n = b * g
    completion_mask = (np.arange(t)[None] < rng.integers(2, t + 1, n)[:, None]).astype(np.int32)
    prompt_mask = (np.arange(p)[None] >= rng.integers(0, p - 1, b)[:, None]).astype(np.int32)
    return train.Rollout(
        prompt=jnp.asarray(rng.integers(1, vocab, (b, p)) * prompt_mask, jnp.int32),
        prompt_mask=jnp.asarray(prompt_mask),
        completion=jnp.asarray(rng.integers(1, vocab, (n, t)), jnp.int32),
        completion_mask=jnp.asarray(completion_mask),
        truncated=jnp.asarray(completion_mask.sum(1) == t),
        old_logp=jnp.asarray(rng.normal(-3, 0.1, (n, t)), jnp.float32),
        ref_logp=jnp.asarray(rng.normal(-3, 0.1, (n, t)), jnp.float32),
        advantages=jnp.asarray(rng.normal(size=n), jnp.float32),
    )


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "dr_grpo"])
def test_minibatch_accumulation_equals_one_batch(tmp_path, aggregation):
    """With SGD(lr=1) the parameter change is minus the gradient: k minibatches == the whole batch."""
    tokenizer = load_tokenizer(tokenizer_path())
    model = Decoder(preset("tiny-qwen2"), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    rollout = random_rollout(4, 2, 5, 6, 512)
    changed = []
    for k in (1, 4):
        config = tiny_config(tmp_path, num_minibatches=k, loss_aggregation=aggregation)
        steps = train.Steps(graphdef, params, None, tokenizer, config, training.skip_nonfinite(optax.sgd(1.0)))
        fresh = jax.tree.map(jnp.copy, params)
        new, _, stats = steps.update(fresh, steps.optimizer.init(fresh), rollout)
        changed.append((jax.tree.map(lambda a, b: np.asarray(a - b), new, params), stats))
    (delta_1, stats_1), (delta_k, stats_k) = changed
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), delta_1, delta_k)
    for key in ("loss", "kl", "entropy", "clip_ratio/region"):
        np.testing.assert_allclose(float(stats_1[key]), float(stats_k[key]), rtol=1e-5, atol=1e-7)
    assert float(stats_1["grad_norm"]) > 0


def test_update_gradient_equals_autodiff_of_the_written_out_loss(tmp_path):
    """The update's fused lm-head gradient (chunks of 4 positions, T = 6: one padded chunk) equals jax.grad of
    grpo_loss over the teacher-forced logprobs (SGD(lr=1): the parameter change is minus the gradient)."""
    from kardia_jax.grpo import grpo_loss

    tokenizer = load_tokenizer(tokenizer_path())
    model = Decoder(preset("tiny-qwen2"), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    rollout = random_rollout(4, 2, 5, 6, 512)
    config = tiny_config(tmp_path, logits_chunk_size=4, temperature=0.8)
    steps = train.Steps(graphdef, params, None, tokenizer, config, training.skip_nonfinite(optax.sgd(1.0)))
    new, _, stats = steps.update(jax.tree.map(jnp.copy, params), steps.optimizer.init(params), rollout)

    def loss(params):
        model = nnx.merge(graphdef, params)
        logp, entropy = chunked_logprobs(train.completion_hidden(model, *rollout[:4]), model.unembed_matrix(),
                                         rollout.completion, temperature=0.8, with_entropy=True)
        value, _ = grpo_loss(logp, rollout.old_logp, rollout.ref_logp, rollout.advantages, rollout.completion_mask,
                             steps.loss_config, rollout.truncated)
        return value, jnp.sum(entropy * rollout.completion_mask) / rollout.completion_mask.sum()

    (value, entropy), grads = jax.value_and_grad(loss, has_aux=True)(params)
    np.testing.assert_allclose(float(stats["loss"]), float(value), rtol=1e-5)
    np.testing.assert_allclose(float(stats["entropy"]), float(entropy), rtol=1e-5)
    assert_trees_close(jax.tree.map(lambda a, b: b - a, new, params), grads)  # float32 accumulation error


def test_completion_logprobs_read_each_prompt_once_and_equal_full_sequences():
    """The shared-prompt forward (and its gradient) against a plain forward over N = B·G full sequences
    (each prompt repeated G times, left-padded prompts, right-padded completions), within float32
    accumulation error."""
    model = Decoder(preset("tiny-qwen3"), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    b, g = 3, 4
    r = random_rollout(b, g, 7, 6, model.config.vocab_size, seed=1)

    def shared(params):
        return train.completion_logprobs(nnx.merge(graphdef, params), r.prompt, r.prompt_mask, r.completion,
                                         r.completion_mask, 0.7)

    def full(params):
        m = nnx.merge(graphdef, params)
        tokens = jnp.concatenate([jnp.repeat(r.prompt, g, 0), r.completion], 1)
        mask = jnp.concatenate([jnp.repeat(r.prompt_mask, g, 0), r.completion_mask], 1)
        logits, _ = m(tokens, positions_from_mask(mask), mask)
        logp = jax.nn.log_softmax(logits[:, r.prompt.shape[1] - 1 : -1] / 0.7, axis=-1)
        return jnp.take_along_axis(logp, r.completion[..., None], -1)[..., 0]

    valid = np.asarray(r.completion_mask) > 0
    # float32 accumulation error: the prompt's sums once per group against once per sequence.
    np.testing.assert_allclose(np.asarray(shared(params))[valid], np.asarray(full(params))[valid], rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda params: jnp.sum(f(params) * r.completion_mask * r.advantages[:, None])
    grads = [jax.grad(loss(f))(params) for f in (shared, full)]
    # The tied embedding's gradient (|max| ~16) sums the G copies of each prompt in another order: its entries
    # that cancel to ~0.2 are off by up to 1.2e-5 on some CPUs (6.5e-5 relative).
    assert_trees_close(*grads)


def test_optimizer_state_is_sharded_like_the_params():
    """Adam's moments follow the params' shardings (a plain jit of optimizer.init puts them on one device)."""
    from kardia_jax import sharding

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh):
        model = loading.init_model(preset("tiny-qwen2"), mesh, sharding.DEFAULT_RULES)
    params = nnx.split(model)[1]
    optimizer = training.make_optimizer(1e-3, 2, 10, 0.1, 1.0)
    state = training.init_optimizer(optimizer, params)
    adam = state.inner[1][0]
    for moments in (adam.mu, adam.nu):
        jax.tree.map(lambda m, p: assert_same_sharding(m.sharding, p.sharding, m.ndim), moments, params)
    for count in (adam.count, state.consecutive, state.total):
        assert count.sharding.is_fully_replicated and len(count.sharding.device_set) == 8
    assert params["layers"]["q"].get_value().sharding.spec != jax.sharding.PartitionSpec()  # the check is not vacuous


def assert_same_sharding(a, b, ndim):
    assert a.is_equivalent_to(b, ndim), (a, b)


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


def test_steps_score_without_a_judge_only_when_the_rubric_is_off(tmp_path):
    """Steps built with judge=None: with rubric weight 0 the step scores format and emotion alone; with a
    weighted rubric it says what is missing (not an AttributeError deep in tracing)."""
    tokenizer = load_tokenizer(tokenizer_path())
    graphdef, params = nnx.split(Decoder(preset("tiny-qwen2"), rngs=nnx.Rngs(0)))
    r = random_rollout(4, 2, 5, 6, 512)
    emotion = jnp.zeros(8, jnp.int32)
    config = tiny_config(tmp_path)
    config.grpo.num_samples = 2
    config.grpo.reward_weights.rubric = 0.0
    steps = train.Steps(graphdef, params, None, tokenizer, config, optax.sgd(1.0))
    advantages, stats = steps.score(None, r.completion, r.completion_mask, emotion, None)
    assert advantages.shape == (8,)
    assert {k for k in stats if k.startswith("reward/")} == {
        "reward/total", "reward/format", "reward/emotion", "reward/std", "reward/zero_std_groups"}

    config.grpo.reward_weights.rubric = 0.5
    steps = train.Steps(graphdef, params, None, tokenizer, config, optax.sgd(1.0))
    with pytest.raises(ValueError, match=r"grpo.reward_weights.rubric=0.5 needs a judge"):
        steps.score(None, r.completion, r.completion_mask, emotion, None)


def test_an_update_with_an_infinite_advantage_is_skipped(tmp_path):
    """An Inf in one advantage makes the loss and gradients non-finite: the update leaves the parameters and
    AdamW's state bit-identical and is counted; the next finite update is applied."""
    tokenizer = load_tokenizer(tokenizer_path())
    graphdef, params = nnx.split(Decoder(preset("tiny-qwen2"), rngs=nnx.Rngs(0)))
    steps = train.Steps(graphdef, params, None, tokenizer, tiny_config(tmp_path),
                        training.make_optimizer(1e-3, 0, 10, weight_decay=0.1, grad_clip=1.0))
    rollout = random_rollout(4, 2, 5, 6, 512)
    params, opt_state, _ = steps.update(params, steps.optimizer.init(params), rollout)  # moments are not zero
    before = jax.device_get((params, opt_state.inner))  # the update donates its inputs
    poisoned = rollout._replace(advantages=rollout.advantages.at[3].set(jnp.inf))
    params, opt_state, stats = steps.update(params, opt_state, poisoned)
    assert not np.isfinite(stats["loss"])
    assert_same_bits((params, opt_state.inner), before)
    progress = training.optimizer_progress(opt_state)
    assert (progress.updates, progress.nonfinite, progress.consecutive_nonfinite) == (1, 1, 1)
    params, opt_state, _ = steps.update(params, opt_state, rollout)
    progress = training.optimizer_progress(opt_state)
    assert (progress.updates, progress.nonfinite, progress.consecutive_nonfinite) == (2, 1, 0)
    assert any(np.any(np.asarray(a) != b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before[0])))


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
