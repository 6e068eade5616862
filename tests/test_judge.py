"""The rubric judge's scorer: score reading, in-graph vs host paths, three-level prefix sharing vs full prompts,
packing, loading. The host-side prompt building: test_judge_prompts.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kardia_jax import sharding
from kardia_jax.config import base_config
from kardia_jax.data.pipeline import load_samples
from kardia_jax.data.sources import sample_path
from kardia_jax.spans import parse_spans
from kardia_jax.models import Decoder, positions_from_mask, preset
from kardia_jax.models.tokenizer import load_tokenizer, tokenizer_path
from kardia_jax.rewards import RUBRIC_CRITERIA, rubric
from kardia_jax.rewards.judge import RubricJudge, load_judge, scores_from_logits
from kardia_jax.rewards.judge_prompts import JudgePrompts
from kardia_jax.evaluation.judging import EvaluationJudge

CONTEXT_TOKENS, RESPONSE_TOKENS = 100, 12  # contexts of 80 tokens and over budget: different lengths
B, G = 4, 2  # prompts x completions per prompt = the 8 completions below


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tokenizer_path())


@pytest.fixture(scope="module")
def samples():
    train, _ = load_samples(sample_path(), "train")
    later_turns = [s for s in train if s.turn_index >= 1]  # with an Assistant line in the context
    return [train[0], *later_turns[:B - 1]]


@pytest.fixture(scope="module")
def model():
    model = Decoder(preset("tiny-qwen2", vocab_size=2176), rngs=nnx.Rngs(0))
    # Larger weights than at init: score distributions that differ between completions, so errors show.
    model.lm_head[...] = model.lm_head[...] * 5.0
    for name, scale in (("q", 3.0), ("k", 3.0), ("v", 3.0), ("o", 5.0), ("down", 5.0)):
        model.layers[name][...] = model.layers[name][...] * scale
    return model


@pytest.fixture(scope="module")
def judge(model, tokenizer):
    return RubricJudge(model, tokenizer, max_context_tokens=CONTEXT_TOKENS, max_response_tokens=RESPONSE_TOKENS)


@pytest.fixture(scope="module")
def score_ids(judge):
    """The in-graph path, jitted once for the module (each test scores the same shapes)."""
    return jax.jit(judge.score_ids)


def _completion_texts(samples):
    """Completions with a well-formed span (long: truncated at R, and short) and broken formats; the rows
    of SPANLESS have no response span (see HAS_SPAN)."""
    end = "<|im_end|>"
    spans = "<|understanding_begin|>u<|understanding_end|><|reasoning_begin|>r<|reasoning_end|><|emotion_begin|>sad<|emotion_end|>"
    return [
        samples[0].target + end,  # well formed, long response (truncated at R)
        spans + "<|response_begin|>I hear you.<|response_end|>" + end,  # well formed, short
        spans + "<|response_begin|>It sounds so hard, and I am",  # truncated inside the response: no end, no stop
        "\n\nI am here for you.\n" + end,  # no markers at all; whitespace tokens at the ends are trimmed
        spans + "<|response_begin|>a<|response_end|><|response_begin|>b<|response_end|>" + end,  # response twice
        spans + "<|response_begin|> \n <|response_end|>" + end,  # empty response
        "<|response_end|>first<|response_begin|> then" + end,  # out of order
        spans + "<|response_begin|>Hi<|emotion_end|> there\n<|response_end|>" + end,  # stray marker inside
    ]


HAS_SPAN = np.array([True, True, False, False, False, False, False, True])  # rows of _completion_texts


@pytest.fixture(scope="module")
def batch(tokenizer, samples, judge):
    texts = _completion_texts(samples)
    ids = [tokenizer.encode(t) for t in texts]
    width = max(len(i) for i in ids) + 3
    tokens = np.full((len(ids), width), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(ids), width), np.int32)
    for row, seq in enumerate(ids):
        tokens[row, :len(seq)], mask[row, :len(seq)] = seq, 1
    contexts = judge.prepare_contexts(samples)
    return texts, tokens, mask, contexts


def test_certain_four_scores_exactly_075(model, tokenizer, score_ids, batch):
    """Hidden dim 0 always positive (a large constant in every embedding row) and the only one the final
    norm lets through; lm_head maps it to "4" alone, so p("4") = 1 after every suffix."""
    _, tokens, mask, contexts = batch
    graphdef, params = nnx.split(model)
    four = tokenizer.encode("4")[0]
    params = jax.tree.map(lambda x: x, params)
    params["embed"][...] = params["embed"][...].at[:, 0].set(10.0)
    params["final_norm"][...] = jnp.zeros_like(params["final_norm"][...]).at[0].set(1.0)
    params["lm_head"][...] = jnp.zeros_like(params["lm_head"][...]).at[0, four].set(1e4)
    scores = np.asarray(score_ids(params, tokens, mask, contexts))
    assert scores.shape == (len(tokens), len(RUBRIC_CRITERIA)) and scores.dtype == np.float32
    np.testing.assert_array_equal(scores, np.where(HAS_SPAN[:, None], np.full_like(scores, 0.75), 0.0))


def test_packing_equals_host_tokenization(judge, tokenizer, samples, batch):
    texts, tokens, mask, contexts = batch
    in_graph = jax.jit(judge.assemble_ids)(tokens, mask, contexts)
    blocks = judge.assemble_texts(judge.decode_completions(tokens, mask), samples)
    assert isinstance(in_graph, JudgePrompts) and isinstance(blocks, JudgePrompts)
    for name, got, want in zip(JudgePrompts._fields, in_graph, blocks):
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=name)
    # One context row per prompt, one response row per completion.
    assert blocks.context.shape == (B, CONTEXT_TOKENS + len(judge.mid_ids))
    assert blocks.response.shape == (B * G, RESPONSE_TOKENS + len(judge.tail_ids))
    host, host_mask = (np.asarray(x) for x in judge.full_prompts(blocks))
    assert host.shape == (B * G, judge.prompt_length)
    assert len(set(host_mask.sum(1).tolist())) >= 4  # different lengths, left-padded

    # What the response slot holds, against rules written out here.
    head, mid, tail = len(judge.head_ids), len(judge.mid_ids), len(judge.tail_ids)

    def response_of(row):
        seq = host[row][host_mask[row] > 0]
        context = int(contexts["context_mask"][row // G].sum())
        assert list(seq[:head]) == list(judge.head_ids) and list(seq[len(seq) - tail:]) == list(judge.tail_ids)
        assert list(seq[head + context:head + context + mid]) == list(judge.mid_ids)
        return list(seq[head + context + mid:len(seq) - tail])

    assert response_of(0) == tokenizer.encode(parse_spans(samples[0].target)["response"])[:RESPONSE_TOKENS]
    assert len(response_of(0)) == RESPONSE_TOKENS  # truncated
    assert response_of(1) == tokenizer.encode("I hear you.")
    assert [response_of(row) for row in np.flatnonzero(~HAS_SPAN)] == [[]] * 5  # no span: nothing of the text
    assert response_of(7) == tokenizer.encode("Hi") + tokenizer.encode(" there")
    # The context slot: the profile first; over budget, the oldest conversation tokens go first.
    profile, conversation = rubric.context_parts(samples[1])
    context = list(contexts["context_ids"][1][contexts["context_mask"][1] > 0])
    assert len(context) == CONTEXT_TOKENS
    assert context[-5:] == tokenizer.encode(conversation)[-5:] and context[:5] == tokenizer.encode(profile)[:5]


def test_in_graph_and_host_paths_give_the_same_scores(model, judge, score_ids, samples, batch):
    _, tokens, mask, contexts = batch
    params = nnx.split(model)[1]
    in_graph = np.asarray(score_ids(params, tokens, mask, contexts))
    host = judge.score_texts(params, judge.decode_completions(tokens, mask), samples)
    # Scores in [0, 1] from the same prompts assembled two ways: float32 rounding only.
    np.testing.assert_allclose(in_graph, host, rtol=1e-5, atol=1e-6)
    assert np.all((in_graph >= 0) & (in_graph <= 1)) and np.ptp(in_graph, axis=0).min() > 1e-3
    # The re-tokenizing path inside the step (pure_callback), as for a judge with another tokenizer:
    # it assembles the same prompts.
    retokenized = RubricJudge(model, judge.tokenizer, shared_vocab=False, max_context_tokens=CONTEXT_TOKENS,
                              max_response_tokens=RESPONSE_TOKENS)
    retokenized_prompts = jax.jit(retokenized.assemble_ids)(tokens, mask, contexts)  # the scorer is the same
    for got, want in zip(retokenized_prompts, judge.assemble_texts(judge.decode_completions(tokens, mask), samples)):
        np.testing.assert_array_equal(np.asarray(got), want)
    # Under a mesh the callback runs once per batch shard (on a pod: on the process holding the rows).
    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1)
    rows = sharding.named_sharding(("activation_batch", None), tokens.shape, sharding.DEFAULT_RULES, mesh)
    assert rows.spec[0] is not None, "the completions should be split over the devices for this check"
    with jax.set_mesh(mesh):
        sharded = jax.jit(retokenized.assemble_ids)(jax.device_put(tokens, rows), jax.device_put(mask, rows), contexts)
    for got, want in zip(sharded, retokenized_prompts):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_completions_without_a_response_span_score_zero(model, judge, score_ids, samples, batch):
    """Truncated inside the response, no markers, the response twice, an empty one, markers out of order:
    rubric 0 on every criterion on all three paths (in-graph, host, re-tokenized in the step), where the
    judge would otherwise rate whatever it reads (its scores are strictly inside (0, 1))."""
    _, tokens, mask, contexts = batch
    params = nnx.split(model)[1]
    retokenized = RubricJudge(model, judge.tokenizer, shared_vocab=False, max_context_tokens=CONTEXT_TOKENS,
                              max_response_tokens=RESPONSE_TOKENS)
    for scores in (np.asarray(score_ids(params, tokens, mask, contexts)),
                   judge.score_texts(params, judge.decode_completions(tokens, mask), samples),
                   np.asarray(jax.jit(retokenized.score_ids)(params, tokens, mask, contexts))):
        np.testing.assert_array_equal(scores[~HAS_SPAN], 0.0)
        assert np.all(scores[HAS_SPAN] > 1e-3) and np.all(scores[HAS_SPAN] < 1 - 1e-3)
    # Evaluation reports them at the bottom of the 1-5 scale, and the others at 1 + 4 x the host path's score.
    texts = judge.decode_completions(tokens, mask)
    rows = [samples[i // G] for i in range(len(texts))]
    mesh = sharding.make_mesh(fsdp=-1)
    with jax.set_mesh(mesh):
        evaluated = EvaluationJudge(judge, params, mesh, rows=len(texts), decode_tokens=1).score("read", rows, texts)
    np.testing.assert_array_equal(evaluated.has_response, HAS_SPAN)
    np.testing.assert_array_equal(evaluated.scores[~HAS_SPAN], 1.0)
    np.testing.assert_allclose(evaluated.scores, 1.0 + 4.0 * judge.score_texts(params, texts, rows), rtol=1e-6, atol=1e-6)


def test_prefix_sharing_equals_five_full_prompts(model, judge, batch):
    _, tokens, mask, contexts = batch
    params = nnx.split(model)[1]
    blocks = jax.jit(judge.assemble_ids)(tokens, mask, contexts)
    prompts, prompt_mask = (np.asarray(x) for x in judge.full_prompts(blocks))
    logits = np.asarray(jax.jit(judge.score_logits)(params, blocks))  # [N, 5, 5]

    # Reference: each (completion, criterion) prompt as one sequence through a plain forward, no cache.
    suffixes = [judge.tokenizer.encode(s) for s in judge.template.suffixes]
    width = prompts.shape[1] + max(len(s) for s in suffixes)

    @jax.jit
    def last_logits(seq, seq_mask):
        out, _ = model(seq, positions_from_mask(seq_mask), seq_mask)
        return out[:, -1][:, judge.score_ids_array]

    for row in (0, 5):  # a long (truncated) and an empty response: the longest and shortest prompts
        prefix = list(prompts[row][prompt_mask[row] > 0])
        seq = np.zeros((len(suffixes), width), np.int32)
        seq_mask = np.zeros_like(seq)
        for c, suffix in enumerate(suffixes):
            full = prefix + suffix
            seq[c, width - len(full):], seq_mask[c, width - len(full):] = full, 1
        ref = np.asarray(last_logits(seq, seq_mask))
        # float32 accumulation error: the same sums, over the cached prefix and the suffix, in another order.
        np.testing.assert_allclose(jax.nn.log_softmax(logits[row]), jax.nn.log_softmax(ref), rtol=1e-5, atol=1e-5)

    # Scores from those logits, also when scored in chunks of whole groups (4 groups of G = 2: 6 rows are
    # 3 groups a step, 3 + 1 and 2 padding groups), or of sub-groups when G exceeds the chunk (1 row).
    expected = (np.sum(np.asarray(jax.nn.softmax(logits)) * np.arange(1, 6), axis=-1) - 1) / 4
    expected = np.where(HAS_SPAN[:, None], expected, 0.0)  # no response span: 0 whatever the judge reads
    for rows_per_chunk in (6, 1):
        chunked = RubricJudge(model, judge.tokenizer, max_context_tokens=CONTEXT_TOKENS,
                              max_response_tokens=RESPONSE_TOKENS, rows_per_chunk=rows_per_chunk)
        np.testing.assert_allclose(np.asarray(jax.jit(chunked.score_prompts)(params, blocks)), expected,
                                   rtol=1e-5, atol=1e-6)  # float32 rounding of a 5-way softmax's mean


@pytest.mark.parametrize("group", [2, 4])
def test_three_levels_equal_each_completions_contiguous_prompt(model, judge, score_ids, samples, batch, group):
    """HEAD once, each prompt's context once for its G completions, each response once for its five
    criteria: the scores of every completion are those of its own contiguous prompt HEAD + context + MID
    + response + TAIL + suffix, read by a plain forward with no cache (all 8 completions differ)."""
    texts, tokens, mask, _ = batch
    prompt_samples = samples[:len(texts) // group]
    contexts = judge.prepare_contexts(prompt_samples)
    context_lengths = contexts["context_mask"].sum(1)
    assert len(set(context_lengths.tolist())) > 1  # prompts of different context lengths
    params = nnx.split(model)[1]
    scorer = score_ids if group == G else jax.jit(judge.score_ids)
    scores = np.asarray(scorer(params, tokens, mask, contexts))  # [8, 5]
    logits = np.asarray(jax.jit(judge.score_logits)(params, jax.jit(judge.assemble_ids)(tokens, mask, contexts)))

    # Reference: the 8 x 5 prompts written out from their pieces, left-padded into one batch.
    suffixes = [judge.tokenizer.encode(s) for s in judge.template.suffixes]
    full = [[*judge.head_ids, *judge.context_ids(prompt_samples[i // group]), *judge.mid_ids,
             *judge.response_ids(text), *judge.tail_ids, *suffix]
            for i, text in enumerate(judge.decode_completions(tokens, mask)) for suffix in suffixes]
    width = max(len(f) for f in full)
    seq = np.zeros((len(full), width), np.int32)
    seq_mask = np.zeros_like(seq)
    for row, ids in enumerate(full):
        seq[row, width - len(ids):], seq_mask[row, width - len(ids):] = ids, 1
    out, _ = jax.jit(model)(seq, positions_from_mask(seq_mask), seq_mask)
    ref = np.asarray(out[:, -1][:, judge.score_ids_array]).reshape(len(texts), len(suffixes), -1)
    # float32 accumulation error: three levels of prefix caches against one contiguous forward.
    np.testing.assert_allclose(jax.nn.log_softmax(logits), jax.nn.log_softmax(ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scores, np.where(HAS_SPAN[:, None], np.asarray(scores_from_logits(ref)), 0.0),
                               rtol=1e-5, atol=1e-6)
    # Completions of one prompt with different responses score differently.
    assert np.abs(scores[0] - scores[1]).max() > 1e-3


def test_vocabulary_detection_and_load_judge(model, tokenizer, judge, score_ids, batch):
    _, tokens, mask, contexts = batch
    assert judge.shared_vocab  # the same tokenizer (same_vocabulary: test_judge_prompts.py)

    config = base_config()
    config.judge.from_policy = True
    config.judge.max_context_tokens, config.judge.max_response_tokens = CONTEXT_TOKENS, RESPONSE_TOKENS
    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1)
    with jax.set_mesh(mesh):
        loaded, params = load_judge(config, mesh, tokenizer, model)
        policy = nnx.split(model)[1]
        assert all(a is not b for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(policy)))  # a copy
        embed = params["embed"][...]
        assert embed.sharding.spec == sharding.logical_to_spec(("vocab", "embed"), embed.shape, sharding.DEFAULT_RULES, dict(mesh.shape))
        sharded = np.asarray(jax.jit(loaded.score_ids)(params, tokens, mask, contexts))
    unsharded = np.asarray(score_ids(policy, tokens, mask, contexts))
    np.testing.assert_allclose(sharded, unsharded, rtol=1e-5, atol=1e-6)  # float32: sums split over devices

    config.judge.from_policy, config.judge.preset = False, "tiny-qwen2"
    config.judge.max_context_tokens = 16
    with jax.set_mesh(mesh):
        random_judge, _ = load_judge(config, mesh, tokenizer)
    assert random_judge.prompt_length == judge.prompt_length - CONTEXT_TOKENS + 16


def test_contexts_cut_to_a_bucket_score_as_at_the_full_width(model, judge, score_ids, batch):
    """The GRPO pipeline cuts a batch's contexts to the narrowest width that holds them (cut_contexts): the
    prompts lose only padding, so the scores are those of the full-width contexts up to float32 rounding."""
    from kardia_jax.data.pipeline import context_widths, cut_contexts  # pylint: disable=import-outside-toplevel

    _, tokens, mask, contexts = batch
    params = nnx.split(model)[1]
    widths = context_widths(CONTEXT_TOKENS, 3)
    assert widths == (64, 100)  # 100 / 4 and 100 / 2 round up to 64
    assert int(contexts["context_mask"].sum(axis=1).max()) > 64
    assert cut_contexts(contexts, 3)["context_ids"].shape == (B, 100)
    # Contexts of 40 tokens or fewer (each row's first 40 - row, right-padded as prepare_contexts pads).
    keep = np.arange(CONTEXT_TOKENS)[None, :] < (40 - np.arange(B))[:, None]  # [B, C]
    full_short = {"context_ids": np.where(keep, contexts["context_ids"], judge.tokenizer.pad_id),
                  "context_mask": (contexts["context_mask"] * keep).astype(np.int32)}
    cut_short = cut_contexts(full_short, 3)
    assert cut_short["context_ids"].shape == (B, 64)
    np.testing.assert_allclose(np.asarray(jax.jit(judge.score_ids)(params, tokens, mask, cut_short)),
                               np.asarray(score_ids(params, tokens, mask, full_short)), rtol=1e-5, atol=1e-6)
