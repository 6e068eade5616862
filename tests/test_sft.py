"""SFT: the masked loss against a NumPy transcription, gradient accumulation against one big batch,
the shared trainer pieces (optimizer, batches, policy loading), and whole runs: interrupted and
resumed, outputs written and loadable."""

import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers_float import assert_trees_close
from helpers_training import assert_same_bits, checkpoint_item, tiny_config
from kardia_jax.models import loading
from kardia_jax import checkpoints, optim, scaffold, sft, sharding
from kardia_jax.data.pipeline import BatchConfig, load_samples, sft_pipeline
from kardia_jax.data.sources import sample_path
from kardia_jax.metrics import read_jsonl
from kardia_jax.models import Decoder, from_pretrained, preset, save_pretrained
from kardia_jax.models.tokenizer import load_tokenizer, tokenizer_path

MAX_LENGTH = 192


# A tiny, fast SFT run on the shipped sample: 6 steps of 16 sequences in 2 microbatches.
SFT = {"subset": "all", "learning_rate": 3e-3, "global_batch_size": 16, "grad_accum_steps": 2, "num_epochs": 1,
       "max_steps": 6, "save_every": 3, "log_every": 1, "eval_max_samples": 2, "eval_max_new_tokens": 4,
       "eval_batch_size": 2}


def _config(workdir="unused"):
    return tiny_config(workdir, data={"max_length": MAX_LENGTH}, sft=SFT)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tokenizer_path())


@pytest.fixture(scope="module")
def samples():
    return load_samples(sample_path(), "train")[0]


def _batch(samples, tokenizer, size, seed=0):
    pipeline = sft_pipeline(samples, tokenizer, BatchConfig(global_batch_size=size, max_length=MAX_LENGTH, seed=seed),
                            subset="all")
    return next(iter(pipeline)), pipeline


@pytest.fixture(scope="module")
def tiny():
    """tiny-qwen2 on the 8-device test mesh (data 1, fsdp 8)."""
    config = _config()
    mesh = sharding.mesh_from_config(config.mesh)
    with jax.set_mesh(mesh):
        model, _ = loading.load_policy(config, mesh)
    return config, mesh, model


# -- the loss ------------------------------------------------------------------------------------


def test_loss_mask_covers_exactly_the_assistant_turn(samples, tokenizer):
    batch, pipeline = _batch(samples, tokenizer, 4)
    targets = {s.target for s in samples}
    for row in range(4):
        n = batch["input_mask"][row].sum()
        masked = batch["tokens"][row][batch["loss_mask"][row] == 1]
        assert tokenizer.decode(masked[:-1]) in targets and masked[-1] == tokenizer.eos_id
        first = np.argmax(batch["loss_mask"][row])
        # Everything before the target is the prompt (ending with the assistant header); nothing after it.
        assert tokenizer.decode(batch["tokens"][row][:first]).endswith("<|im_start|>assistant\n")
        assert batch["loss_mask"][row][first:n].all() and not batch["loss_mask"][row][n:].any()


