"""The jitted phases of a GRPO step (`kardia_jax.grpo.steps`): minibatch accumulation equals one big batch,
the fused gradient equals autodiff, the shared-prompt forward equals full sequences, scoring without a
judge, and a non-finite update is skipped."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers_float import assert_trees_close
from helpers_training import assert_same_bits, grpo_config
from kardia_jax import optim, scaffold
from kardia_jax.grpo import steps as grpo_steps
from kardia_jax.grpo.loss import GRPOConfig, grpo_loss
from kardia_jax.models import Decoder, chunked_logprobs, positions_from_mask, preset
from kardia_jax.models.tokenizer import load_tokenizer, tokenizer_path
from kardia_jax.sampling import SamplingConfig

tiny_config = grpo_config


def random_rollout(b, g, p, t, vocab, seed=0):
    """B prompts (left-padded, of different lengths) with G completions each (right-padded)."""
    rng = np.random.default_rng(seed)
    n = b * g
    completion_mask = (np.arange(t)[None] < rng.integers(2, t + 1, n)[:, None]).astype(np.int32)
    prompt_mask = (np.arange(p)[None] >= rng.integers(0, p - 1, b)[:, None]).astype(np.int32)
    return grpo_steps.Rollout(
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
    graphdef, params = scaffold.split_params(model)
    rollout = random_rollout(4, 2, 5, 6, 512)
    changed = []
    for k in (1, 4):
        config = tiny_config(tmp_path, num_minibatches=k, loss_aggregation=aggregation)
        steps = grpo_steps.Steps(graphdef, params, None, tokenizer, config, optim.skip_nonfinite(optax.sgd(1.0)))
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
    tokenizer = load_tokenizer(tokenizer_path())
    model = Decoder(preset("tiny-qwen2"), rngs=nnx.Rngs(0))
    graphdef, params = scaffold.split_params(model)
    rollout = random_rollout(4, 2, 5, 6, 512)
    config = tiny_config(tmp_path, logits_chunk_size=4, temperature=0.8)
    steps = grpo_steps.Steps(graphdef, params, None, tokenizer, config, optim.skip_nonfinite(optax.sgd(1.0)))
    new, _, stats = steps.update(jax.tree.map(jnp.copy, params), steps.optimizer.init(params), rollout)

    def loss(params):
        model = nnx.merge(graphdef, params)
        logp, entropy = chunked_logprobs(grpo_steps.completion_hidden(model, *rollout[:4]), model.unembed_matrix(),
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
    graphdef, params = scaffold.split_params(model)
    b, g = 3, 4
    r = random_rollout(b, g, 7, 6, model.config.vocab_size, seed=1)

    def shared(params):
        return grpo_steps.completion_logprobs(nnx.merge(graphdef, params), r.prompt, r.prompt_mask, r.completion,
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


def test_logprobs_in_minibatches_keep_the_row_order(tmp_path):
    """The teacher-forced logprobs computed in k round-robin minibatches come back in the batch's row order."""
    tokenizer = load_tokenizer(tokenizer_path())
    graphdef, params = scaffold.split_params(Decoder(preset("tiny-qwen2"), rngs=nnx.Rngs(0)))
    r = random_rollout(4, 2, 5, 6, 512)
    logp = [grpo_steps.Steps(graphdef, params, None, tokenizer, tiny_config(tmp_path, num_minibatches=k),
                             optax.sgd(1.0)).logprobs(params, *r[:4]) for k in (1, 2, 4)]
    valid = np.asarray(r.completion_mask) > 0
    for other in logp[1:]:
        np.testing.assert_allclose(np.asarray(other)[valid], np.asarray(logp[0])[valid], rtol=1e-5, atol=1e-6)


def test_loss_and_sampling_configs_come_from_the_grpo_section(tmp_path):
    config = tiny_config(tmp_path, epsilon_high=0.28, beta=0.0, top_k=5, temperature=0.7)
    tokenizer = load_tokenizer(tokenizer_path())
    assert GRPOConfig.from_config(config.grpo) == GRPOConfig(
        epsilon_low=0.2, epsilon_high=0.28, beta=0.0, kl_estimator="k3", loss_aggregation="token_mean",
        scale_rewards="group", mask_truncated_completions=False)
    sampling = SamplingConfig.from_config(config.grpo, tokenizer)
    assert (sampling.num_samples, sampling.max_new_tokens, sampling.temperature, sampling.top_k, sampling.top_p) == (
        4, 8, 0.7, 5, 1.0)
    assert sampling.stop_ids == tuple(tokenizer.stop_ids) and sampling.pad_id == tokenizer.pad_id


def test_steps_score_without_a_judge_only_when_the_rubric_is_off(tmp_path):
    """Steps built with judge=None: with rubric weight 0 the step scores format and emotion alone; with a
    weighted rubric it says what is missing (not an AttributeError deep in tracing)."""
    tokenizer = load_tokenizer(tokenizer_path())
    graphdef, params = scaffold.split_params(Decoder(preset("tiny-qwen2"), rngs=nnx.Rngs(0)))
    r = random_rollout(4, 2, 5, 6, 512)
    emotion = jnp.zeros(8, jnp.int32)
    config = tiny_config(tmp_path)
    config.grpo.num_samples = 2
    config.grpo.reward_weights.rubric = 0.0
    steps = grpo_steps.Steps(graphdef, params, None, tokenizer, config, optax.sgd(1.0))
    advantages, stats = steps.score(None, r.completion, r.completion_mask, emotion, None)
    assert advantages.shape == (8,)
    assert {k for k in stats if k.startswith("reward/")} == {
        "reward/total", "reward/format", "reward/emotion", "reward/std", "reward/zero_std_groups"}

    config.grpo.reward_weights.rubric = 0.5
    steps = grpo_steps.Steps(graphdef, params, None, tokenizer, config, optax.sgd(1.0))
    with pytest.raises(ValueError, match=r"grpo.reward_weights.rubric=0.5 needs a judge"):
        steps.score(None, r.completion, r.completion_mask, emotion, None)


def test_an_update_with_an_infinite_advantage_is_skipped(tmp_path):
    """An Inf in one advantage makes the loss and gradients non-finite: the update leaves the parameters and
    AdamW's state bit-identical and is counted; the next finite update is applied."""
    tokenizer = load_tokenizer(tokenizer_path())
    graphdef, params = scaffold.split_params(Decoder(preset("tiny-qwen2"), rngs=nnx.Rngs(0)))
    steps = grpo_steps.Steps(graphdef, params, None, tokenizer, tiny_config(tmp_path),
                        optim.make_optimizer(1e-3, 0, 10, weight_decay=0.1, grad_clip=1.0))
    rollout = random_rollout(4, 2, 5, 6, 512)
    params, opt_state, _ = steps.update(params, steps.optimizer.init(params), rollout)  # moments are not zero
    before = jax.device_get((params, opt_state.inner))  # the update donates its inputs
    poisoned = rollout._replace(advantages=rollout.advantages.at[3].set(jnp.inf))
    params, opt_state, stats = steps.update(params, opt_state, poisoned)
    assert not np.isfinite(stats["loss"])
    assert_same_bits((params, opt_state.inner), before)
    progress = optim.optimizer_progress(opt_state)
    assert (progress.updates, progress.nonfinite, progress.consecutive_nonfinite) == (1, 1, 1)
    params, opt_state, _ = steps.update(params, opt_state, rollout)
    progress = optim.optimizer_progress(opt_state)
    assert (progress.updates, progress.nonfinite, progress.consecutive_nonfinite) == (2, 1, 0)
    assert any(np.any(np.asarray(a) != b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before[0])))


