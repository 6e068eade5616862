"""The rubric judge: five criterion scores per completion, read off the judge's next-token distribution.

The judge is read, not decoded. For completion i and criterion c the judge sees the prompt of
`rubric.py` (rubric + persona + dialogue context + the completion's response span, then the start of
its reply "<Criterion> score: "), and the score is the expected value of its next token restricted to
the five tokens "1".."5" (softmax over those five logits), mapped to [0, 1] by (s - 1) / 4:

    scores [N, 5] float32 in [0, 1], columns in RUBRIC_CRITERIA order (rewards/combine.py)

Prefix sharing, three levels. The prompt of completion i (of prompt p = i // G, the sampler's order)
and criterion c is HEAD + CONTEXT_p + RESPONSE_i + SUFFIX_c, and each piece is prefilled once at the
level where it varies, as a block of rows that reads the blocks before it in place (nested prefix caches,
`Decoder.prefill(..., context=cache)` and `fan_out_prefix`), never a copy of them:

  HEAD      rubric instructions: the same for every prompt, so one row [1, h] (positions 0..h-1).
  context   persona + dialogue context + MID: the same for the G completions of a prompt, so one row
            per prompt [B, C + len(MID)], prefilled with HEAD as its context (positions from h).
  response  response span + TAIL: one row per completion [N, R + len(TAIL)], prefilled with the
            context cache as its context: rows p·G … p·G + G - 1 read context row p (positions from
            h + the number of valid context tokens of prompt p).
  suffix    "<Criterion> score: ": `fan_out_prefix(cache, 5, 0)` makes HEAD, context and response the
            nested prefix of N·5 suffix rows (row i·5 + c = completion i, criterion c; positions from
            h + context + response lengths), which read all of it in place.

Why: in GRPO the G (8) completions of a prompt share its context, and the context (C, 512 by default,
1536 in the TPU configs) is longer than the response (R <= 512): prefilled per completion, it would be
most of the judge's work, repeated G times. Positions continue across blocks from the
masks, so padding inside a block changes nothing and the scores are those of the judge reading each
(completion, criterion) prompt as one contiguous sequence (`full_prompts` builds those sequences, for
tests and inspection). Only the last suffix position's hidden state is turned into the five score
logits (D x 5, not the whole vocabulary). In evaluation (`score_texts`, `scorer`) each completion has
its own sample: B = N, G = 1, and the context block has a row per completion.

Memory: the prefills attend B context rows of C + len(MID) tokens and N response rows of
R + len(TAIL) tokens at once; `rows_per_chunk` bounds the completions scored at a time (a TPU-sized
judge with C in the thousands needs it). Chunks are whole groups (a prompt's context with its G
completions); a group larger than `rows_per_chunk` is split into sub-groups of the largest divisor of
G that fits, each reading its own copy of the context.

Two input paths build the same blocks (`JudgePrompts`, all left-padded int32): the context block
[B, C + len(MID)] (context ids, then MID) and the response block [N, R + len(TAIL)] (response span,
then TAIL), C = max_context_tokens, R = max_response_tokens. HEAD and the suffixes are constants of
the scorer.

  in-graph (`score_ids`, shared vocabulary): inside the jitted step, from the policy's completion ids.
    The contexts [B, C] come from `prepare_contexts` (host, once per batch of prompts); the response
    span is cut out of the completion ids; each block's pieces are packed left-padded by a scatter at
    cumsum positions.
  host (`score_texts`, or `score_ids` when the vocabularies differ): completion texts are re-tokenized
    with the judge's tokenizer on the host. Inside a jitted `score_ids` this is a `jax.pure_callback`
    that returns the response ids [N, R]; the packing stays in-graph. Under a mesh the callback runs in a
    `shard_map` over the batch axes: each device re-tokenizes its own rows, so on a pod every process
    tokenizes the completions it holds and none are gathered to one host.
    `score_texts` takes one sample per completion, or B samples for N = B·G completions (then each
    context is read once per group, as in-graph).

The response span (both paths, the same rule):
  * if the completion holds `<|response_begin|>` and `<|response_end|>` exactly once each, begin before
    end: the tokens strictly between them, less every span marker and stop token, whitespace-only tokens
    at both ends trimmed, the first R tokens kept;
  * otherwise (broken format, e.g. a completion truncated inside its response): no span.
  A completion without a response span (none, or one that is empty once trimmed) scores 0 on every
  criterion: `score_prompts` sets the scores of a prompt whose response block holds only TAIL to 0,
  in-graph, so the judge never rates the rest of a completion as if it were the reply (its row is still
  computed, at a fixed shape, and discarded). In evaluation (`scorer`) that is 1, the bottom of the
  1-5 scale.
  On text: the same markers and counts on the decoded completion, split at markers and stop strings;
  each piece is tokenized on its own (a marker splits the tokenization on the id side too) and the same
  trimming applies to the ids. The paths agree token for token when the policy's completion ids are
  the canonical tokenization of their text (`encode(decode(ids)) == ids` piecewise); a sampled,
  non-canonical tokenization is re-canonicalized by the host path only.

Which path: `shared_vocab=None` (default) detects it: True when every token of the policy's vocabulary
(span markers aside, which never reach the judge) has the same id in the judge's vocabulary: the same
tokenizer, or a judge whose vocabulary extends the policy's (as Qwen3's is meant to extend Qwen2.5's).
Pass True/False to force a path.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from kardia_jax import sharding
from kardia_jax.data.schema import TurnSample
from kardia_jax.spans import MARKER_TOKENS, SPAN_MARKERS
from kardia_jax.models import Decoder, fan_out_prefix, positions_from_mask
from kardia_jax.rewards import rubric
from kardia_jax.rewards.combine import RUBRIC_CRITERIA

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
    """True when every policy token except the span markers has the same id for the judge."""
    if policy_tokenizer is judge_tokenizer:
        return True
    policy, judge = _vocabulary(policy_tokenizer), _vocabulary(judge_tokenizer)
    if policy is None or judge is None:
        return False
    markers = set(MARKER_TOKENS)
    return all(judge.get(token) == i for token, i in policy.items() if token not in markers)


class RubricJudge:
    """Scores completions on the five rubric criteria with a frozen decoder (see the module docstring).

    Args:
      model: the judge `Decoder` (real or abstract from `nnx.eval_shape`: only its graph and config are
        kept; parameters are passed to every scoring call).
      tokenizer: the judge's tokenizer.
      policy_tokenizer: the policy's tokenizer (default: the judge's): its span-marker and stop ids are
        what the completions hold, and it decodes them for the host path.
      max_context_tokens: C, the budget of persona + situation + conversation.
      max_response_tokens: R, the budget of the response span.
      shared_vocab: which input path `score_ids` takes; None: detect (`same_vocabulary`).
      rows_per_chunk: score at most this many completions at a time (a `lax.map` over chunks of whole
        groups, or of sub-groups when G exceeds it) to bound the prefills' activation and attention
        memory; 0: all at once.
    """

    @classmethod
    def from_config(cls, model: Decoder, judge_config, tokenizer, policy_tokenizer) -> "RubricJudge":
        """The judge over `model` with the prompt budgets and chunking of `config.judge`."""
        return cls(model, tokenizer, policy_tokenizer, max_context_tokens=judge_config.max_context_tokens,
                   max_response_tokens=judge_config.max_response_tokens,
                   rows_per_chunk=judge_config.rows_per_chunk)

    def __init__(self, model: Decoder, tokenizer, policy_tokenizer=None, *, max_context_tokens: int = 512,
                 max_response_tokens: int = 256, shared_vocab: bool | None = None, rows_per_chunk: int = 0):
        self.score_ids_array = score_token_ids(tokenizer)  # [5]; raises first if the digits are not single tokens
        self.graphdef = nnx.split(model)[0]
        self.model_config = model.config
        self.rules = model.rules
        self.tokenizer = tokenizer
        self.policy_tokenizer = policy_tokenizer if policy_tokenizer is not None else tokenizer
        self.max_context_tokens = int(max_context_tokens)
        self.max_response_tokens = int(max_response_tokens)
        self.rows_per_chunk = int(rows_per_chunk)
        self.shared_vocab = same_vocabulary(self.policy_tokenizer, tokenizer) if shared_vocab is None else bool(shared_vocab)
        self.vocab_size = model.config.vocab_size  # the judge's embedding rows; larger ids never reach it

        self.template = rubric.judge_template(tokenizer)
        encode = lambda text: np.asarray(tokenizer.encode(text), np.int32)
        self.head_ids, self.mid_ids, self.tail_ids = (encode(p) for p in (self.template.head, self.template.mid, self.template.tail))
        suffixes = [encode(s) for s in self.template.suffixes]
        width = max(len(s) for s in suffixes)
        self.suffix_ids = np.full((NUM_CRITERIA, width), tokenizer.pad_id, np.int32)  # [5, S], left-padded
        self.suffix_mask = np.zeros((NUM_CRITERIA, width), np.int32)
        for c, ids in enumerate(suffixes):
            self.suffix_ids[c, width - len(ids):] = ids
            self.suffix_mask[c, width - len(ids):] = 1
        self.context_length = self.max_context_tokens + len(self.mid_ids)  # the context block's width
        self.response_length = self.max_response_tokens + len(self.tail_ids)  # the response block's width
        self.prompt_length = len(self.head_ids) + self.context_length + self.response_length  # L, one contiguous prompt
        longest = self.prompt_length + width  # a whole prompt with its longest criterion suffix
        if longest > model.config.max_position_embeddings:
            fixed = longest - self.max_context_tokens - self.max_response_tokens  # rubric text and suffix
            raise ValueError(
                f"The judge reads prompts of up to {longest} tokens ({fixed} of rubric and suffix + "
                f"judge.max_context_tokens={self.max_context_tokens} + judge.max_response_tokens="
                f"{self.max_response_tokens}), past the judge model's max_position_embeddings="
                f"{model.config.max_position_embeddings}: lower config.judge.max_context_tokens or "
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
        self._score_prompts_jit = jax.jit(self.score_prompts)

    # -- host side: contexts and responses as judge token ids -------------------------------------------

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
        """Host, once per batch of B prompts: {"context_ids": [B, C] int32 (right-padded with the judge's
        pad id), "context_mask": [B, C] int32}."""
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

    def assemble_texts(self, completions: Sequence[str], samples: Sequence[TurnSample]) -> JudgePrompts:
        """Host path: the judge prompts of N completion texts (numpy `JudgePrompts`, layout above).

        `samples` holds one sample per completion (B = N, G = 1), or B samples for N = B·G completions
        (completion i belongs to sample i // G, the sampler's order; its context is read once per group).
        """
        _group_size(len(completions), len(samples))
        pad = self.tokenizer.pad_id
        context, context_mask = _left_padded([[*self.context_ids(s), *self.mid_ids] for s in samples],
                                             self.context_length, pad)
        response, response_mask = _left_padded([[*self.response_ids(t), *self.tail_ids] for t in completions],
                                               self.response_length, pad)
        return JudgePrompts(context, context_mask, response, response_mask)

    def score_texts(self, params, completions: Sequence[str], samples: Sequence[TurnSample]) -> np.ndarray:
        """Host path: [N, 5] float32 scores of completion texts (decoded with the span markers kept, e.g.
        by `decode_completions`), with the same jitted scorer as the in-graph path."""
        return np.asarray(self._score_prompts_jit(params, self.assemble_texts(completions, samples)))

    def scorer(self, params, batch_size: int = 32) -> Callable[[Sequence[TurnSample], Sequence[str]], dict[str, np.ndarray]]:
        """A scorer for `kardia_jax.evaluate` scorers: (samples, completions) -> {"judge_<criterion>":
        [N] expected score on the paper's 1-5 scale}. Scores `batch_size` completions per call (the last
        batch padded) so one program serves every batch."""

        def score(samples, completions):
            out = []
            for start in range(0, len(completions), batch_size):
                texts = list(completions[start:start + batch_size])
                rows = list(samples[start:start + batch_size])
                pad = batch_size - len(texts)
                out.append(self.score_texts(params, texts + texts[-1:] * pad, rows + rows[-1:] * pad)[:len(texts)])
            scores = np.concatenate(out) if out else np.zeros((0, NUM_CRITERIA), np.float32)
            return {f"judge_{name}": 1.0 + 4.0 * scores[:, c] for c, name in enumerate(RUBRIC_CRITERIA)}

        return score

    # -- in-graph: the response span and the packing --------------------------------------------------

    def response_mask(self, completion_ids: jax.Array, completion_mask: jax.Array) -> jax.Array:
        """[N, T] bool: which completion tokens form the judge's response span (module docstring)."""
        ids = completion_ids  # [N, T]
        t = ids.shape[1]
        valid = completion_mask > 0
        position = jnp.arange(t)
        begin_hits = (ids == self.response_begin_id) & valid
        end_hits = (ids == self.response_end_id) & valid
        begin, end = jnp.argmax(begin_hits, axis=1)[:, None], jnp.argmax(end_hits, axis=1)[:, None]  # [N, 1]
        well_formed = (begin_hits.sum(1) == 1) & (end_hits.sum(1) == 1) & (begin[:, 0] < end[:, 0])  # [N]
        inside = well_formed[:, None] & (position > begin) & (position < end)  # [N, T]; no span when broken
        keep = (valid & inside & ~jnp.isin(ids, self.marker_ids) & ~jnp.isin(ids, self.stop_ids)
                & (ids >= 0) & (ids < self.vocab_size))
        content = keep & ~jnp.take(jnp.asarray(self.whitespace_table), ids, mode="clip")
        first = jnp.argmax(content, axis=1)[:, None]
        last = t - 1 - jnp.argmax(content[:, ::-1], axis=1)[:, None]
        keep = keep & content.any(axis=1, keepdims=True) & (position >= first) & (position <= last)
        return keep & (jnp.cumsum(keep, axis=1) <= self.max_response_tokens)

    def _host_response(self, completion_ids, completion_mask) -> tuple[np.ndarray, np.ndarray]:
        """pure_callback body: judge ids [N, R] (left-aligned) and their mask of re-tokenized responses."""
        out = np.full((completion_ids.shape[0], self.max_response_tokens), self.tokenizer.pad_id, np.int32)
        mask = np.zeros_like(out, dtype=bool)
        for row, text in enumerate(self.decode_completions(completion_ids, completion_mask)):
            ids = self.response_ids(text)
            out[row, :len(ids)], mask[row, :len(ids)] = ids, True
        return out, mask

    def _retokenized(self, completion_ids: jax.Array, completion_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The judge's response ids and mask [N, R] of policy completions [N, T], by `_host_response`.

        Outside a mesh: one callback on the whole batch. Under a mesh: one per batch shard (rows split as
        `activation_batch` says), each on the process that holds the shard."""

        def callback(ids, mask):  # [n, T] -> [n, R] twice, n = the rows at hand
            shapes = (jax.ShapeDtypeStruct((ids.shape[0], self.max_response_tokens), jnp.int32),
                      jax.ShapeDtypeStruct((ids.shape[0], self.max_response_tokens), jnp.bool_))
            return jax.pure_callback(self._host_response, shapes, ids, mask)

        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return callback(completion_ids, completion_mask)
        spec = sharding.logical_to_spec(("activation_batch", None), completion_ids.shape,
                                        self.rules or sharding.DEFAULT_RULES, dict(mesh.shape))
        return jax.shard_map(callback, mesh=mesh, in_specs=(spec, spec), out_specs=(spec, spec))(
            completion_ids, completion_mask)

    def assemble_ids(self, completion_ids: jax.Array, completion_mask: jax.Array, contexts,
                     context_mask: jax.Array | None = None) -> JudgePrompts:
        """The judge prompts (`JudgePrompts`, layout above) of N = B·G completions.

        completion_ids, completion_mask: [N, T] policy ids (mask 1 up to and including the stop token).
        contexts: `prepare_contexts`'s dict (on device), or context_ids [B, C] with `context_mask`.
        Completion i reads the context of prompt i // G. Jittable.
        """
        if isinstance(contexts, Mapping):
            context_ids, context_mask = contexts["context_ids"], contexts["context_mask"]
        else:
            context_ids = contexts
        n, b = completion_ids.shape[0], context_ids.shape[0]
        _group_size(n, b)
        if self.shared_vocab:
            response, keep = completion_ids, self.response_mask(completion_ids, completion_mask)
        else:
            response, keep = self._retokenized(completion_ids, completion_mask)

        def constant(ids, rows):
            return jnp.broadcast_to(jnp.asarray(ids, jnp.int32), (rows, len(ids))), jnp.ones((rows, len(ids)), bool)

        pad = self.tokenizer.pad_id
        context = _pack_left([(context_ids, context_mask), constant(self.mid_ids, b)], self.context_length, pad)
        response = _pack_left([(response, keep), constant(self.tail_ids, n)], self.response_length, pad)
        return JudgePrompts(*context, *response)

    def full_prompts(self, prompts: JudgePrompts) -> tuple[jax.Array, jax.Array]:
        """The contiguous prompts [N, L] that `prompts` stand for (tokens, mask int32): HEAD in the first
        columns, then context, MID, response, TAIL left-padded. The judge scores exactly these (plus a
        criterion suffix); the scorer never builds them (for tests and inspection)."""
        n, b = prompts.response.shape[0], prompts.context.shape[0]
        repeat = lambda x: jnp.repeat(jnp.asarray(x), _group_size(n, b), axis=0)
        body, body_mask = _pack_left([(repeat(prompts.context), repeat(prompts.context_mask)),
                                      (prompts.response, prompts.response_mask)],
                                     self.prompt_length - len(self.head_ids), self.tokenizer.pad_id)
        head = jnp.broadcast_to(jnp.asarray(self.head_ids, jnp.int32), (n, len(self.head_ids)))
        return jnp.concatenate([head, body], axis=1), jnp.concatenate([jnp.ones_like(head), body_mask], axis=1)

    # -- in-graph: the scorer -------------------------------------------------------------------------

    def score_logits(self, params, prompts: JudgePrompts) -> jax.Array:
        """[N, 5, 5] float32: per completion and criterion, the judge's logits of "1".."5" after the
        criterion's suffix, for the blocks of B contexts and N = B·G responses (module docstring)."""
        model = nnx.merge(self.graphdef, params)
        context, context_mask, response, response_mask = (jnp.asarray(x) for x in prompts)
        n = response.shape[0]
        group = _group_size(n, context.shape[0])
        h = len(self.head_ids)
        head = jnp.asarray(self.head_ids)[None]  # [1, h]: the same rubric for every row, prefilled once
        _, cache = model.prefill(head, jnp.arange(h)[None], jnp.ones_like(head))
        # Each prompt's context once, after HEAD; then each completion's response after its prompt's
        # context (rows p·G … p·G + G - 1 read context row p in place). Positions continue across blocks.
        _, cache = model.prefill(context, h + positions_from_mask(context_mask), context_mask, context=cache)
        start = jnp.repeat(h + context_mask.sum(axis=1), group)[:, None]  # [N, 1]: HEAD + the prompt's context
        _, cache = model.prefill(response, start + positions_from_mask(response_mask), response_mask, context=cache)
        start = start + response_mask.sum(axis=1, keepdims=True)  # [N, 1]: the prompt's whole length

        # Fan out: HEAD, context and response are the nested prefix of each completion's five criterion
        # rows (i·5 + c).
        suffix_ids = jnp.tile(jnp.asarray(self.suffix_ids), (n, 1))  # [N·5, S]
        suffix_mask = jnp.tile(jnp.asarray(self.suffix_mask), (n, 1))
        cache = model.constrain_cache(fan_out_prefix(cache, NUM_CRITERIA, 0))
        start = jnp.repeat(start, NUM_CRITERIA, axis=0)  # [N·5, 1]
        hidden, _ = model.hidden_states(suffix_ids, start + positions_from_mask(suffix_mask), suffix_mask, cache)
        last = hidden[:, -1]  # [N·5, D]; suffixes are left-padded, so the last column is the last token
        unembed = model.unembed_matrix()[:, self.score_ids_array].astype(last.dtype)  # [D, 5]
        logits = jnp.einsum("nd,dk->nk", last, unembed, preferred_element_type=jnp.float32)
        return logits.reshape(n, NUM_CRITERIA, len(rubric.SCORE_TOKENS))

    def score_prompts(self, params, prompts: JudgePrompts) -> jax.Array:
        """[N, 5] scores in [0, 1] of assembled prompts; 0 for a completion without a response span (its
        response block holds only TAIL). Jittable."""
        has_response = jnp.asarray(prompts.response_mask).sum(axis=1) > len(self.tail_ids)  # [N]
        return jnp.where(has_response[:, None], self._read_scores(params, prompts), 0.0)

    def _read_scores(self, params, prompts: JudgePrompts) -> jax.Array:
        """[N, 5] the judge's scores of assembled prompts, at most `rows_per_chunk` completions at a time
        (chunks of whole groups; of sub-groups when G exceeds it)."""
        chunk = self.rows_per_chunk
        n, b = prompts.response.shape[0], prompts.context.shape[0]
        if not chunk or n <= chunk:
            return scores_from_logits(self.score_logits(params, prompts))
        group = _group_size(n, b)
        context, context_mask, response, response_mask = (jnp.asarray(x) for x in prompts)
        if group > chunk:  # sub-groups of the largest divisor of G that fits, each with its own context row
            sub = max(d for d in range(1, chunk + 1) if group % d == 0)
            context, context_mask = (jnp.repeat(x, group // sub, axis=0) for x in (context, context_mask))
            b, group = n // sub, sub
        per_step = chunk // group  # groups per chunk
        steps = -(-b // per_step)
        pad = steps * per_step - b  # padding groups hold no tokens; their scores are cut off

        # Strided chunks: step i scores groups i, i + steps, i + 2·steps, ..., so with rows split over
        # devices in contiguous blocks every step keeps every device busy.
        def strided(x, rows):  # [b·rows, ...] -> [steps, per_step·rows, ...]
            x = x.reshape(b, rows, *x.shape[1:])
            x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
            x = x.reshape(per_step, steps, *x.shape[1:]).swapaxes(0, 1)
            return x.reshape(steps, per_step * rows, *x.shape[3:])

        chunks = JudgePrompts(strided(context, 1), strided(context_mask, 1), strided(response, group),
                              strided(response_mask, group))
        out = jax.lax.map(lambda p: scores_from_logits(self.score_logits(params, p)), chunks)  # [steps, per_step·G, 5]
        out = out.reshape(steps, per_step, group, NUM_CRITERIA).swapaxes(0, 1)
        return out.reshape((b + pad) * group, NUM_CRITERIA)[:n]

    def score_ids(self, params, completion_ids: jax.Array, completion_mask: jax.Array, contexts,
                  context_mask: jax.Array | None = None) -> jax.Array:
        """[N, 5] float32 in [0, 1]: the rubric scores of N = B·G policy completions. Jittable; call it
        inside the rollout's jit with the judge's parameters as an argument.

        completion_ids, completion_mask: [N, T] as the sampler returns them (sample i·G + g of prompt i).
        contexts: `prepare_contexts(samples)` of the B prompts (on device), or context_ids [B, C] and
        context_mask [B, C].
        Cost: HEAD once; a prefill of B context rows of C + len(MID) tokens; one of N response rows of
        R + len(TAIL) tokens reading them; then N·5 suffix rows of S tokens reading all of it.
        A completion without a response span scores 0 (module docstring).
        """
        return self.score_prompts(params, self.assemble_ids(completion_ids, completion_mask, contexts, context_mask))


def scores_from_logits(logits: jax.Array) -> jax.Array:
    """[..., 5] logits of "1".."5" -> [...] expected score, renormalized over the five, mapped to [0, 1]."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    expected = jnp.sum(probs * jnp.arange(1, 6, dtype=jnp.float32), axis=-1)
    return (expected - 1.0) / 4.0


def _group_size(n: int, b: int) -> int:
    """G = N // B for N completions over B prompts' contexts; raises unless B divides N."""
    if not b or n % b:
        raise ValueError(f"judge: {n} completions need one prompt's context each or B contexts with N = B·G; got {b}.")
    return n // b


def _left_padded(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Host: id lists (each at most `length`) left-padded into ids, mask [len(rows), length] int32."""
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for r, row in enumerate(rows):
        if row:
            ids[r, length - len(row):], mask[r, length - len(row):] = row, 1
    return ids, mask


def _pack_left(pieces, length: int, pad_id: int) -> tuple[jax.Array, jax.Array]:
    """In-graph: the valid tokens of pieces [(ids [n, w], mask [n, w])], in order, left-padded into ids,
    mask [n, length] int32 (a scatter at cumsum positions). Each row holds at most `length` of them."""
    raw = jnp.concatenate([jnp.asarray(ids).astype(jnp.int32) for ids, _ in pieces], axis=1)  # [n, W]
    valid = jnp.concatenate([jnp.asarray(m) > 0 for _, m in pieces], axis=1)
    n = raw.shape[0]
    count = valid.sum(axis=1, keepdims=True)  # [n, 1]
    target = jnp.where(valid, length - count + jnp.cumsum(valid, axis=1) - 1, length)  # length: dropped
    out = jnp.full((n, length), pad_id, jnp.int32).at[jnp.arange(n)[:, None], target].set(raw, mode="drop")
    return out, (jnp.arange(length)[None] >= length - count).astype(jnp.int32)


# -- loading -------------------------------------------------------------------------------------------


def model_overrides(judge_config) -> dict:
    """The ModelConfig fields `config.judge` sets on the judge's architecture (it is never differentiated)."""
    return {"param_dtype": judge_config.param_dtype, "dtype": judge_config.dtype, "remat": "none"}


def load_judge(config, mesh, policy_tokenizer, policy_model: Decoder | None = None):
    """The judge named by `config.judge`, sharded over `mesh` with `config.judge.rules`.

    Exactly one source: `from_policy` (a frozen copy of `policy_model`'s parameters, in new buffers, so
    policy updates that donate their inputs leave it intact), `hf_path` (a Hugging Face checkpoint; its
    own tokenizer unless `tokenizer_path` says otherwise) or `preset` (random init, for tests and
    benchmarks). The judge's tokenizer is `judge.tokenizer_path` if set, else the checkpoint's for
    `hf_path`, else the policy's.

    Returns (judge: RubricJudge, params: nnx.State).
    """
    from kardia_jax.models import config as model_configs  # pylint: disable=import-outside-toplevel
    from kardia_jax.models import weights  # pylint: disable=import-outside-toplevel
    from kardia_jax.models.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel

    j = config.judge
    sources = {"from_policy": bool(j.from_policy), "hf_path": bool(j.hf_path), "preset": bool(j.preset)}
    if sum(sources.values()) != 1:
        raise ValueError(f"config.judge: set exactly one of from_policy=True, hf_path, preset; got {sources}.")
    rules = sharding.rules_from_config(j.rules)
    overrides = model_overrides(j)
    if j.tokenizer_path:
        tokenizer = load_tokenizer(j.tokenizer_path, key="judge.tokenizer_path")
    elif j.hf_path:
        tokenizer = load_tokenizer(j.hf_path, key="judge.hf_path")
    else:
        tokenizer = policy_tokenizer

    if j.hf_path:
        model = weights.from_pretrained(j.hf_path, mesh=mesh, rules=rules, key="judge.hf_path", **overrides)
        graphdef, params = nnx.split(model)
        source = j.hf_path
    else:
        if j.from_policy:
            if policy_model is None:
                raise ValueError("config.judge.from_policy=True needs the policy model: pass policy_model to load_judge.")
            model_config = policy_model.config.replace(**overrides)
        else:
            model_config = model_configs.preset(j.preset, **overrides)
            if tokenizer.vocab_size > model_config.vocab_size:
                raise ValueError(f"config.judge.preset={j.preset!r} has vocab {model_config.vocab_size} < the judge "
                                 f"tokenizer's {tokenizer.vocab_size} ids; pick a larger preset.")
        create = lambda: Decoder(model_config, rngs=nnx.Rngs(config.seed), rules=rules)
        graphdef, abstract = nnx.split(nnx.eval_shape(create))
        shardings = sharding.state_shardings(abstract, rules, mesh)
        if j.from_policy:
            dtype = jnp.dtype(model_config.param_dtype)
            copied = jax.tree.map(lambda x: jnp.array(x, dtype=dtype, copy=True), nnx.split(policy_model)[1])
            params = jax.device_put(copied, shardings)
            source = "a frozen copy of the policy"
        else:
            params = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)()
            source = f"preset {j.preset!r} (random init)"
    judge = RubricJudge.from_config(nnx.merge(graphdef, params), j, tokenizer, policy_tokenizer)
    logging.info("Judge: %s; prompts of %d tokens; %s.", source, judge.prompt_length,
                 "assembled in-graph (shared vocabulary)" if judge.shared_vocab else "re-tokenized on the host")
    return judge, params
