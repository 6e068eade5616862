"""The paper's table (`kardia_jax.evaluate` with `evaluation/{judging,stats,report}.py`): the intervals
against hand-computed values, judge replies parsed, read and decoded agreeing on a judge that is certain
of "4", the metric arithmetic of a run on hand-made generations, and a real run's outputs and resume."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers_training import tiny_config
from kardia_jax import evaluate, sharding
from kardia_jax.evaluation import generation, judging, report, stats
from kardia_jax.data.pipeline import load_samples
from kardia_jax.data.sources import sample_path
from kardia_jax.models import Decoder, loading, preset, save_pretrained
from kardia_jax.rewards import RUBRIC_CRITERIA
from kardia_jax.rewards.judge import RubricJudge
from kardia_jax.spans import join_spans

MESH = {"data": 2, "fsdp": 2, "tensor": 2}  # the 8 test devices; batches split over data x fsdp = 4


def _text(emotion="sad", response="I am here for you."):
    return join_spans({"understanding": "You lost your job.", "reasoning": "Losing work hurts.",
                       "emotion": emotion, "response": response})


@pytest.fixture(scope="module")
def test_samples():
    samples, _ = load_samples(sample_path(), "test")
    return samples


# -- the intervals ---------------------------------------------------------------------------------


def test_wilson_interval_against_hand_computed_values():
    # 8 of 10: p = 0.8, centre (0.8 + 1.96²/20) / (1 + 1.96²/10), half 1.96·sqrt(0.016 + 1.96²/400) / (1 + 1.96²/10).
    figure = stats.wilson(8, 10)
    assert (figure.value, figure.n, figure.interval) == (0.8, 10, "wilson")
    np.testing.assert_allclose([figure.low, figure.high], [0.490162, 0.943318], rtol=1e-5)
    # At the ends the interval is not empty and stays inside [0, 1].
    np.testing.assert_allclose([stats.wilson(0, 10).low, stats.wilson(0, 10).high], [0.0, 0.277533], rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose([stats.wilson(10, 10).low, stats.wilson(10, 10).high], [0.722467, 1.0], rtol=1e-5)
    assert math.isnan(stats.wilson(0, 0).value)
    assert stats.rate([True, False, True, True]).value == 0.75


def test_normal_interval_against_hand_computed_values():
    figure = stats.normal([1, 2, 3, 4, 5])  # s = sqrt(2.5), half = 1.96 · s / sqrt(5)
    assert (figure.value, figure.n, figure.interval) == (3.0, 5, "normal")
    np.testing.assert_allclose([figure.low, figure.high], [3 - 1.385904, 3 + 1.385904], rtol=1e-6)
    constant = stats.normal([4.0, 4.0, 4.0])
    assert (constant.low, constant.high) == (4.0, 4.0)
    one = stats.normal([2.5])
    assert one.value == 2.5 and math.isnan(one.low) and math.isnan(one.high)
    assert stats.to_json(one) == {"value": 2.5, "low": None, "high": None, "n": 1, "interval": "normal"}


@pytest.mark.parametrize("reply, score", [
    ("4", 4), (" 4\n", 4), ("4/5", 4), ("1", 1), ("5 - very fluent", 5), ("4444", 4),
    ("0", None), ("6", None), ("four", None), ("Score: 4", None), ("", None), ("  ", None),
])
def test_parse_score(reply, score):
    assert judging.parse_score(reply) == score


# -- the judge -------------------------------------------------------------------------------------


def certain_judge(tokenizer, digit: str) -> Decoder:
    """A tiny judge whose next token is `digit` with probability 1, whatever it reads: residual
    dimension 0 is 1 for every token and no layer writes to it, the final norm keeps only that
    dimension, and the lm head maps it to `digit` alone (a logit of hundreds, every other logit 0)."""
    model = Decoder(preset("tiny-qwen2"), rngs=nnx.Rngs(0))
    (digit_id,) = tokenizer.encode(digit)
    model.embed[...] = model.embed[...].at[:, 0].set(1.0)
    model.layers["o"][...] = model.layers["o"][...].at[..., 0].set(0.0)
    model.layers["down"][...] = model.layers["down"][...].at[..., 0].set(0.0)
    model.final_norm[...] = jnp.zeros_like(model.final_norm[...]).at[0].set(1.0)
    model.lm_head[...] = jnp.zeros_like(model.lm_head[...]).at[0, digit_id].set(100.0)
    return model


def test_read_and_decoded_agree_on_a_judge_certain_of_4(tokenizer, test_samples):
    model = certain_judge(tokenizer, "4")
    judge = RubricJudge(model, tokenizer, max_context_tokens=48, max_response_tokens=16)
    mesh = sharding.make_mesh(**MESH)
    texts = [_text(), _text(emotion="angry", response="That is so hard."), "no spans at all",
             _text().replace("<|response_end|>", "")]  # the last two have no response span
    samples = test_samples[:4]
    with jax.set_mesh(mesh):
        scorer = judging.EvaluationJudge(judge, nnx.split(model)[1], mesh, rows=8, decode_tokens=3)
        read = scorer.score("read", samples, texts)
        decoded = scorer.score("decoded", samples, texts)
    has_span = np.array([True, True, False, False])
    for scored in (read, decoded):
        np.testing.assert_array_equal(scored.has_response, has_span)
        np.testing.assert_array_equal(scored.scores[has_span], 4.0)  # exactly: probability 1 on "4"
        np.testing.assert_array_equal(scored.scores[~has_span], 1.0)  # no response span: the worst, unasked
    assert decoded.parsed.all()
    assert decoded.replies[0] == ["444"] * 5 and decoded.replies[2] == [""] * 5
    with pytest.raises(ValueError, match="judge mode 'sampled'"):
        scorer.score("sampled", samples, texts)


def test_decoded_replies_that_do_not_parse_are_counted_and_score_1(tokenizer, test_samples):
    model = certain_judge(tokenizer, "7")  # "7" is no score
    judge = RubricJudge(model, tokenizer, max_context_tokens=48, max_response_tokens=16)
    mesh = sharding.make_mesh(**MESH)
    with jax.set_mesh(mesh):
        scored = judging.EvaluationJudge(judge, nnx.split(model)[1], mesh, rows=4, decode_tokens=2).score(
            "decoded", test_samples[:2], [_text(), "no spans"])
    assert scored.parsed.tolist() == [[False] * 5, [True] * 5]  # the span-less row is not asked
    np.testing.assert_array_equal(scored.scores, 1.0)
    assert scored.replies[0] == ["77"] * 5


# -- a run -----------------------------------------------------------------------------------------


def eval_config(workdir, **eval_section):
    return tiny_config(workdir, mesh=MESH, data={"max_length": 256},
                       judge={"from_policy": True, "max_context_tokens": 48, "max_response_tokens": 16},
                       eval={"max_new_tokens": 8, "batch_size": 4, "max_samples": 6, "judge_mode": "both"}
                       | eval_section)


HAND_MADE = [  # (text, generated tokens, truncated) for test samples 0..5
    (_text(emotion="{gold}"), 40, False),  # valid, right emotion
    (_text(emotion="{gold}"), 42, False),  # valid, right emotion
    (_text(emotion="not a feeling"), 38, False),  # valid, wrong emotion
    (_text().replace("<|response_end|>", ""), 64, True),  # truncated inside the response: no span
    ("nothing like the format", 12, False),  # no spans at all
    (_text(emotion="{gold}") + " trailing words", 45, False),  # a response span, but not format valid
]


def test_metric_arithmetic_on_hand_made_generations(tmp_path, monkeypatch, test_samples):
    def hand_made(model, tokenizer, samples, settings, mesh):
        for start in range(0, len(samples), settings.batch_size):
            rows = range(start, min(start + settings.batch_size, len(samples)))
            index = [test_samples.index(samples[i]) for i in rows]
            yield generation.Batch(indices=list(rows),
                                   texts=[HAND_MADE[j][0].replace("{gold}", test_samples[j].emotion) for j in index],
                                   lengths=[HAND_MADE[j][1] for j in index], truncated=[HAND_MADE[j][2] for j in index])

    monkeypatch.setattr(evaluate, "generate_batches", hand_made)
    config = eval_config(tmp_path)
    results = evaluate.run(config, ["base"])
    summary = results["base"]
    assert summary["num_samples"] == 6 and summary["num_dropped"] == 0
    assert summary["emotion_accuracy"] == stats.wilson(2, 6)
    assert summary["format_valid_rate"] == stats.wilson(3, 6)
    assert summary["truncation_rate"] == stats.wilson(1, 6)
    assert summary["completion_tokens"] == stats.normal([40, 42, 38, 64, 12, 45])
    assert summary["no_response_span"] == 2

    records = [json.loads(line) for line in (tmp_path / "eval" / "base" / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [evaluate.sample_id(s) for s in test_samples[:6]]
    assert [r["has_response"] for r in records] == [True, True, True, False, False, True]
    assert records[0]["spans"]["emotion"] == test_samples[0].emotion and records[4]["spans"] is None
    for mode in ("read", "decoded"):
        for criterion in RUBRIC_CRITERIA:
            values = [r["scores"][mode][criterion] for r in records]
            assert values[3] == values[4] == 1.0  # span-less: the worst
            assert all(1.0 <= v <= 5.0 for v in values)
            assert summary["judge"][mode][criterion] == stats.normal(values)
    unparsable = {c: sum(not r["parsed"][c] for r in records if r["has_response"]) for c in RUBRIC_CRITERIA}
    assert summary["judge"]["decoded"]["unparsable"] == unparsable
    assert summary["judge"]["decoded"]["unparsable_rate"] == stats.wilson(sum(unparsable.values()), 4 * 5)

    written = json.loads((tmp_path / "eval" / "eval.json").read_text())["checkpoints"]["base"]
    assert written["emotion_accuracy"] == stats.wilson(2, 6).to_json()
    assert set(written["read_vs_decoded_pearson"]) == set(RUBRIC_CRITERIA)
    table = report.format_table(results)
    assert "Emotion acc %" in table and "33.3 (9.7-70.0)" in table  # 2 of 6, Wilson


def test_run_writes_its_outputs_and_resumes_without_redoing_samples(tmp_path, monkeypatch, tokenizer):
    config = eval_config(tmp_path)
    mesh = sharding.mesh_from_config(config.mesh)
    with jax.set_mesh(mesh):
        model, _ = loading.load_policy(config, mesh)
    hf = str(tmp_path / "policy")
    save_pretrained(model, hf)
    loading.save_tokenizer(tokenizer, hf)

    generated = []
    real = evaluate.generate_batches

    def counted(model, tokenizer, samples, settings, mesh):
        generated.append(len(samples))
        yield from real(model, tokenizer, samples, settings, mesh)

    monkeypatch.setattr(evaluate, "generate_batches", counted)
    first = evaluate.run(config, [f"policy={hf}", "base"])
    out = tmp_path / "eval"
    assert generated == [6, 6]
    assert (out / "radar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads((out / "eval.json").read_text())
    assert list(written["checkpoints"]) == ["policy", "base"] and written["judge_modes"] == ["read", "decoded"]
    lines = (out / "policy" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 6

    # An interrupted run: only the first batch was written. The rerun generates the other two prompts
    # and ends with the same records (greedy decoding) and figures.
    (out / "policy" / "samples.jsonl").write_text("\n".join(lines[:4]) + "\n")
    generated.clear()
    again = evaluate.run(config, [f"policy={hf}", "base"])
    assert generated == [2, 0]
    assert (out / "policy" / "samples.jsonl").read_text().splitlines() == lines
    assert again["policy"] == first["policy"]

    # Other settings do not resume into the same directory.
    config.eval.max_new_tokens = 6
    with pytest.raises(ValueError, match=r"other settings \(max_new_tokens: 8 -> 6, max_prompt_len: 248 -> 250\)"):
        evaluate.run(config, [f"policy={hf}"])