def _numpy_masked_ce(model, batch):
    """Direct transcription: mean over t >= 1 with loss_mask[b, t] = 1 of -log softmax(logits[b, t-1])[tokens[b, t]]."""
    logits, _ = model(jnp.asarray(batch["tokens"]), jnp.asarray(batch["positions"]), jnp.asarray(batch["input_mask"]))
    logits = np.asarray(logits, np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    total, count = 0.0, 0
    b, t = batch["tokens"].shape
    for i in range(b):
        for j in range(1, t):
            if batch["loss_mask"][i, j]:
                total -= logp[i, j - 1, batch["tokens"][i, j]]
                count += 1
    return total / count, count


def test_loss_equals_numpy_masked_cross_entropy(tiny, samples, tokenizer):
    _, _, model = tiny
    batch, _ = _batch(samples, tokenizer, 4)
    expected, count = _numpy_masked_ce(model, batch)
    device_batch = jax.tree.map(jnp.asarray, batch)
    for chunk in (16, 256):  # several chunks of the vocabulary projection, and one
        np.testing.assert_allclose(float(sft.sft_loss(model, device_batch, chunk)), expected, rtol=1e-5)
    nll, tokens = sft.masked_nll(model, device_batch)
    assert int(tokens) == count == batch["loss_mask"][:, 1:].sum()

    # The fused loss's gradient equals autodiff through the whole log-softmax.
    graphdef, params = nnx.split(model)

    def direct(params):
        logits, _ = nnx.merge(graphdef, params)(device_batch["tokens"], device_batch["positions"], device_batch["input_mask"])
        targets, weights = sft.shifted_targets(device_batch)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
        return -jnp.sum(logp * weights) / jnp.sum(weights)

    want = jax.grad(direct)(params)
    for chunk in (16, 256):
        got = jax.grad(lambda p: sft.sft_loss(nnx.merge(graphdef, p), device_batch, chunk))(params)
        assert_trees_close(got, want)  # float32 accumulation error (observed <= 8e-8 at |grad| <= 0.09)


def test_grad_accumulation_equals_one_big_batch(tiny, samples, tokenizer):
    _, mesh, model = tiny
    graphdef, params = scaffold.split_params(model)
    host, _ = _batch(samples, tokenizer, 16, seed=3)
    with jax.set_mesh(mesh):
        batch = scaffold.shard_batch(host, mesh)
        grads = {}
        for k in (1, 4):
            fn = jax.jit(lambda p, b, k=k: sft.accumulated_grads(graphdef, p, b, k, rules=model.rules))
            grads[k], loss, _ = fn(params, batch)
            np.testing.assert_allclose(float(loss), float(sft.sft_loss(model, batch)), rtol=1e-5)
    assert_trees_close(grads[4], grads[1])  # float32 accumulation error: 4 partial sums vs 1

    # The microbatches hold different numbers of target tokens, so averaging per-microbatch means (what
    # optax.MultiSteps does) would weight their tokens unequally: normalizing by the global count matters.
    assert len({int(host["loss_mask"][a::4, 1:].sum()) for a in range(4)}) > 1


def _train_step(model):
    """A copy of `model`'s params (the step donates its inputs), a fresh AdamW state and the jitted SFT step."""
    graphdef, params = scaffold.split_params(model)
    params = jax.tree.map(jnp.copy, params)
    optimizer = optim.make_optimizer(3e-3, 0, 20, 0.0, 1.0)
    opt_state = optim.init_optimizer(optimizer, params)
    step = sft.make_train_step(graphdef, optimizer, num_microbatches=2,
                               param_shardings=jax.tree.map(lambda x: x.sharding, params),
                               opt_shardings=jax.tree.map(lambda x: x.sharding, opt_state), rules=model.rules)
    return params, opt_state, step


def test_a_few_steps_lower_the_loss(tiny, samples, tokenizer):
    _, mesh, model = tiny
    with jax.set_mesh(mesh):
        params, opt_state, step = _train_step(model)
        batch = scaffold.shard_batch(_batch(samples, tokenizer, 16)[0], mesh)
        losses = []
        for _ in range(5):
            params, opt_state, stats = step(params, opt_state, batch)
            losses.append(float(stats["loss"]))
    assert losses[-1] < losses[0] - 0.5, losses
    assert stats["grad_norm"] > 0 and stats["target_tokens"] == _batch(samples, tokenizer, 16)[0]["loss_mask"][:, 1:].sum()


def test_a_step_with_an_infinite_loss_weight_is_skipped(tiny, samples, tokenizer):
    """An Inf among a batch's loss weights (NaN loss, non-finite gradients): the parameters and AdamW's state
    keep their bits and the step is counted; the next finite step is applied."""
    _, mesh, model = tiny
    host = _batch(samples, tokenizer, 16)[0]
    clean = dict(host, loss_mask=host["loss_mask"].astype(np.float32))  # float weights, to hold an Inf
    poisoned = dict(clean, loss_mask=clean["loss_mask"].copy())
    poisoned["loss_mask"][3, np.argmax(host["loss_mask"][3])] = np.inf
    with jax.set_mesh(mesh):
        params, opt_state, step = _train_step(model)
        params, opt_state, _ = step(params, opt_state, scaffold.shard_batch(clean, mesh))  # moments are not zero
        before = jax.device_get((params, opt_state.inner))
        params, opt_state, stats = step(params, opt_state, scaffold.shard_batch(poisoned, mesh))
        assert not np.isfinite(float(stats["loss"]))
        assert_same_bits((params, opt_state.inner), before)
        progress = optim.optimizer_progress(opt_state)
        assert (progress.updates, progress.nonfinite, progress.consecutive_nonfinite) == (1, 1, 1)
        params, opt_state, _ = step(params, opt_state, scaffold.shard_batch(clean, mesh))
    progress = optim.optimizer_progress(opt_state)
    assert (progress.updates, progress.nonfinite, progress.consecutive_nonfinite) == (2, 1, 0)
    assert any(np.any(np.asarray(a) != b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before[0])))


# -- shared trainer pieces -----------------------------------------------------------------------


