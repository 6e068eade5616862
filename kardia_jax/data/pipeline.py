"""Grain input pipelines: SFT batches and GRPO prompt batches, sharded, shuffled, checkpointable.

    samples = load_samples(source, "train")                      # list[TurnSample]
    pipe = sft_pipeline(samples, tokenizer, BatchConfig(global_batch_size=128, max_length=1024))
    it = iter(pipe)                                              # grain DatasetIterator
    batch = next(it)                                             # dict of int32 numpy arrays
    state = it.get_state(); ...; it.set_state(state)             # or grain.checkpoint.CheckpointSave(it)

How a pipeline is built, and why:
  1. Subset: the samples whose `difficulty` is `subset` ("easy" for SFT, "hard" for GRPO, or "all").
  2. Tokenize every selected sample up front, on every process, with the same result everywhere.
     Overlong samples lose their oldest user/assistant pairs until they fit ("truncate") or are
     dropped ("drop"); `LengthStats` reports the counts. Doing this eagerly, before sharding, makes
     every process see the same number of samples and so run the same number of steps (a multi-host
     must), and gives exact length statistics; the batched encode of a fast tokenizer makes it cheap.
  3. `grain.MapDataset` over the tokenized examples: a seeded global shuffle (a fresh permutation per
     epoch), trimmed to a multiple of the process count.
  4. Global batches of `global_batch_size` consecutive examples; process p keeps rows p, p + N, …
     (N processes: disjoint shards that cover the data), padded to the smallest allowed bucket length
     that fits the longest example of the *global* batch, so every process builds the same shapes and
     the trainer compiles one program per bucket. Each epoch is batched on its own; with
     `drop_remainder` the incomplete last batch of an epoch is dropped, without it it is filled up
     with rows whose `valid` is 0.
  5. `repeat` for `num_epochs`, `to_iter_dataset`, and optionally `mp_prefetch` worker processes.

The iterator's state is Grain's (`get_state()`/`set_state()`, a small dict); Orbax saves it with
`grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore(iterator)`. A restored iterator
continues with exactly the batch that would have come next.

Batches (numpy int32; B = global_batch_size // process_count), each with
    valid       [B]     1 on real rows, 0 on the filler rows of a short last batch (see 4.)
  SFT, right-padded to T:
    tokens      [B, T]  prompt (chat template, generation prompt) + target + end-of-turn id, then pad_id
    input_mask  [B, T]  1 on real tokens
    loss_mask   [B, T]  1 on the target tokens and the end-of-turn id that ends them: the positions t
                        whose token the model predicts from position t-1 (use loss_mask[:, 1:] with
                        logits[:, :-1])
    positions   [B, T]  t on real tokens, 0 on padding
  GRPO, left-padded to P (the prompt ends with the generation prompt, e.g. "<|im_start|>assistant\\n"):
    prompt_tokens [B, P]
    prompt_mask   [B, P]  1 on real tokens
    emotion_id    [B]     gold label, index into EMOTIONS
    sample_index  [B]     index into `Pipeline.samples` (persona, context, … of the prompt)
    judge_context {name: [B, ...]}  with `contexts` (e.g. the judge's context_ids, context_mask [B, C])
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import grain
import jax
import numpy as np
from absl import logging

from kardia_jax.data.prompts import DifficultyRule, expand_dialogues
from kardia_jax.data.schema import TurnSample
from kardia_jax.data.sources import LoadStats, load_dialogues
from kardia_jax.spans import EMOTIONS
from kardia_jax.models.tokenizer import Tokenizer

SUBSETS = ("easy", "hard", "all")
OVERLONG = ("truncate", "drop")


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """How to batch. `max_length` bounds the whole sequence for SFT and the prompt for GRPO."""

    global_batch_size: int
    max_length: int
    # Allowed padded lengths, ascending, the last >= max_length. None: powers of two from 64 below
    # max_length, then max_length itself (e.g. 64, 128, 256, 384 for 384).
    bucket_lengths: tuple[int, ...] | None = None
    overlong: str = "truncate"  # "truncate": drop the oldest history pairs until it fits; "drop"
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = 1  # None: repeat forever
    drop_remainder: bool = True
    worker_count: int = 0  # grain worker processes (0: none); they need absl flags parsed (absl.app.run does)
    worker_buffer_size: int = 2  # batches each worker keeps ready

    def buckets(self) -> tuple[int, ...]:
        if self.bucket_lengths is None:
            powers = [1 << k for k in range(6, self.max_length.bit_length()) if (1 << k) < self.max_length]
            return (*powers, self.max_length)
        buckets = tuple(sorted(self.bucket_lengths))
        if buckets[-1] < self.max_length:
            raise ValueError(f"bucket_lengths {buckets} end below max_length {self.max_length}: add "
                             f"{self.max_length} to bucket_lengths or lower max_length.")
        return buckets


@dataclasses.dataclass(frozen=True)
class LengthStats:
    """Samples of the subset, how many were kept whole, kept after truncation, or dropped as too long."""

    samples: int
    kept: int
    truncated: int
    dropped: int
    lengths: np.ndarray  # [kept] token lengths (SFT: whole sequence; GRPO: prompt)

    def summary(self) -> str:
        if not self.kept:
            return f"0 of {self.samples} samples kept ({self.dropped} too long)"
        p50, p90 = np.percentile(self.lengths, [50, 90])
        return (f"{self.kept} of {self.samples} samples kept ({self.truncated} with history truncated, "
                f"{self.dropped} dropped as too long); tokens p50 {p50:.0f}, p90 {p90:.0f}, max {self.lengths.max()}")


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A batch pipeline. `iter(pipeline)` gives a fresh, checkpointable Grain iterator."""

    dataset: grain.IterDataset
    samples: Sequence[TurnSample]  # what `sample_index` indexes: the samples given to the builder
    length_stats: LengthStats
    batches_per_epoch: int  # per process (every process runs the same number)
    local_batch_size: int

    def __iter__(self):
        return iter(self.dataset)


