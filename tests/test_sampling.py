"""The sampler against references: transformers greedy generation token for token, teacher-forced
log-probabilities, stop handling, filtering, and sharded == unsharded."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from kardia_jax import models, sharding
from kardia_jax.sampling import SamplingConfig, _draw, filter_logits, generate, make_sampler
from helpers_hf import FAMILIES, left_padded_batch, make_hf_model

PROMPT_LENGTHS = (9, 4, 6)  # different lengths, left-padded to 9
NEW_TOKENS = 10


@pytest.fixture(scope="module", params=FAMILIES)
def family_models(request, tmp_path_factory):
    hf, path = make_hf_model(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, hf, models.from_pretrained(path)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    hf, path = make_hf_model("qwen2", tmp_path_factory.mktemp("qwen2"))
    return hf, path, models.from_pretrained(path)


def _prompts(vocab):
    tokens, mask = left_padded_batch(vocab, PROMPT_LENGTHS, max(PROMPT_LENGTHS), seed=1)
    return jnp.asarray(tokens), jnp.asarray(mask)


def test_greedy_matches_transformers_generate(family_models):
    _, hf, model = family_models
    tokens, mask = _prompts(model.config.vocab_size)
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long),
            attention_mask=torch.as_tensor(np.asarray(mask), dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=0,
            eos_token_id=None,
        ).numpy()[:, tokens.shape[1]:]
    # G = 2: both samples of each prompt read the shared prompt cache and must equal HF's greedy row.
    out = generate(model, tokens, mask, jax.random.key(0), SamplingConfig(num_samples=2, max_new_tokens=NEW_TOKENS, temperature=0.0))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.repeat(ref, 2, axis=0))
    assert np.all(np.asarray(out.mask) == 1) and np.all(np.asarray(out.truncated))


def _teacher_forced_logprobs(model, prompt, prompt_mask, out, temperature, num_samples):
    """log p(completion token t | prompt, completion[:t]) from one plain forward over the whole sequence."""
    prompt = jnp.repeat(prompt, num_samples, axis=0)
    prompt_mask = jnp.repeat(prompt_mask, num_samples, axis=0)
    seq = jnp.concatenate([prompt, out.tokens], axis=1)
    seq_mask = jnp.concatenate([prompt_mask, out.mask], axis=1)
    logits, _ = model(seq, models.positions_from_mask(seq_mask), seq_mask)
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)
    p = prompt.shape[1]
    picked = jnp.take_along_axis(logp[:, p - 1 : -1], out.tokens[..., None], axis=-1)[..., 0]
    return np.asarray(picked * out.mask)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.8)])
def test_logprobs_equal_teacher_forced_forward(qwen2, top_k, top_p):
    _, _, model = qwen2
    tokens, mask = _prompts(model.config.vocab_size)
    config = SamplingConfig(num_samples=3, max_new_tokens=NEW_TOKENS, temperature=0.7, top_k=top_k, top_p=top_p)
    out = generate(model, tokens, mask, jax.random.key(1), config)
    ref = _teacher_forced_logprobs(model, tokens, mask, out, 0.7, 3)
    # float32 accumulation error: one token at a time through the KV cache against one full forward
    # (logprobs down to ~-8; observed <= 4.3e-6).
    np.testing.assert_allclose(np.asarray(out.logprobs), ref, rtol=1e-4, atol=1e-5)


def test_top_k_one_is_greedy(qwen2):
    _, _, model = qwen2
    tokens, mask = _prompts(model.config.vocab_size)
    greedy = generate(model, tokens, mask, jax.random.key(0), SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0))
    top1 = generate(model, tokens, mask, jax.random.key(5), SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=1))
    np.testing.assert_array_equal(np.asarray(top1.tokens), np.asarray(greedy.tokens))


def test_samples_of_one_prompt_differ_and_keys_reproduce(qwen2):
    _, _, model = qwen2
    tokens, mask = _prompts(model.config.vocab_size)
    config = SamplingConfig(num_samples=4, max_new_tokens=NEW_TOKENS, temperature=1.0)
    out = generate(model, tokens, mask, jax.random.key(2), config)
    for i in range(len(PROMPT_LENGTHS)):
        group = np.asarray(out.tokens)[i * 4 : (i + 1) * 4]
        assert len({tuple(row) for row in group}) > 1
    again = generate(model, tokens, mask, jax.random.key(2), config)
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(out.tokens))


def test_stop_token_ends_row_inside_mask_and_truncation_flag(qwen2):
    _, _, model = qwen2
    tokens, mask = _prompts(model.config.vocab_size)
    greedy = np.asarray(generate(model, tokens, mask, jax.random.key(0), SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0)).tokens)
    # The stop token: one that the most rows emit, but not all, so that rows stop at their own steps and a
    # row without it runs to the end (greedy decoding with the stop is greedy decoding cut at the stop).
    rows_with = collections.Counter(t for row in greedy for t in set(row.tolist()))
    stop = max(rows_with, key=lambda t: (rows_with[t] < len(greedy), rows_with[t]))
    first = {i: int(np.argmax(row == stop)) if (row == stop).any() else None for i, row in enumerate(greedy)}
    stopped = {i: at for i, at in first.items() if at is not None}
    assert len(set(stopped.values())) >= 2 and len(stopped) < len(greedy), (greedy, stop)  # both cases exercised
    pad = 0
    out = generate(model, tokens, mask, jax.random.key(0), SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0, stop_ids=(stop,), pad_id=pad))
    out_tokens, out_mask = np.asarray(out.tokens), np.asarray(out.mask)
    for i, at in first.items():
        if at is None:
            assert out.truncated[i] and out_mask[i].sum() == NEW_TOKENS
            np.testing.assert_array_equal(out_tokens[i], greedy[i])
        else:
            assert not out.truncated[i]
            np.testing.assert_array_equal(out_tokens[i, : at + 1], greedy[i, : at + 1])  # up to and with the stop
            assert out_mask[i, : at + 1].all() and not out_mask[i, at + 1 :].any()  # stop token inside the mask
            assert (out_tokens[i, at + 1 :] == pad).all()
            assert int(out.lengths[i]) == at + 1
            assert float(np.abs(np.asarray(out.logprobs)[i, at + 1 :]).sum()) == 0.0


def test_filter_logits_top_k_and_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1], [0.1, 0.2, 0.3, 0.4]]))
    kept = np.isfinite(np.asarray(filter_logits(logits, top_k=2, top_p=1.0)))
    np.testing.assert_array_equal(kept, [[1, 1, 0, 0], [0, 0, 1, 1]])
    # Nucleus: the smallest set whose mass reaches top_p (the top token always stays).
    kept = np.isfinite(np.asarray(filter_logits(logits, top_k=0, top_p=0.7)))
    np.testing.assert_array_equal(kept, [[1, 1, 0, 0], [0, 0, 1, 1]])
    kept = np.isfinite(np.asarray(filter_logits(logits, top_k=0, top_p=0.1)))
    np.testing.assert_array_equal(kept, [[1, 0, 0, 0], [0, 0, 0, 1]])


def test_sampling_never_draws_filtered_tokens(qwen2):
    _, _, model = qwen2
    tokens, mask = _prompts(model.config.vocab_size)
    out = generate(model, tokens, mask, jax.random.key(3), SamplingConfig(num_samples=4, max_new_tokens=NEW_TOKENS, top_k=3))
    seq_tokens = jnp.concatenate([jnp.repeat(tokens, 4, 0), out.tokens], 1)
    seq_mask = jnp.concatenate([jnp.repeat(mask, 4, 0), out.mask], 1)
    logits, _ = model(seq_tokens, models.positions_from_mask(seq_mask), seq_mask)
    p = tokens.shape[1]
    top3 = np.asarray(jax.lax.top_k(logits[:, p - 1 : -1], 3)[1])  # [N, T, 3]
    assert (top3 == np.asarray(out.tokens)[..., None]).any(-1).all()


def test_two_level_draw_follows_the_weights():
    # 1000 ids (not a multiple of the 128-id block: the padding is exercised), a third of them with
    # weight 0, one heavy id; 160k draws. Each id's frequency is within 5 binomial sigmas of its
    # probability, and zero-weight ids are never drawn.
    rng = np.random.RandomState(0)
    weights = rng.exponential(size=1000) * (rng.rand(1000) > 0.33)
    weights[517] = 50.0
    p = weights / weights.sum()
    rows = 20_000
    draw = jax.jit(lambda key: _draw(key, jnp.broadcast_to(jnp.asarray(weights, jnp.float32), (rows, 1000))))
    ids = np.concatenate([np.asarray(draw(jax.random.key(i))) for i in range(8)])
    counts = np.bincount(ids, minlength=1000)
    assert counts[weights == 0].sum() == 0
    sigma = np.sqrt(p * (1 - p) / len(ids))
    assert np.all(np.abs(counts / len(ids) - p) <= 5 * sigma + 1e-12)


def test_draw_with_one_allowed_id_returns_it():
    weights = np.zeros((3, 300), np.float32)
    weights[0, 0], weights[1, 299], weights[2, 128] = 1.0, 1e-30, 3.0  # block edges, a tiny weight
    ids = np.asarray(_draw(jax.random.key(0), jnp.asarray(weights)))
    np.testing.assert_array_equal(ids, [0, 299, 128])


@pytest.mark.parametrize("segments", [1, 3])
def test_decode_segments_do_not_change_samples(qwen2, segments):
    # The new tokens' cache split into blocks (decoded by consecutive loops) is an implementation
    # detail: the same key gives the same tokens, and logprobs within float rounding.
    _, _, model = qwen2
    tokens, mask = _prompts(model.config.vocab_size)
    config = SamplingConfig(num_samples=3, max_new_tokens=NEW_TOKENS, temperature=1.0, decode_segments=4)
    ref = generate(model, tokens, mask, jax.random.key(4), config)
    out = generate(model, tokens, mask, jax.random.key(4), SamplingConfig(**{**config.__dict__, "decode_segments": segments}))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), rtol=1e-5, atol=1e-5)


def test_sharded_greedy_equals_unsharded(qwen2):
    _, path, model = qwen2
    tokens, mask = left_padded_batch(model.config.vocab_size, (9, 4, 6, 7), 9, seed=1)
    config = SamplingConfig(num_samples=2, max_new_tokens=NEW_TOKENS, temperature=0.0)
    ref = generate(model, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0), config)

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = models.from_pretrained(path, mesh=mesh)
    graphdef, params = nnx.split(sharded)
    assert params["layers"]["q"].get_value().sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    with jax.set_mesh(mesh):
        out = make_sampler(graphdef, config)(params, jax.device_put(tokens, batch), jax.device_put(mask, batch), jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    # float32 accumulation error: the sums split over devices (observed <= 2.4e-6 at |logp| <= 3.6).
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), rtol=1e-5, atol=1e-5)