def test_schedule_and_weight_decay():
    lrs = [optim.learning_rate_at(1.0, 2, 10, s) for s in range(11)]
    assert lrs[:3] == [0.0, 0.5, 1.0] and all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[10] == 0.0
    params = {"embed": jnp.ones((3, 2)), "final_norm": jnp.ones(2), "layers": {"q": jnp.ones((1, 2, 2)),
              "q_bias": jnp.ones((1, 2)), "attn_norm": jnp.ones((1, 2))}}
    optimizer = optim.make_optimizer(0.1, 0, 10, weight_decay=0.5, grad_clip=1.0)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zero, optimizer.init(params), params)
    moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
    assert moved == {"embed": True, "final_norm": False, "layers": {"q": True, "q_bias": False, "attn_norm": False}}


def test_schedule_without_warmup_is_the_cosine_and_logs_nothing(caplog):
    # optax's warm-up schedule with 0 warm-up steps logs "non-positive transition_steps" each time it is
    # built (train.py builds one per logged step); the schedule without warm-up has the same values.
    with caplog.at_level(logging.INFO):
        lrs = [optim.learning_rate_at(1.0, 0, 10, s) for s in range(11)]
    assert not [r for r in caplog.records if "transition_steps" in r.getMessage()]
    reference = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=0, decay_steps=10)
    np.testing.assert_allclose(lrs, [float(reference(s)) for s in range(11)], rtol=1e-6, atol=1e-7)
    assert lrs[0] == 1.0 and lrs[10] == 0.0