def load_samples(source: str, split: str, on_bad_row: str = "raise", rule: DifficultyRule = DifficultyRule(),
                 history: str = "response") -> tuple[list[TurnSample], LoadStats]:
    """The turn samples of a split (see `sources.load_dialogues` for `source` and `on_bad_row`, and
    `prompts.HISTORY_MODES` for how `history` renders earlier assistant turns)."""
    dialogues, stats = load_dialogues(source, split, on_bad_row)
    return expand_dialogues(dialogues, rule, history), stats


def sft_pipeline(samples: Sequence[TurnSample], tokenizer: Tokenizer, config: BatchConfig, *,
                 subset: str = "easy", process_index: int | None = None,
                 process_count: int | None = None) -> Pipeline:
    """Right-padded SFT batches (tokens, input_mask, loss_mask, positions) of the `subset` samples."""
    indices = _select(samples, subset)
    targets = tokenizer.encode_batch([samples[i].target for i in indices])
    budgets = [config.max_length - len(t) - 1 for t in targets]  # room left for the prompt
    prompts, stats = _fit_prompts([samples[i] for i in indices], tokenizer, budgets, config.overlong)
    examples = []
    for prompt, target in zip(prompts, targets):
        if prompt is not None:
            tokens = np.asarray(prompt + target + [tokenizer.eos_id], np.int32)
            examples.append({"tokens": tokens, "target_start": len(prompt)})
    stats = dataclasses.replace(stats, lengths=np.array([len(e["tokens"]) for e in examples], np.int32))
    logging.info("SFT pipeline (%s): %s.", subset, stats.summary())
    return _build(samples, examples, stats, _SftBatch(tokenizer.pad_id, config.buckets()), config,
                  process_index, process_count)


def grpo_pipeline(samples: Sequence[TurnSample], tokenizer: Tokenizer, config: BatchConfig, *,
                  subset: str = "hard", contexts: Callable[[Sequence[TurnSample]], dict[str, np.ndarray]] | None = None,
                  context_buckets: int = 1, process_index: int | None = None,
                  process_count: int | None = None) -> Pipeline:
    """Left-padded GRPO prompt batches (prompt_tokens, prompt_mask, emotion_id, sample_index, and
    judge_context when `contexts` is given).

    contexts: samples -> {name: [n, ...] array of fixed shape per sample}, e.g. the rubric judge's
    `prepare_contexts`. Called once, up front, on every kept sample (as the prompts are tokenized, step 2
    of the module docstring); each batch then carries its rows under "judge_context", so the training
    loop only puts them on the mesh. The arrays are right-padded [n, C] with a "context_mask"; a batch's
    are cut to the narrowest of `context_buckets` widths (`context_widths`) that holds its longest
    context, chosen like the prompt length from the whole global batch, so that short contexts are not
    read at the full width C (each width is one more compiled program of the judge).
    """
    indices = _select(samples, subset)
    prompts, stats = _fit_prompts([samples[i] for i in indices], tokenizer, [config.max_length] * len(indices),
                                  config.overlong)
    kept = [(i, prompt) for i, prompt in zip(indices, prompts) if prompt is not None]
    examples = [
        {"prompt_tokens": np.asarray(prompt, np.int32), "emotion_id": EMOTIONS.index(samples[i].emotion),
         "sample_index": i}
        for i, prompt in kept
    ]
    widths = ()  # with one bucket, the contexts keep the shape `contexts` gives them
    if contexts is not None and kept:
        arrays = contexts([samples[i] for i, _ in kept])  # {name: [n, C]}
        if context_buckets > 1:
            widths = context_widths(arrays["context_mask"].shape[1], context_buckets)
        for row, example in enumerate(examples):
            example["judge_context"] = {name: np.asarray(a[row]) for name, a in arrays.items()}
    stats = dataclasses.replace(stats, lengths=np.array([len(e["prompt_tokens"]) for e in examples], np.int32))
    logging.info("GRPO pipeline (%s): %s.", subset, stats.summary())
    return _build(samples, examples, stats, _PromptBatch(tokenizer.pad_id, config.buckets(), widths), config,
                  process_index, process_count)


