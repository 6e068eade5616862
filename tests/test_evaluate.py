"""Evaluation: text scoring on hand-built completions, completion decoding, a tiny model end to end,
and loading the policy back from a Hugging Face directory or an Orbax checkpoint."""

import jax
import numpy as np
import pytest
from flax import nnx

from helpers_training import tiny_config
from kardia_jax.models import loading
from kardia_jax import checkpoints, evaluate, sharding
from kardia_jax.data.pipeline import load_samples
from kardia_jax.data.sources import sample_path
from kardia_jax.spans import join_spans
from kardia_jax.models import save_pretrained
from kardia_jax.models.tokenizer import load_tokenizer, tokenizer_path

SPANS = {"understanding": "You lost your job.", "reasoning": "Losing work hurts.", "emotion": "sad",
         "response": "I am here for you."}


def _text(**changes):
    return join_spans(SPANS | changes)


@pytest.mark.parametrize("text,gold,valid,correct", [
    (_text(), "sad", True, True),
    (_text(), "angry", True, False),
    (_text(emotion="  Sad\n"), "sad", True, True),  # case and whitespace are normalized
    (_text(emotion="very sad"), "sad", True, False),
    ("\n" + _text() + "  \n", "sad", True, True),  # whitespace outside the spans is fine
    (_text() + " Hope this helps.", "sad", False, False),  # text after the last span
    (_text(reasoning=" "), "sad", False, False),  # an empty span
    (_text().replace("<|response_end|>", ""), "sad", False, False),  # truncated before the end
    (_text() + "<|response_begin|>x<|response_end|>", "sad", False, False),  # a span twice
    ("<understanding>u</understanding><reasoning>r</reasoning><emotion>Sad</emotion><response>x</response>",
     "sad", True, True),  # the XML-style tags count too
    ("<|emotion_begin|>sad<|emotion_end|>", "sad", False, False),  # the emotion alone is not enough
    ("", "sad", False, False),
])
def test_score_text(text, gold, valid, correct):
    score = evaluate.score_text(text, gold)
    assert (score.format_valid, score.emotion_correct) == (valid, correct)


def test_score_texts_rates():
    texts = [_text(), _text(emotion="angry"), "no spans at all", _text(emotion="Joyful")]
    rates = evaluate.score_texts(texts, ["sad", "sad", "sad", "joyful"], lengths=[10, 20, 30, 40],
                                 truncated=[False, False, True, False])
    assert rates == {"format_valid_rate": 0.75, "emotion_accuracy": 0.5, "num_samples": 4,
                     "mean_completion_length": 25.0, "truncation_rate": 0.25}
    with pytest.raises(ValueError, match="2 texts but 1"):
        evaluate.score_texts(["a", "b"], ["sad"])


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tokenizer_path())


def test_completion_text_drops_only_the_stop_token(tokenizer):
    ids = tokenizer.encode(_text()) + [tokenizer.eos_id]
    tokens = np.asarray(ids + [tokenizer.pad_id] * 5)
    assert evaluate.completion_text(tokenizer, tokens, len(ids), truncated=False) == _text()
    assert evaluate.score_text(evaluate.completion_text(tokenizer, tokens, len(ids), False), "sad").emotion_correct
    # A truncated completion has no stop token: every generated id is kept.
    cut = len(ids) - 3
    assert evaluate.completion_text(tokenizer, tokens, cut, truncated=True) == tokenizer.decode(ids[:cut])


def test_format_comparison():
    lines = evaluate.format_comparison({"format_valid_rate": 0.0, "emotion_accuracy": 0.03125},
                                       {"format_valid_rate": 0.9125, "emotion_accuracy": 0.42})
    assert lines == ["format-valid rate: 0.00 -> 0.91", "emotion accuracy: 0.03 -> 0.42"]
    assert evaluate.format_comparison(None, {"format_valid_rate": 1, "emotion_accuracy": 0})[0] == \
        "format-valid rate: n/a -> 1.00"


