"""One completion per prompt, batched and split over the mesh, and its format and emotion read from text.

    for batch in generate_batches(model, tokenizer, samples, settings, mesh):
        batch.indices, batch.texts, batch.lengths, batch.truncated    # the batch's real rows

Prompts come from the GRPO pipeline (left-padded to its length buckets, so one compiled sampler per
bucket; an overlong history loses its oldest exchanges, and a prompt that does not fit even then is
left out and counted). Every batch has `batch_size` rows: the pipeline fills the last one up with
copies of its first row, which are generated and then dropped. The rows are split over the mesh's
data x fsdp devices (`scaffold.distribute`), as a training batch is.

Scoring is on text, the way a reader sees a reply: a completion is the generated ids up to (not
including) its stop token, decoded with the special tokens kept; it is *format valid* when
`parse_spans` accepts it (all four spans, in order, non-empty, nothing outside them) and *emotion
correct* when, in addition, its emotion span normalizes to the sample's gold label.

`evaluate_generations` is SFT's quick before/after check (greedy, rates only); `kardia_jax.evaluate`
builds the paper's table on the same batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx

from kardia_jax import scaffold, sharding
from kardia_jax.data.pipeline import BatchConfig, grpo_pipeline, load_samples
from kardia_jax.data.prompts import DifficultyRule
from kardia_jax.data.schema import TurnSample
from kardia_jax.models import Decoder
from kardia_jax.models.tokenizer import Tokenizer
from kardia_jax.sampling import SamplingConfig, make_sampler
from kardia_jax.spans import normalize_emotion, parse_spans

# Metric name -> how it is printed in a before -> after comparison.
HEADLINE_METRICS = {"format_valid_rate": "format-valid rate", "emotion_accuracy": "emotion accuracy"}


def test_samples(config, max_samples: int) -> list[TurnSample]:
    """The turn samples of config.data.test_split, the first `max_samples` (0: all)."""
    data = config.data
    samples, _ = load_samples(scaffold.data_source(data), data.test_split, data.on_bad_row,
                              DifficultyRule(kind=data.difficulty_rule), data.history)
    return samples[:max_samples] if max_samples else samples


@dataclasses.dataclass(frozen=True)
class TextScore:
    format_valid: bool
    emotion_correct: bool
    emotion: str | None  # the normalized emotion span, None when the format is invalid


def score_text(text: str, gold_emotion: str) -> TextScore:
    """Scores one completion text (special tokens kept, stop token removed) against a gold label."""
    spans = parse_spans(text)
    if spans is None:
        return TextScore(False, False, None)
    emotion = normalize_emotion(spans["emotion"])
    return TextScore(True, emotion == normalize_emotion(gold_emotion), emotion)


def score_texts(texts: Sequence[str], gold_emotions: Sequence[str], lengths: Sequence[int] | None = None,
                truncated: Sequence[bool] | None = None) -> dict[str, float]:
    """Rates over a list of completions: format_valid_rate, emotion_accuracy (and, given the generated
    lengths / truncation flags, mean_completion_length and truncation_rate)."""
    if len(texts) != len(gold_emotions):
        raise ValueError(f"score_texts: {len(texts)} texts but {len(gold_emotions)} gold emotions.")
    scores = [score_text(t, e) for t, e in zip(texts, gold_emotions)]
    n = max(len(scores), 1)
    out = {
        "format_valid_rate": sum(s.format_valid for s in scores) / n,
        "emotion_accuracy": sum(s.emotion_correct for s in scores) / n,
        "num_samples": len(scores),
    }
    if lengths is not None:
        out["mean_completion_length"] = float(np.mean(lengths)) if len(lengths) else 0.0
    if truncated is not None:
        out["truncation_rate"] = float(np.mean(truncated)) if len(truncated) else 0.0
    return out


def completion_text(tokenizer: Tokenizer, tokens: np.ndarray, length: int, truncated: bool) -> str:
    """The text of one generated row: its first `length` ids without the final stop token."""
    ids = tokens[:length]
    if not truncated and length:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How completions are generated."""

    max_new_tokens: int
    batch_size: int  # prompts per sampler call (a multiple of the mesh's data x fsdp devices)
    max_prompt_len: int  # the prompt budget in tokens (history cut from the oldest exchange)
    temperature: float = 0.0  # 0: greedy
    seed: int = 0  # sampling, when temperature > 0


