"""Generating and scoring completions as text (`evaluation/generation.py`): text scoring on hand-built
completions, completion decoding, a tiny model end to end, prompts that do not fit, and loading the
policy back from a Hugging Face directory, an Orbax checkpoint or the config's own model. The paper's
table (`kardia_jax.evaluate`): tests/test_evaluation.py."""

import jax
import numpy as np
import pytest
from flax import nnx

from helpers_training import tiny_config
from kardia_jax.models import loading
from kardia_jax import checkpoints, evaluate, sharding
from kardia_jax.evaluation import generation
from kardia_jax.data.pipeline import load_samples
from kardia_jax.data.sources import sample_path
from kardia_jax.spans import join_spans
from kardia_jax.models import save_pretrained

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
    score = generation.score_text(text, gold)
    assert (score.format_valid, score.emotion_correct) == (valid, correct)


def test_score_texts_rates():
    texts = [_text(), _text(emotion="angry"), "no spans at all", _text(emotion="Joyful")]
    rates = generation.score_texts(texts, ["sad", "sad", "sad", "joyful"], lengths=[10, 20, 30, 40],
                                 truncated=[False, False, True, False])
    assert rates == {"format_valid_rate": 0.75, "emotion_accuracy": 0.5, "num_samples": 4,
                     "mean_completion_length": 25.0, "truncation_rate": 0.25}
    with pytest.raises(ValueError, match="2 texts but 1"):
        generation.score_texts(["a", "b"], ["sad"])


def test_completion_text_drops_only_the_stop_token(tokenizer):
    ids = tokenizer.encode(_text()) + [tokenizer.eos_id]
    tokens = np.asarray(ids + [tokenizer.pad_id] * 5)
    assert generation.completion_text(tokenizer, tokens, len(ids), truncated=False) == _text()
    assert generation.score_text(generation.completion_text(tokenizer, tokens, len(ids), False), "sad").emotion_correct
    # A truncated completion has no stop token: every generated id is kept.
    cut = len(ids) - 3
    assert generation.completion_text(tokenizer, tokens, cut, truncated=True) == tokenizer.decode(ids[:cut])


def test_format_comparison():
    lines = generation.format_comparison({"format_valid_rate": 0.0, "emotion_accuracy": 0.03125},
                                       {"format_valid_rate": 0.9125, "emotion_accuracy": 0.42})
    assert lines == ["format-valid rate: 0.00 -> 0.91", "emotion accuracy: 0.03 -> 0.42"]
    assert generation.format_comparison(None, {"format_valid_rate": 1, "emotion_accuracy": 0})[0] == \
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
    with jax.set_mesh(mesh):
        # batch_size 3 over 5 prompts: the last batch is filled up and the filler rows are dropped.
        metrics = generation.evaluate_generations(
            model, tokenizer, test_samples, max_new_tokens=6, batch_size=3, max_prompt_len=256, mesh=mesh,
            return_completions=True)
    completions = metrics.pop("completions")
    assert [c["sample"] for c in completions] == list(range(5))
    assert metrics["num_samples"] == 5 and metrics["num_dropped"] == 0
    assert 0 < metrics["mean_completion_length"] <= 6 and 0 <= metrics["truncation_rate"] <= 1
    # The reported rates are the text scores of the returned completions.
    rescored = generation.score_texts([c["text"] for c in completions], [s.emotion for s in test_samples])
    assert metrics["format_valid_rate"] == rescored["format_valid_rate"]
    assert metrics["emotion_accuracy"] == rescored["emotion_accuracy"]

    # Greedy decoding: the same completions with another batch size, whose rows split over the 8 devices.
    with jax.set_mesh(mesh):
        again = generation.evaluate_generations(model, tokenizer, test_samples * 2, max_new_tokens=6, batch_size=8,
                                                max_prompt_len=256, mesh=mesh, return_completions=True)
    assert [c["text"] for c in again["completions"]] == [c["text"] for c in completions] * 2


def test_prompts_that_cannot_fit_are_counted(tiny, tokenizer, test_samples):
    _, mesh, model = tiny
    # With 130 prompt tokens, samples 1, 2 and 4 fit once their oldest exchanges are cut; samples 0 and
    # 3 (system message + user message: 131 and 138 tokens) cannot fit at all.
    with jax.set_mesh(mesh):
        metrics = generation.evaluate_generations(model, tokenizer, test_samples, max_new_tokens=2, batch_size=8,
                                                  max_prompt_len=130, mesh=mesh, return_completions=True)
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
        # "base": the model the config names (here: the preset at its seed).
        base, _ = evaluate.load_checkpoint(config, "base", mesh)
        jax.tree.map(np.testing.assert_array_equal, _params(base), expected)


@pytest.mark.parametrize("arg, label, path", [
    ("runs/x/sft/hf", "sft", "runs/x/sft/hf"),
    ("runs/x/grpo/40", "grpo-40", "runs/x/grpo/40"),
    ("runs/x/grpo/", "grpo", "runs/x/grpo/"),
    ("after rl=gs://b/run/grpo/hf", "after_rl", "gs://b/run/grpo/hf"),
    ("gs://b/run=1/sft/hf", "sft", "gs://b/run=1/sft/hf"),  # an "=" inside a path is not a label
    ("base", "base", "base"),
])
def test_checkpoint_labels(arg, label, path):
    assert evaluate.parse_checkpoint(arg) == (label, path)
