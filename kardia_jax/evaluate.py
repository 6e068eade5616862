"""Evaluation of greedy generations: format-valid rate, emotion accuracy, completion length, truncation.

    metrics = evaluate_generations(model, tokenizer, samples, max_new_tokens=256, batch_size=32,
                                   max_prompt_len=768)
    # {"format_valid_rate": 0.91, "emotion_accuracy": 0.42, "mean_completion_length": 71.3,
    #  "truncation_rate": 0.02, "num_samples": 64, "num_dropped": 0}

Scoring is on text, the way a reader sees a reply: a completion is the generated ids up to (not
including) its stop token, decoded with the special tokens kept; it is *format valid* when
`parse_spans` accepts it (all four spans, in order, non-empty, nothing outside them) and *emotion
correct* when, in addition, its emotion span normalizes to the sample's gold label.

Judge-based scores plug in as `scorers`: callables `(samples, completions) -> {name: per-sample
scores}` whose means join the metrics (the rubric judge's Relevance, Empathy, ... will be one).

Command line (a checkpoint is a Hugging Face directory such as `<workdir>/sft/hf`, or an Orbax
checkpoint directory such as `<workdir>/sft` (newest step) or `<workdir>/sft/120`):

    python -m kardia_jax.evaluate --config=configs/tiny_cpu.py --checkpoint=runs/tiny_cpu/sft/hf
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from kardia_jax.models import loading
from kardia_jax import checkpoints, console, scaffold, sharding, storage
from kardia_jax import config as config_lib
from kardia_jax.data.pipeline import BatchConfig, grpo_pipeline, load_samples
from kardia_jax.data.prompts import DifficultyRule
from kardia_jax.data.schema import TurnSample
from kardia_jax.spans import normalize_emotion, parse_spans
from kardia_jax.models import Decoder
from kardia_jax.models.tokenizer import Tokenizer
from kardia_jax.sampling import SamplingConfig, make_sampler

# (samples, completion texts) -> {metric name: one score per sample}; the means are reported.
Scorer = Callable[[Sequence[TurnSample], Sequence[str]], Mapping[str, Sequence[float]]]

# Metric name -> how it is printed in a before -> after comparison.
HEADLINE_METRICS = {"format_valid_rate": "format-valid rate", "emotion_accuracy": "emotion accuracy"}


# -- scoring text --------------------------------------------------------------------------------


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


# -- generating ----------------------------------------------------------------------------------


def generate_completions(model: Decoder, tokenizer: Tokenizer, samples: Sequence[TurnSample], *,
                         max_new_tokens: int, batch_size: int, max_prompt_len: int, mesh=None):
    """Greedy completions of every sample's prompt.

    Prompts are left-padded to the pipeline's length buckets (so there is one compiled sampler per
    bucket) and overlong histories lose their oldest exchanges; a prompt that does not fit even then
    is skipped. The pipeline fills the last batch up with copies of its first row (`valid` 0) so every
    batch has `batch_size` rows (one program per bucket).

    Returns (kept sample indices, texts, lengths, truncated), in sample order.
    """
    batch_size = max(1, min(batch_size, len(samples)))
    batch_config = BatchConfig(global_batch_size=batch_size, max_length=max_prompt_len, shuffle=False,
                               num_epochs=1, drop_remainder=False)
    pipeline = grpo_pipeline(samples, tokenizer, batch_config, subset="all", process_index=0, process_count=1)
    graphdef, params = nnx.split(model)
    sampler = make_sampler(graphdef, SamplingConfig(
        num_samples=1, max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=tuple(tokenizer.stop_ids),
        pad_id=tokenizer.pad_id))
    place = (lambda x: scaffold.replicate(x, mesh)) if mesh is not None else (lambda x: x)
    key = jax.random.key(0)  # unused by greedy decoding

    indices, texts, lengths, truncated = [], [], [], []
    for batch in pipeline:
        n = int(batch["valid"].sum())  # real rows first; the pipeline fills a short last batch up
        out = sampler(params, place(batch["prompt_tokens"]), place(batch["prompt_mask"]), key)
        tokens, length, trunc = (sharding.to_host(a)[:n] for a in (out.tokens, out.lengths, out.truncated))
        for row in range(n):
            indices.append(int(batch["sample_index"][row]))
            texts.append(completion_text(tokenizer, tokens[row], int(length[row]), bool(trunc[row])))
            lengths.append(int(length[row]))
            truncated.append(bool(trunc[row]))
    return indices, texts, lengths, truncated


def evaluate_generations(model: Decoder, tokenizer: Tokenizer, samples: Sequence[TurnSample], *,
                         max_new_tokens: int, batch_size: int, max_prompt_len: int, mesh=None,
                         scorers: Sequence[Scorer] = (), return_completions: bool = False) -> dict:
    """Greedy-decodes every sample's prompt and scores the completions (see the module docstring).

    Args:
      model, tokenizer: the policy (possibly sharded; pass its `mesh` then) and its tokenizer.
      samples: the turn samples to evaluate (e.g. the test split).
      max_new_tokens: generation budget; a completion that reaches it without a stop token is truncated.
      batch_size: prompts per sampler call.
      max_prompt_len: prompt budget in tokens (history truncated from the oldest exchange).
      scorers: extra per-sample scorers (e.g. the rubric judge); their means are added by name.
      return_completions: also return {"completions": [{"sample", "text", "score"}, ...]}.

    Returns:
      {"format_valid_rate", "emotion_accuracy", "mean_completion_length", "truncation_rate",
       "num_samples" (scored), "num_dropped" (prompts that did not fit), **scorer means}.
    """
    indices, texts, lengths, truncated = generate_completions(
        model, tokenizer, samples, max_new_tokens=max_new_tokens, batch_size=batch_size,
        max_prompt_len=max_prompt_len, mesh=mesh)
    kept = [samples[i] for i in indices]
    metrics = score_texts(texts, [s.emotion for s in kept], lengths, truncated)
    metrics["num_dropped"] = len(samples) - len(kept)
    if metrics["num_dropped"]:
        logging.warning("%d of %d prompts did not fit max_prompt_len=%d and were not evaluated.",
                        metrics["num_dropped"], len(samples), max_prompt_len)
    for scorer in scorers:
        for name, values in scorer(kept, texts).items():
            if name in metrics:
                raise ValueError(f"scorer {scorer!r} returned the metric name {name!r}, which is already taken.")
            metrics[name] = float(np.mean(values)) if len(values) else 0.0
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


def eval_samples(config: ml_collections.ConfigDict, split: str | None = None, max_samples: int | None = None):
    """The turn samples of the evaluation split (config.data.test_split), the first `max_samples`
    (config.sft.eval_max_samples; 0: all)."""
    data = config.data
    samples, _ = load_samples(scaffold.data_source(data), split or data.test_split, data.on_bad_row,
                              DifficultyRule(kind=data.difficulty_rule), data.history)
    limit = config.sft.eval_max_samples if max_samples is None else max_samples
    return samples[:limit] if limit else samples


# -- loading a checkpoint ------------------------------------------------------------------------


def load_checkpoint(config: ml_collections.ConfigDict, checkpoint: str, mesh) -> tuple[Decoder, Tokenizer]:
    """The policy stored at `checkpoint`: a Hugging Face directory (config.json + safetensors, with its
    tokenizer files if any), or an Orbax checkpoint written by a trainer (its root: the newest step; or
    one step's directory). An Orbax checkpoint is read into the model `config.model` describes."""
    files = storage.listdir(checkpoint) if storage.isdir(checkpoint) else []
    if "config.json" in files and any(f.endswith(".safetensors") for f in files):
        return loading.load_policy(loading.with_checkpoint(config, checkpoint), mesh)

    root, step = checkpoint.rstrip("/"), None
    if os.path.basename(root).isdigit():
        root, step = os.path.dirname(root), int(os.path.basename(root))
    model, tokenizer = loading.load_policy(config, mesh)
    graphdef, state = nnx.split(model)
    ckpt = checkpoints.Checkpointer(root, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{checkpoint}: neither a Hugging Face directory (no config.json) nor an "
                                    "Orbax checkpoint directory (no complete step inside).")
        restored = ckpt.restore(step, nnx.to_pure_dict(state))
    finally:
        ckpt.close()
    logging.info("Loaded step %d of %s.", step, root)
    return nnx.merge(graphdef, restored.params), tokenizer


# -- command line --------------------------------------------------------------------------------

def _define_flags() -> None:
    """Command-line flags, defined only when this module is the program (so that importing it from
    another entry point, which defines its own --config, does not clash)."""
    config_flags.DEFINE_config_file("config", "configs/tiny_cpu.py", "Config file (get_config()).")
    flags.DEFINE_string("checkpoint", None, "HF directory or Orbax checkpoint directory.")
    flags.DEFINE_string("split", "", "Split to evaluate (default: config.data.test_split).")
    flags.DEFINE_integer("max_samples", -1, "Samples to evaluate (-1: config.sft.eval_max_samples; 0: all).")
    flags.DEFINE_integer("show", 2, "Completions to print.")


def main(argv):
    del argv
    args = flags.FLAGS
    config = args.config
    if not args.checkpoint:
        raise app.UsageError("--checkpoint is required (e.g. runs/tiny_cpu/sft/hf).")
    console.setup(config.distributed)
    config_lib.validate(config, "eval")
    mesh = sharding.mesh_from_config(config.mesh)
    with jax.set_mesh(mesh):
        model, tokenizer = load_checkpoint(config, args.checkpoint, mesh)
        config_lib.check_policy_positions(config, "eval", model.config)
        samples = eval_samples(config, args.split or None, None if args.max_samples < 0 else args.max_samples)
        metrics = evaluate_generations(
            model, tokenizer, samples, max_new_tokens=config.sft.eval_max_new_tokens,
            batch_size=config.sft.eval_batch_size,
            max_prompt_len=config.data.max_length - config.sft.eval_max_new_tokens, mesh=mesh,
            return_completions=True)
    if jax.process_index() == 0:
        for c in metrics.pop("completions")[:args.show]:
            print(f"--- sample {c['sample']} (gold {samples[c['sample']].emotion}): {c['text']}")
        for key, value in metrics.items():
            print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