@dataclasses.dataclass(frozen=True)
class Batch:
    """The real rows of one generated batch."""

    indices: list[int]  # into the samples given
    texts: list[str]
    lengths: list[int]  # generated tokens, the stop token included
    truncated: list[bool]  # no stop token within max_new_tokens


def generate_batches(model: Decoder, tokenizer: Tokenizer, samples: Sequence[TurnSample], settings: Settings,
                     mesh) -> Iterator[Batch]:
    """Completions of every sample's prompt, a batch at a time, in sample order (module docstring).
    `samples` that cannot fit `settings.max_prompt_len` never appear in a batch."""
    if not samples:
        return
    batch_config = BatchConfig(global_batch_size=settings.batch_size, max_length=settings.max_prompt_len,
                               shuffle=False, num_epochs=1, drop_remainder=False)
    pipeline = grpo_pipeline(samples, tokenizer, batch_config, subset="all", process_index=0, process_count=1)
    graphdef, params = nnx.split(model)
    sampler = make_sampler(graphdef, SamplingConfig(
        num_samples=1, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
        stop_ids=tuple(tokenizer.stop_ids), pad_id=tokenizer.pad_id))
    key = jax.random.key(settings.seed)
    for number, batch in enumerate(pipeline):
        n = int(batch["valid"].sum())  # real rows first; the pipeline fills a short last batch up
        out = sampler(params, scaffold.distribute(batch["prompt_tokens"], mesh),
                      scaffold.distribute(batch["prompt_mask"], mesh), jax.random.fold_in(key, number))
        tokens, length, trunc = (sharding.to_host(a)[:n] for a in (out.tokens, out.lengths, out.truncated))
        yield Batch(indices=[int(i) for i in batch["sample_index"][:n]],
                    texts=[completion_text(tokenizer, tokens[r], int(length[r]), bool(trunc[r])) for r in range(n)],
                    lengths=[int(x) for x in length], truncated=[bool(x) for x in trunc])


def evaluate_generations(model: Decoder, tokenizer: Tokenizer, samples: Sequence[TurnSample], *,
                         max_new_tokens: int, batch_size: int, max_prompt_len: int, mesh,
                         return_completions: bool = False) -> dict:
    """Greedy-decodes every sample's prompt and scores the completions' format and emotion (SFT's check).

    Returns:
      {"format_valid_rate", "emotion_accuracy", "mean_completion_length", "truncation_rate",
       "num_samples" (scored), "num_dropped" (prompts that did not fit)}, and with `return_completions`
      "completions": [{"sample", "text", "score"}, ...].
    """
    settings = Settings(max_new_tokens=max_new_tokens, batch_size=max(1, min(batch_size, len(samples))),
                        max_prompt_len=max_prompt_len)
    batches = list(generate_batches(model, tokenizer, samples, settings, mesh))
    indices = [i for b in batches for i in b.indices]
    texts = [t for b in batches for t in b.texts]
    metrics = score_texts(texts, [samples[i].emotion for i in indices], [x for b in batches for x in b.lengths],
                          [x for b in batches for x in b.truncated])
    metrics["num_dropped"] = len(samples) - len(indices)
    if metrics["num_dropped"]:
        logging.warning("%d of %d prompts did not fit max_prompt_len=%d and were not evaluated.",
                        metrics["num_dropped"], len(samples), max_prompt_len)
    if return_completions:
        metrics["completions"] = [
            {"sample": i, "text": t, "score": dataclasses.asdict(score_text(t, samples[i].emotion))}
            for i, t in zip(indices, texts)
        ]
    return metrics


def format_comparison(before: Mapping[str, float] | None, after: Mapping[str, float]) -> list[str]:
    """Lines like "format-valid rate: 0.00 -> 0.91" for the headline metrics ("n/a" when unknown)."""
    lines = []
    for key, label in HEADLINE_METRICS.items():
        old = "n/a" if before is None or before.get(key) is None else f"{before[key]:.2f}"
        lines.append(f"{label}: {old} -> {after[key]:.2f}")
    return lines
