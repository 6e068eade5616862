"""The rubric judge in evaluation: the five criterion scores of finished completions on the paper's 1-5
scale, in one of two modes.

  read     the judge's expected score over the tokens "1".."5" after each criterion's suffix
           ("<Criterion> score: "): training's in-graph scorer (`RubricJudge.score_prompts`, prefix
           shared), reported as 1 + 4·score.
  decoded  the judge writes its reply after the same prompt and suffix (greedy, `decode_tokens` new
           tokens), and the score is read from the text (`parse_score`): the paper's protocol. Each
           (completion, criterion) prompt is prefilled whole, about five times the read mode's prefill.

Both modes give a completion without a response span the rubric's worst score (1) on every criterion,
without asking the judge. A decoded reply that does not parse scores 1 as well; it is counted
(`JudgeScores.parsed`) and kept, not dropped.

Rows are split over the mesh's batch axes (`scaffold.distribute`), as in training; on several processes
every process holds the same host inputs and gets every score back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from kardia_jax import scaffold, sharding
from kardia_jax.data.schema import TurnSample
from kardia_jax.rewards import rubric
from kardia_jax.rewards.judge import RubricJudge
from kardia_jax.rewards.judge_prompts import NUM_CRITERIA, left_padded
from kardia_jax.sampling import SamplingConfig, make_sampler

MODES = ("read", "decoded")


def parse_score(reply: str) -> int | None:
    """The score a judge reply gives: the digit 1-5 it starts with, after whitespace ("4", " 4\\n",
    "4/5" -> 4); None when it starts with anything else ("four", "0", "", "Score: 4"). The score digits
    are single tokens of the judge's tokenizer (`judge_prompts.score_token_ids`), so this is the first
    token the judge writes after its suffix, the one the read mode's distribution is over."""
    text = reply.lstrip()
    return int(text[0]) if text[:1] in rubric.SCORE_TOKENS else None


@dataclasses.dataclass(frozen=True)
class JudgeScores:
    """What the judge says of N completions (criteria in RUBRIC_CRITERIA order)."""

    scores: np.ndarray  # [N, 5] float64 on 1..5
    has_response: np.ndarray  # [N] bool: the completion has a response span (else scores are 1, unasked)
    parsed: np.ndarray | None = None  # decoded: [N, 5] bool, the reply parsed (True where not asked)
    replies: list[list[str]] | None = None  # decoded: [N][5] the judge's reply texts ("" where not asked)


class EvaluationJudge:
    """Scores completion texts with a loaded `RubricJudge` (and its parameters), in either mode.

    Args:
      judge, params: `rewards.judge.load_judge`'s judge and parameters (sharded over `mesh`).
      mesh: the mesh the rows are split over.
      rows: completions per call; a multiple of the mesh's data x fsdp devices. Shorter lists are padded
        (one compiled program per mode).
      decode_tokens: new tokens of each decoded reply.
    """

    def __init__(self, judge: RubricJudge, params, mesh, *, rows: int, decode_tokens: int):
        self.judge, self.params, self.mesh, self.rows = judge, params, mesh, int(rows)
        self.decode_tokens = int(decode_tokens)
        tokenizer = judge.tokenizer
        self._decode = make_sampler(judge.graphdef, SamplingConfig(
            num_samples=1, max_new_tokens=self.decode_tokens, temperature=0.0,
            stop_ids=tuple(tokenizer.stop_ids), pad_id=tokenizer.pad_id))
        self.decoded_length = judge.prompt_length + judge.suffix_ids.shape[1]  # a whole prompt with its suffix
        limit = judge.model_config.max_position_embeddings
        if self.decoded_length + self.decode_tokens > limit:
            raise ValueError(
                f"eval.judge_decode_tokens={self.decode_tokens}: decoded judge replies end at position "
                f"{self.decoded_length + self.decode_tokens}, past the judge model's max_position_embeddings="
                f"{limit}; lower eval.judge_decode_tokens or judge.max_context_tokens / judge.max_response_tokens.")

    def score(self, mode: str, samples: Sequence[TurnSample], completions: Sequence[str]) -> JudgeScores:
        """The scores of completion texts (span markers kept, stop token removed), one sample each."""
        if mode not in MODES:
            raise ValueError(f"judge mode {mode!r}: use one of {MODES}.")
        if len(samples) != len(completions) or len(completions) > self.rows:
            raise ValueError(f"EvaluationJudge.score: {len(completions)} completions for {len(samples)} samples, "
                             f"at most {self.rows} per call.")
        n, pad = len(completions), self.rows - len(completions)
        texts, rows = list(completions) + list(completions[-1:]) * pad, list(samples) + list(samples[-1:]) * pad
        prompts = self.judge.assemble_texts(texts, rows)  # numpy JudgePrompts, B = N (one context each)
        has_response = (prompts.response_mask.sum(axis=1) > len(self.judge.tail_ids))[:n]
        if mode == "read":
            placed = type(prompts)(*(scaffold.distribute(x, self.mesh) for x in prompts))
            read = sharding.to_host(self.judge.score_prompts_jit(self.params, placed))[:n]  # [N, 5] in [0, 1]; 0 without a span
            return JudgeScores(1.0 + 4.0 * read.astype(np.float64), has_response)
        replies = self._replies(prompts)[:n]
        parsed_scores = [[parse_score(reply) for reply in row] for row in replies]
        parsed = np.asarray([[s is not None for s in row] for row in parsed_scores]) | ~has_response[:, None]
        scores = np.asarray([[float(s or 1) for s in row] for row in parsed_scores])
        scores[~has_response] = 1.0
        replies = [row if ok else [""] * NUM_CRITERIA for row, ok in zip(replies, has_response)]
        return JudgeScores(scores, has_response, parsed, replies)

    def _replies(self, prompts) -> list[list[str]]:
        """[rows][5] greedy reply texts, one per (completion, criterion) prompt (row i·5 + c), decoded in
        calls of `rows` prompts."""
        judge = self.judge
        full, full_mask = judge.full_prompts(prompts)  # [rows, L]
        suffixes = [judge.suffix_ids[c][judge.suffix_mask[c] > 0] for c in range(NUM_CRITERIA)]
        ids = [[*full[i][full_mask[i] > 0], *suffixes[c]] for i in range(len(full)) for c in range(NUM_CRITERIA)]
        tokens, mask = left_padded(ids, self.decoded_length, judge.tokenizer.pad_id)  # [rows·5, L + S]
        key = jax.random.key(0)  # greedy: unused
        stops = set(judge.tokenizer.stop_ids)
        texts = []
        for start in range(0, len(tokens), self.rows):
            out = self._decode(self.params, scaffold.distribute(tokens[start:start + self.rows], self.mesh),
                               scaffold.distribute(mask[start:start + self.rows], self.mesh), key)
            new, lengths = sharding.to_host((out.tokens, out.lengths))
            texts += [judge.tokenizer.decode([int(t) for t in row[:length] if int(t) not in stops])
                      for row, length in zip(new, lengths)]
        return [texts[i:i + NUM_CRITERIA] for i in range(0, len(texts), NUM_CRITERIA)]