@pytest.fixture(scope="module")
def tiny(tokenizer):
    config = tiny_config()
    mesh = sharding.mesh_from_config(config.mesh)
    with jax.set_mesh(mesh):
        model, _ = loading.load_policy(config, mesh)
    return config, mesh, model


@pytest.fixture(scope="module")
def test_samples():
    samples, _ = load_samples(sample_path(), "test")
    return samples[:5]


def test_tiny_model_end_to_end(tiny, tokenizer, test_samples):
    config, mesh, model = tiny
    seen = []

    def fake_judge(samples, texts):
        seen.append((list(samples), list(texts)))
        return {"rubric/empathy": [0.5] * len(texts)}

    with jax.set_mesh(mesh):
        # batch_size 3 over 5 prompts: the last batch is filled up and the filler rows are dropped.
        metrics = evaluate.evaluate_generations(
            model, tokenizer, test_samples, max_new_tokens=6, batch_size=3, max_prompt_len=256, mesh=mesh,
            scorers=[fake_judge], return_completions=True)
    completions = metrics.pop("completions")
    assert [c["sample"] for c in completions] == list(range(5))
    assert metrics["num_samples"] == 5 and metrics["num_dropped"] == 0
    assert 0 < metrics["mean_completion_length"] <= 6 and 0 <= metrics["truncation_rate"] <= 1
    assert metrics["rubric/empathy"] == 0.5
    assert seen[0][0] == list(test_samples) and seen[0][1] == [c["text"] for c in completions]
    # The reported rates are the text scores of the returned completions.
    rescored = evaluate.score_texts([c["text"] for c in completions], [s.emotion for s in test_samples])
    assert metrics["format_valid_rate"] == rescored["format_valid_rate"]
    assert metrics["emotion_accuracy"] == rescored["emotion_accuracy"]

    # Greedy decoding: the same completions unsharded and with another batch size.
    again = evaluate.evaluate_generations(model, tokenizer, test_samples, max_new_tokens=6, batch_size=5,
                                          max_prompt_len=256, return_completions=True)
    assert [c["text"] for c in again["completions"]] == [c["text"] for c in completions]


def test_prompts_that_cannot_fit_are_counted(tiny, tokenizer, test_samples):
    _, _, model = tiny
    # With 130 prompt tokens, samples 1, 2 and 4 fit once their oldest exchanges are cut; samples 0 and
    # 3 (system message + user message: 131 and 138 tokens) cannot fit at all.
    metrics = evaluate.evaluate_generations(model, tokenizer, test_samples, max_new_tokens=2, batch_size=8,
                                            max_prompt_len=130, return_completions=True)
    assert metrics["num_dropped"] == 2 and metrics["num_samples"] == 3
    assert [c["sample"] for c in metrics["completions"]] == [1, 2, 4]


def _params(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def test_load_checkpoint_from_hf_dir_and_orbax(tiny, tokenizer, tmp_path):
    config, mesh, model = tiny
    expected = _params(model)
    hf = str(tmp_path / "hf")
    save_pretrained(model, hf)
    loading.save_tokenizer(tokenizer, hf)
    with checkpoints.Checkpointer(tmp_path / "orbax", async_save=False) as ckpt:
        ckpt.save(7, nnx.to_pure_dict(nnx.state(model)))

    other = tiny_config()
    other.seed = 1  # a different random init: what is loaded must come from the checkpoint
    with jax.set_mesh(mesh):
        for path in (hf, str(tmp_path / "orbax"), str(tmp_path / "orbax" / "7")):
            loaded, loaded_tokenizer = evaluate.load_checkpoint(other, path, mesh)
            jax.tree.map(np.testing.assert_array_equal, _params(loaded), expected)
            assert loaded_tokenizer.vocab_size == tokenizer.vocab_size
        with pytest.raises(FileNotFoundError, match="neither a Hugging Face directory"):
            evaluate.load_checkpoint(other, str(tmp_path / "empty"), mesh)
