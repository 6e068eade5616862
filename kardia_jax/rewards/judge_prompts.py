"""The judge's prompts as token ids, built on the host: the judge tokenizer's side of the rubric judge.

`rubric.py` says what the judge is asked (text); this module turns it into judge token ids; `judge.py`
packs them in-graph and reads the scores. The prompt of completion i (of prompt p = i // G, the
sampler's order) and criterion c is HEAD + CONTEXT_p + MID + RESPONSE_i + TAIL + SUFFIX_c, in two
variable blocks (`JudgePrompts`, all int32, left-padded; C = max_context_tokens, R = max_response_tokens):

    context   [B, C + len(MID)]   persona + dialogue context (`context_ids`), then MID
    response  [N, R + len(TAIL)]  the completion's response span, then TAIL

HEAD, MID, TAIL and the five suffixes are constants (`PromptBuilder`, tokenized once).

The response span (the same rule on ids in-graph, `RubricJudge.response_mask`, and on text here,
`response_ids`):
  * if the completion holds `<|response_begin|>` and `<|response_end|>` exactly once each, begin before
    end: the tokens strictly between them, less every span marker and stop token, whitespace-only tokens
    at both ends trimmed, the first R tokens kept;
  * otherwise (broken format, e.g. a completion truncated inside its response): no span, and the
    completion scores 0 (`RubricJudge.score_prompts`).
  On text: the same markers and counts on the decoded completion, split at markers and stop strings;
  each piece is tokenized on its own (a marker splits the tokenization on the id side too) and the same
  trimming applies to the ids. The paths agree token for token when the policy's completion ids are
  the canonical tokenization of their text (`encode(decode(ids)) == ids` piecewise); a sampled,
  non-canonical tokenization is re-canonicalized by the host path only.

`same_vocabulary` decides whether the judge can read the policy's ids as they are (every policy token,
span markers aside, has the same id for the judge) or must re-tokenize the completions' text.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from absl import logging

from kardia_jax.data.schema import TurnSample
from kardia_jax.rewards import rubric
from kardia_jax.rewards.combine import RUBRIC_CRITERIA
from kardia_jax.spans import MARKER_TOKENS, SPAN_MARKERS

NUM_CRITERIA = len(RUBRIC_CRITERIA)


class JudgePrompts(NamedTuple):
    """The judge prompts of N = B·G completions after HEAD: the two blocks the scorer prefills (module
    docstring). int32, left-padded; completion i reads context row i // G. numpy or jax arrays."""

    context: Any  # [B, C + len(MID)]: persona + dialogue context, then MID
    context_mask: Any  # [B, C + len(MID)]
    response: Any  # [N, R + len(TAIL)]: the response span, then TAIL
    response_mask: Any  # [N, R + len(TAIL)]