def cut_contexts(arrays: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """Right-padded judge contexts {"context_ids", "context_mask": [B, C]} cut to the narrowest of
    `context_widths(C, count)` that holds their longest row (what a `grpo_pipeline` batch carries)."""
    widths = context_widths(arrays["context_mask"].shape[1], count)
    width = _bucket(int(np.asarray(arrays["context_mask"]).sum(axis=1).max()), widths)
    return {name: a[:, :width] for name, a in arrays.items()}


def context_widths(width: int, count: int, multiple: int = 64) -> tuple[int, ...]:
    """The `count` judge-context widths of a budget of `width` tokens: width / 2^k for k < count, rounded
    up to a multiple of `multiple`, ascending, the last `width` itself (e.g. 1536, 3: 384, 768, 1536)."""
    if count < 1:
        raise ValueError(f"context_buckets={count}: need at least 1 (1: every context at the full width).")
    round_up = lambda n: -(-n // multiple) * multiple
    return tuple(sorted({min(width, round_up(-(-width // 2 ** k))) for k in range(count)}))


def _select(samples: Sequence[TurnSample], subset: str) -> list[int]:
    if subset not in SUBSETS:
        raise ValueError(f"subset is '{subset}'; use one of {SUBSETS}.")
    return [i for i, s in enumerate(samples) if subset == "all" or s.difficulty == subset]


def _fit_prompts(samples: list[TurnSample], tokenizer: Tokenizer, budgets: list[int],
                 overlong: str) -> tuple[list[list[int] | None], LengthStats]:
    """Prompt ids (with generation prompt) of at most `budgets[i]` tokens, or None if dropped.

    Truncation removes whole user/assistant pairs from the front of the history (after the system
    message), so a prompt always keeps the persona, the situation and the user message it answers.
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong is '{overlong}'; use one of {OVERLONG}.")
    full = tokenizer.encode_batch([tokenizer.render_chat(s.prompt, add_generation_prompt=True) for s in samples])
    prompts, truncated = [], 0
    for sample, ids, budget in zip(samples, full, budgets):
        if len(ids) > budget and overlong == "truncate":
            ids = None
            for first_kept in range(3, len(sample.prompt), 2):  # index of the first user message kept
                shorter = (sample.prompt[0], *sample.prompt[first_kept:])
                candidate = tokenizer.encode_chat(shorter, add_generation_prompt=True)
                if len(candidate) <= budget:
                    ids = candidate
                    truncated += 1
                    break
        prompts.append(ids if ids is not None and len(ids) <= budget else None)
    dropped = sum(p is None for p in prompts)
    stats = LengthStats(samples=len(samples), kept=len(samples) - dropped, truncated=truncated, dropped=dropped,
                        lengths=np.zeros([0], np.int32))
    return prompts, stats


def _build(samples, examples, stats, batch_fn, config: BatchConfig, process_index, process_count) -> Pipeline:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if config.global_batch_size % process_count:
        raise ValueError(f"global_batch_size {config.global_batch_size} is not divisible by the {process_count} "
                         "processes; make it a multiple of the process count.")
    local_batch_size = config.global_batch_size // process_count
    per_process = len(examples) // process_count
    batches_per_epoch = per_process // local_batch_size if config.drop_remainder else -(-per_process // local_batch_size)
    if batches_per_epoch == 0:
        raise ValueError(f"{len(examples)} examples ({stats.summary()}) make no batch of {local_batch_size} on each "
                         f"of {process_count} processes; lower global_batch_size, pick another subset, or raise "
                         "max_length.")
    ds = grain.MapDataset.source(examples)
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    # Batches are formed over the *global* order: every process sees the whole global batch, picks the
    # padded length from all of its rows (so every process builds arrays of the same shape and runs the
    # same program, which a multi-host collective needs) and keeps rows process_index::process_count.
    ds = ds[:per_process * process_count]
    ds = ds.batch(config.global_batch_size, drop_remainder=config.drop_remainder,
                  batch_fn=_LocalRows(batch_fn, config.global_batch_size, process_index, process_count))
    if config.num_epochs != 1:
        ds = ds.repeat(config.num_epochs)
    iter_ds = ds.to_iter_dataset()
    if config.worker_count > 0:
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
    return Pipeline(dataset=iter_ds, samples=samples, length_stats=stats, batches_per_epoch=batches_per_epoch,
                    local_batch_size=local_batch_size)


def _bucket(length: int, buckets: tuple[int, ...]) -> int:
    return next(b for b in buckets if b >= length)


class _LocalRows:
    """This process's rows of a global batch, padded to a length chosen from all of its rows.

    A global batch short of `global_batch_size` (the last one, without `drop_remainder`) is filled up
    with copies of its first example whose `valid` is 0, so that every process gets the same number
    of rows and the batch still divides over the devices; consumers weight rows by `valid`.
    """

    def __init__(self, batch_fn, global_batch_size: int, process_index: int, process_count: int):
        self.batch_fn, self.global_batch_size = batch_fn, global_batch_size
        self.process_index, self.process_count = process_index, process_count

    def __call__(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
        examples = list(examples)
        valid = np.zeros(self.global_batch_size, np.int32)  # [global B]
        valid[:len(examples)] = 1
        examples += [examples[0]] * (self.global_batch_size - len(examples))
        rows = slice(self.process_index, None, self.process_count)
        return self.batch_fn(examples[rows], length=self.batch_fn.length(examples)) | {"valid": valid[rows]}


class _SftBatch:
    """Stacks SFT examples into a right-padded batch (a class, so worker processes can unpickle it)."""

    def __init__(self, pad_id: int, buckets: tuple[int, ...]):
        self.pad_id, self.buckets = pad_id, buckets

    def length(self, examples: Sequence[dict]) -> int:
        return _bucket(max(len(e["tokens"]) for e in examples), self.buckets)

    def __call__(self, examples: Sequence[dict], length: int) -> dict[str, np.ndarray]:
        tokens = np.full((len(examples), length), self.pad_id, np.int32)  # [B, T]
        input_mask = np.zeros((len(examples), length), np.int32)  # [B, T]
        loss_mask = np.zeros((len(examples), length), np.int32)  # [B, T]
        for row, example in enumerate(examples):
            n = len(example["tokens"])
            tokens[row, :n] = example["tokens"]
            input_mask[row, :n] = 1
            loss_mask[row, example["target_start"]:n] = 1
        positions = (np.arange(length, dtype=np.int32)[None, :] * input_mask).astype(np.int32)  # [B, T]
        return {"tokens": tokens, "input_mask": input_mask, "loss_mask": loss_mask, "positions": positions}


class _PromptBatch:
    """Stacks GRPO prompts into a left-padded batch, and their judge contexts (if any) cut to a width."""

    def __init__(self, pad_id: int, buckets: tuple[int, ...], context_widths: tuple[int, ...] = ()):
        self.pad_id, self.buckets, self.context_widths = pad_id, buckets, context_widths

    def length(self, examples: Sequence[dict]) -> tuple[int, int]:
        """(prompt length P, judge context width; 0 without contexts) of a global batch."""
        width = 0
        if self.context_widths:
            width = _bucket(max(int(e["judge_context"]["context_mask"].sum()) for e in examples), self.context_widths)
        return _bucket(max(len(e["prompt_tokens"]) for e in examples), self.buckets), width

    def __call__(self, examples: Sequence[dict], length: tuple[int, int]) -> dict[str, np.ndarray]:
        length, width = length
        prompt_tokens = np.full((len(examples), length), self.pad_id, np.int32)  # [B, P]
        prompt_mask = np.zeros((len(examples), length), np.int32)  # [B, P]
        for row, example in enumerate(examples):
            n = len(example["prompt_tokens"])
            prompt_tokens[row, length - n:] = example["prompt_tokens"]
            prompt_mask[row, length - n:] = 1
        batch = {
            "prompt_tokens": prompt_tokens,
            "prompt_mask": prompt_mask,
            "emotion_id": np.array([e["emotion_id"] for e in examples], np.int32),  # [B]
            "sample_index": np.array([e["sample_index"] for e in examples], np.int32),  # [B]
        }
        if "judge_context" in examples[0]:  # e.g. context_ids, context_mask [B, C or a narrower width]
            cut = slice(None, width or None)  # right-padded: the columns past `width` are padding
            batch["judge_context"] = {name: np.stack([e["judge_context"][name][cut] for e in examples])
                                      for name in examples[0]["judge_context"]}
        return batch