def test_shard_batch(tiny):
    _, mesh, _ = tiny
    batch = scaffold.shard_batch({"tokens": np.zeros((8, 5), np.int32), "ids": np.arange(8)}, mesh)
    assert batch["tokens"].shape == (8, 5) and batch["tokens"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    assert len(batch["ids"].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(batch["ids"]), np.arange(8))
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        scaffold.shard_batch({"tokens": np.zeros((6, 5))}, mesh)


def test_load_policy_rejects_a_foreign_tokenizer(tmp_path, tiny):
    _, mesh, _ = tiny
    small = Decoder(preset("tiny-qwen2", vocab_size=1024), rngs=nnx.Rngs(0))
    save_pretrained(small, str(tmp_path))
    config = _config()
    config.model.preset, config.model.hf_path = "", str(tmp_path)
    shipped = load_tokenizer(tokenizer_path()).vocab_size
    with pytest.raises(ValueError, match=f"1024 ids but the tokenizer .* already has {shipped} "):
        loading.load_policy(config, mesh)
    config.model.preset = "tiny-qwen2"
    with pytest.raises(ValueError, match="exactly one of model.preset"):
        loading.load_policy(config, mesh)


# -- whole runs ----------------------------------------------------------------------------------


def _abstract_params():
    """Restore target for a tiny-qwen2 checkpoint, on one device."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    model = nnx.eval_shape(lambda: Decoder(preset("tiny-qwen2"), rngs=nnx.Rngs(0)))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        nnx.to_pure_dict(nnx.state(model)))


def _restore(workdir, step, data_iterator=None):
    with checkpoints.Checkpointer(os.path.join(workdir, "sft"), async_save=False) as ckpt:
        return ckpt.restore(step, _abstract_params(), data_iterator=data_iterator)


def _checkpoint_params(workdir, step):
    return _restore(workdir, step).params


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    return workdir, sft.run(_config(workdir))


def test_run_writes_checkpoints_metrics_and_a_loadable_hf_model(reference_run, tokenizer):
    workdir, result = reference_run
    assert result["steps"] == 6 and result["start_step"] == 0
    for key in ("format_valid_rate", "emotion_accuracy"):
        assert 0 <= result[f"{key}_before"] <= 1 and 0 <= result[f"{key}_after"] <= 1
    rows = read_jsonl(os.path.join(workdir, "sft", "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "grad_norm", "learning_rate", "tokens_per_second"} <= set(rows[0])
    assert rows[-1]["loss"] < rows[0]["loss"]
    with checkpoints.Checkpointer(os.path.join(workdir, "sft")) as ckpt:
        assert ckpt.all_steps() == [3, 6]
    assert json.load(open(os.path.join(workdir, "sft", "results.json")))["steps"] == 6
    assert open(os.path.join(workdir, "sft", "loss.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    hf = os.path.join(workdir, "sft", "hf")
    model = from_pretrained(hf)
    final = _checkpoint_params(workdir, 6)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model))),
                 jax.tree.map(np.asarray, final))
    assert load_tokenizer(hf).encode("<|emotion_begin|>sad") == tokenizer.encode("<|emotion_begin|>sad")


def test_finished_run_is_not_repeated(reference_run, capsys):
    workdir, result = reference_run
    again = sft.run(_config(workdir))
    assert again == json.loads(json.dumps(result))
    out = capsys.readouterr().out  # the results, then where the files are
    for name in ("hf", "metrics.jsonl", "tensorboard", "loss.png"):
        assert os.path.join(str(workdir), "sft", name) in out, out
    assert len(read_jsonl(os.path.join(workdir, "sft", "metrics.jsonl"))) == 6  # no new training steps


def test_interrupted_run_resumes_with_the_same_params_and_next_batch(reference_run, tmp_path, tokenizer, samples):
    ref_workdir, ref = reference_run
    config = _config(tmp_path)
    stopped = sft.run(config, stop_after=3)
    assert stopped["stopped_at"] == 3 and "after" not in stopped

    # The saved iterator position gives the batch an uninterrupted run would take next.
    with checkpoints.Checkpointer(os.path.join(tmp_path, "sft")) as ckpt:
        assert ckpt.all_steps() == [3]
    pipeline = sft_pipeline(samples, tokenizer, BatchConfig(global_batch_size=16, max_length=MAX_LENGTH, seed=0),
                        subset="all")
    fresh = iter(pipeline)
    for _ in range(3):
        next(fresh)
    resumed_iterator = iter(pipeline)
    _restore(tmp_path, 3, data_iterator=resumed_iterator)  # moves it to the saved position
    jax.tree.map(np.testing.assert_array_equal, next(resumed_iterator), next(fresh))

    resumed = sft.run(config)
    assert resumed["start_step"] == 3 and resumed["steps"] == 6
    assert resumed["before"] == stopped["before"]  # the step-0 evaluation is kept, not redone
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7),
                 _checkpoint_params(tmp_path, 6), _checkpoint_params(ref_workdir, 6))
    assert [r["step"] for r in read_jsonl(os.path.join(tmp_path, "sft", "metrics.jsonl"))] == [1, 2, 3, 4, 5, 6]
    assert resumed["after"] == ref["after"]


def test_saved_tokenizer_encodes_like_the_original(reference_run, tokenizer):
    workdir, _ = reference_run
    saved = load_tokenizer(os.path.join(workdir, "sft", "hf"))
    text = "You support user_4f55c9. Call 1234 <|emotion_begin|>sad<|emotion_end|>"
    assert saved.encode(text) == tokenizer.encode(text)


def test_nonfinite_steps_stop_the_run_and_leave_every_checkpoint_finite(tmp_path):
    """Resumed with an infinite learning rate (finite loss and gradients, non-finite updates), every step is
    skipped and logged; the checkpoints, rotated with max_to_keep = 1, hold the last finite parameters and
    optimizer state bit for bit; sft.max_consecutive_nonfinite = 3 such steps in a row stop the run with the
    error; and a rerun continues the count from the checkpoint: its first step is the third."""
    config, sft_dir = _config(tmp_path), os.path.join(tmp_path, "sft")
    sft.run(config, stop_after=2)
    finite = {item: checkpoint_item(sft_dir, 2, item) for item in ("params", "opt_state")}
    config.sft.learning_rate = math.inf
    config.sft.save_every, config.sft.max_to_keep, config.sft.max_consecutive_nonfinite = 1, 1, 3
    stop = r"3 updates in a row were not finite, the last at step 5 \(sft.max_consecutive_nonfinite=3\)"
    with pytest.raises(FloatingPointError, match=stop):
        sft.run(config)
    rows = read_jsonl(os.path.join(sft_dir, "metrics.jsonl"))
    assert [(r["step"], r["train/consecutive_nonfinite"], r["train/nonfinite_updates"]) for r in rows] == [
        (1, 0, 0), (2, 0, 0), (3, 1, 1), (4, 2, 2), (5, 3, 3)]
    with checkpoints.Checkpointer(sft_dir) as ckpt:
        assert ckpt.all_steps() == [4]  # step 5 raised before saving
    assert_same_bits(checkpoint_item(sft_dir, 4, "params"), finite["params"])
    opt_state = checkpoint_item(sft_dir, 4, "opt_state")
    assert_same_bits(opt_state["inner"], finite["opt_state"]["inner"])
    assert (int(opt_state["consecutive"]), int(opt_state["total"])) == (2, 2)
    with pytest.raises(FloatingPointError, match=stop):
        sft.run(config)  # resumes at step 4 with 2 in a row