def score_token_ids(tokenizer) -> np.ndarray:
    """[5] int32: the ids of "1".."5" in the judge's tokenizer. Raises if one is not a single token."""
    ids = []
    for digit in rubric.SCORE_TOKENS:
        encoded = list(tokenizer.encode(digit))
        if len(encoded) != 1:
            raise ValueError(
                f"The judge reads its score as one token per digit, but its tokenizer ({type(tokenizer).__name__}) "
                f"encodes {digit!r} as {len(encoded)} tokens {encoded}. Use a judge whose tokenizer has the "
                f"digits {rubric.SCORE_TOKENS} as single tokens (Qwen, Gemma and Llama tokenizers do)."
            )
        ids.append(encoded[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"The judge's tokenizer maps the score digits {rubric.SCORE_TOKENS} to repeated ids {ids}.")
    return np.asarray(ids, np.int32)


def _vocabulary(tokenizer) -> dict[str, int] | None:
    hf = getattr(tokenizer, "hf", None)
    if hf is not None:
        return dict(hf.get_vocab())
    sp = getattr(tokenizer, "sp", None)
    if sp is not None:
        vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
        return vocab | dict(getattr(tokenizer, "_special_ids", {}))
    return None


def same_vocabulary(policy_tokenizer, judge_tokenizer) -> bool:
    """True when every policy token except the span markers has the same id for the judge: the same
    tokenizer, or a judge whose vocabulary extends the policy's (as Qwen3's is meant to extend Qwen2.5's)."""
    if policy_tokenizer is judge_tokenizer:
        return True
    policy, judge = _vocabulary(policy_tokenizer), _vocabulary(judge_tokenizer)
    if policy is None or judge is None:
        return False
    markers = set(MARKER_TOKENS)
    return all(judge.get(token) == i for token, i in policy.items() if token not in markers)


def group_size(n: int, b: int) -> int:
    """G = N // B for N completions over B prompts' contexts; raises unless B divides N."""
    if not b or n % b:
        raise ValueError(f"judge: {n} completions need one prompt's context each or B contexts with N = B·G; got {b}.")
    return n // b


class PromptBuilder:
    """The judge prompt's constant ids and the host tokenization of its variable parts (module docstring).

    Args:
      tokenizer: the judge's tokenizer.
      policy_tokenizer: the policy's tokenizer (default: the judge's): its span-marker and stop ids are
        what the completions hold, and it decodes them for the host path.
      max_context_tokens: C, the budget of persona + situation + conversation.
      max_response_tokens: R, the budget of the response span.
      vocab_size: the judge model's embedding rows; larger ids never reach it.
      max_positions: the judge model's max_position_embeddings; a longer prompt is an error.
    """

    def __init__(self, tokenizer, policy_tokenizer=None, *, max_context_tokens: int, max_response_tokens: int,
                 vocab_size: int, max_positions: int):
        self.score_ids_array = score_token_ids(tokenizer)  # [5]; raises first if the digits are not single tokens
        self.tokenizer = tokenizer
        self.policy_tokenizer = policy_tokenizer if policy_tokenizer is not None else tokenizer
        self.max_context_tokens = int(max_context_tokens)
        self.max_response_tokens = int(max_response_tokens)
        self.vocab_size = int(vocab_size)

        self.template = rubric.judge_template(tokenizer)
        encode = lambda text: np.asarray(tokenizer.encode(text), np.int32)
        self.head_ids, self.mid_ids, self.tail_ids = (encode(p) for p in (self.template.head, self.template.mid, self.template.tail))
        suffixes = [encode(s) for s in self.template.suffixes]
        width = max(len(s) for s in suffixes)
        self.suffix_ids, self.suffix_mask = left_padded(suffixes, width, tokenizer.pad_id)  # [5, S]
        self.context_length = self.max_context_tokens + len(self.mid_ids)  # the context block's width
        self.response_length = self.max_response_tokens + len(self.tail_ids)  # the response block's width
        self.prompt_length = len(self.head_ids) + self.context_length + self.response_length  # L, one contiguous prompt
        longest = self.prompt_length + width  # a whole prompt with its longest criterion suffix
        if longest > max_positions:
            fixed = longest - self.max_context_tokens - self.max_response_tokens  # rubric text and suffix
            raise ValueError(
                f"The judge reads prompts of up to {longest} tokens ({fixed} of rubric and suffix + "
                f"judge.max_context_tokens={self.max_context_tokens} + judge.max_response_tokens="
                f"{self.max_response_tokens}), past the judge model's max_position_embeddings="
                f"{max_positions}: lower config.judge.max_context_tokens or "
                "config.judge.max_response_tokens.")
        constant = np.concatenate([self.head_ids, self.mid_ids, self.tail_ids, self.suffix_ids.ravel(), self.score_ids_array])
        if constant.max() >= self.vocab_size:
            raise ValueError(f"The judge prompt uses token id {constant.max()} but the judge model has only "
                             f"{self.vocab_size} embedding rows: the judge tokenizer does not belong to the judge model.")
        for suffix in self.template.suffixes:
            with_digit = tokenizer.encode(suffix + rubric.SCORE_TOKENS[0])
            if with_digit != tokenizer.encode(suffix) + [int(self.score_ids_array[0])]:
                logging.warning("The judge tokenizer merges the score digit into the end of %r, so the judge is "
                                "read at a token boundary its own text would not have.", suffix)

        policy = self.policy_tokenizer
        self.marker_ids = np.asarray([policy.marker_ids[m] for m in MARKER_TOKENS], np.int32)  # [8], policy ids
        self.response_begin_id = policy.marker_ids[SPAN_MARKERS["response"][0]]
        self.response_end_id = policy.marker_ids[SPAN_MARKERS["response"][1]]
        self.stop_ids = np.asarray(policy.stop_ids, np.int32)
        # The host path cuts a completion's text at every marker and stop string.
        stop_texts = [policy.decode([i]) for i in policy.stop_ids]
        cuts = sorted({*MARKER_TOKENS, *(s for s in stop_texts if s)}, key=len, reverse=True)
        self._cut_pattern = re.compile("|".join(re.escape(s) for s in cuts))

    @functools.cached_property
    def whitespace_table(self) -> np.ndarray:
        """[V_judge] bool: ids that decode (alone) to whitespace or nothing; trimmed at the response's ends."""
        table = np.zeros(self.vocab_size, bool)
        for i in range(min(self.tokenizer.vocab_size, self.vocab_size)):
            table[i] = not self.tokenizer.decode([i]).strip()
        return table

    def context_ids(self, sample: TurnSample) -> list[int]:
        """The judge ids of one prompt's context (persona, situation, conversation), at most C of them.

        Over budget, the conversation loses its oldest tokens first, but the profile keeps at least half
        of the budget (or all it needs, if less).
        """
        profile, conversation = rubric.context_parts(sample)
        profile_ids = self.tokenizer.encode(profile)
        conversation_ids = self.tokenizer.encode(conversation) if conversation else []
        budget = self.max_context_tokens
        keep_conversation = min(len(conversation_ids), budget - min(len(profile_ids), budget // 2))
        keep_profile = min(len(profile_ids), budget - keep_conversation)
        return profile_ids[:keep_profile] + conversation_ids[len(conversation_ids) - keep_conversation:]

    def prepare_contexts(self, samples: Sequence[TurnSample]) -> dict[str, np.ndarray]:
        """Once per batch of B prompts: {"context_ids": [B, C] int32 (right-padded with the judge's pad
        id), "context_mask": [B, C] int32}, the contexts `RubricJudge.score_ids` reads."""
        ids = np.full((len(samples), self.max_context_tokens), self.tokenizer.pad_id, np.int32)
        mask = np.zeros((len(samples), self.max_context_tokens), np.int32)
        for row, sample in enumerate(samples):
            context = self.context_ids(sample)
            ids[row, :len(context)] = context
            mask[row, :len(context)] = 1
        return {"context_ids": ids, "context_mask": mask}

    def decode_completions(self, completion_ids, completion_mask) -> list[str]:
        """The policy's completions [N, T] as text: the masked ids without stop tokens, markers kept."""
        ids, mask = np.asarray(completion_ids), np.asarray(completion_mask) > 0
        stops = set(self.stop_ids.tolist())
        return [self.policy_tokenizer.decode([int(t) for t in row[m] if int(t) not in stops]) for row, m in zip(ids, mask)]

    def response_ids(self, completion: str) -> list[int]:
        """The judge ids of a completion text's response span (module docstring), at most R of them;
        [] when it has none."""
        begin, end = SPAN_MARKERS["response"]
        if not (completion.count(begin) == 1 and completion.count(end) == 1 and completion.index(begin) < completion.index(end)):
            return []
        span = completion[completion.index(begin) + len(begin):completion.index(end)]
        ids = [i for piece in self._cut_pattern.split(span) if piece for i in self.tokenizer.encode(piece)]
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        content = [k for k, i in enumerate(ids) if not self.whitespace_table[i]]
        ids = ids[content[0]:content[-1] + 1] if content else []
        return ids[:self.max_response_tokens]

    def retokenized_responses(self, completion_ids, completion_mask) -> tuple[np.ndarray, np.ndarray]:
        """Policy completions [N, T] -> the judge ids [N, R] (left-aligned) of their response spans and
        their mask (bool): decoded, then re-tokenized by `response_ids`. The body of the in-graph
        `pure_callback` when the vocabularies differ."""
        out = np.full((completion_ids.shape[0], self.max_response_tokens), self.tokenizer.pad_id, np.int32)
        mask = np.zeros_like(out, dtype=bool)
        for row, text in enumerate(self.decode_completions(completion_ids, completion_mask)):
            ids = self.response_ids(text)
            out[row, :len(ids)], mask[row, :len(ids)] = ids, True
        return out, mask

    def assemble_texts(self, completions: Sequence[str], samples: Sequence[TurnSample]) -> JudgePrompts:
        """The judge prompts of N completion texts (numpy `JudgePrompts`, layout above).

        `samples` holds one sample per completion (B = N, G = 1), or B samples for N = B·G completions
        (completion i belongs to sample i // G, the sampler's order; its context is read once per group).
        """
        group_size(len(completions), len(samples))
        pad = self.tokenizer.pad_id
        context, context_mask = left_padded([[*self.context_ids(s), *self.mid_ids] for s in samples],
                                             self.context_length, pad)
        response, response_mask = left_padded([[*self.response_ids(t), *self.tail_ids] for t in completions],
                                               self.response_length, pad)
        return JudgePrompts(context, context_mask, response, response_mask)

    def full_prompts(self, prompts: JudgePrompts) -> tuple[np.ndarray, np.ndarray]:
        """The contiguous prompts [N, L] that `prompts` stand for (tokens, mask int32): HEAD in the first
        columns, then context, MID, response, TAIL left-padded. The judge scores exactly these (plus a
        criterion suffix); the scorer never builds them (for tests and inspection)."""
        context, context_mask, response, response_mask = (np.asarray(x) for x in prompts)
        n = len(response)
        group = group_size(n, len(context))
        body = [[*context[i // group][context_mask[i // group] > 0], *response[i][response_mask[i] > 0]] for i in range(n)]
        ids, mask = left_padded(body, self.prompt_length - len(self.head_ids), self.tokenizer.pad_id)
        head = np.broadcast_to(self.head_ids, (n, len(self.head_ids)))
        return np.concatenate([head, ids], axis=1), np.concatenate([np.ones_like(head), mask], axis=1)


def left_padded(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Id lists (each at most `length`) left-padded into ids, mask [len(rows), length] int32."""
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for r, row in enumerate(rows):
        if len(row):
            ids[r, length - len(row):], mask[r, length - len(row):] = row, 1
    return ids, mask
