"""The rubric judge: five criterion scores per completion, read off the judge's next-token distribution.

The judge is read, not decoded. For completion i and criterion c the judge sees the prompt of
`rubric.py` (rubric + persona + dialogue context + the completion's response span, then the start of
its reply "<Criterion> score: "), and the score is the expected value of its next token restricted to
the five tokens "1".."5" (softmax over those five logits), mapped to [0, 1] by (s - 1) / 4:

    scores [N, 5] float32 in [0, 1], columns in RUBRIC_CRITERIA order (rewards/combine.py)

A completion without a response span (`judge_prompts.py`) scores 0 on every criterion, in-graph (its
row is computed at a fixed shape and discarded); in evaluation (`kardia_jax.evaluation.judging`) that is 1
on the 1-5 scale.

Prefix sharing, three levels. The prompt HEAD + CONTEXT_p + MID + RESPONSE_i + TAIL + SUFFIX_c
(`judge_prompts.JudgePrompts`) is prefilled piece by piece, each once at the level where it varies, as a
block of rows that reads the blocks before it in place (nested prefix caches, `Decoder.prefill(...,
context=cache)` and `fan_out_prefix`):

  HEAD      rubric instructions: one row [1, h] for every prompt (positions 0..h-1).
  context   persona + dialogue context + MID: one row per prompt [B, C + len(MID)], after HEAD.
  response  response span + TAIL: one row per completion [N, R + len(TAIL)]; rows p·G … p·G + G - 1
            read context row p.
  suffix    "<Criterion> score: ": `fan_out_prefix(cache, 5, 0)` makes the three blocks the nested
            prefix of N·5 suffix rows (row i·5 + c = completion i, criterion c).

In GRPO the G completions of a prompt share its context, which is longer than the response, so the
context is prefilled once per group, not per completion. Positions continue across blocks from the
masks, so the scores are those of each (completion, criterion) prompt read as one contiguous sequence
(`PromptBuilder.full_prompts` builds those, for tests). Only the last suffix position's hidden state is unembedded, on
the five score tokens (D x 5). `rows_per_chunk` bounds the completions scored at a time (whole groups;
sub-groups of the largest divisor of G that fits when a group is larger), for prefill memory.

Two input paths build the same `JudgePrompts`; the packing (`_pack_left`, a scatter at cumsum
positions) is in-graph on both:

  shared vocabulary (`score_ids`): the response span is cut out of the policy's completion ids inside
    the jitted step (`response_mask`); the contexts [B, C] come from `prepare_contexts` (host, once per
    batch of prompts).
  re-tokenized (`score_ids` when the vocabularies differ, and `score_texts`): the completions are
    decoded and re-tokenized with the judge's tokenizer on the host. Inside a jitted `score_ids` this is
    a `jax.pure_callback` returning the response ids [N, R]; under a mesh it runs in a `shard_map` over
    the batch axes, so on a pod each process re-tokenizes the rows it holds and none are gathered.

`shared_vocab=None` (default) picks the path with `judge_prompts.same_vocabulary`; True/False forces one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from kardia_jax import sharding
from kardia_jax.data.schema import TurnSample
from kardia_jax.models import Decoder, fan_out_prefix, loading, positions_from_mask
from kardia_jax.models.tokenizer import load_tokenizer
from kardia_jax.rewards import rubric
from kardia_jax.rewards.judge_prompts import NUM_CRITERIA, JudgePrompts, PromptBuilder, group_size, same_vocabulary


class RubricJudge(PromptBuilder):
    """Scores completions on the five rubric criteria with a frozen decoder (see the module docstring);
    its prompts' ids and host tokenization are `PromptBuilder`'s.

    Args:
      model: the judge `Decoder` (real or abstract from `nnx.eval_shape`: only its graph and config are
        kept; parameters are passed to every scoring call).
      tokenizer, policy_tokenizer, max_context_tokens, max_response_tokens: as for `PromptBuilder`.
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
        super().__init__(tokenizer, policy_tokenizer, max_context_tokens=max_context_tokens,
                         max_response_tokens=max_response_tokens, vocab_size=model.config.vocab_size,
                         max_positions=model.config.max_position_embeddings)
        self.graphdef = nnx.split(model)[0]
        self.model_config = model.config
        self.rules = model.rules
        self.rows_per_chunk = int(rows_per_chunk)
        self.shared_vocab = same_vocabulary(self.policy_tokenizer, tokenizer) if shared_vocab is None else bool(shared_vocab)
        self.score_prompts_jit = jax.jit(self.score_prompts)  # the host paths: score_texts, evaluation

    # -- the host path: completion texts ----------------------------------------------------------------

    def score_texts(self, params, completions: Sequence[str], samples: Sequence[TurnSample]) -> np.ndarray:
        """Host path: [N, 5] float32 scores of completion texts (decoded with the span markers kept, e.g.
        by `decode_completions`), with the same jitted scorer as the in-graph path."""
        return np.asarray(self.score_prompts_jit(params, self.assemble_texts(completions, samples)))

    # -- in-graph: the response span and the packing --------------------------------------------------

    def response_mask(self, completion_ids: jax.Array, completion_mask: jax.Array) -> jax.Array:
        """[N, T] bool: which completion tokens form the judge's response span (the rule of
        `judge_prompts.py`, on ids)."""
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

    def _retokenized(self, completion_ids: jax.Array, completion_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The judge's response ids and mask [N, R] of policy completions [N, T], re-tokenized on the host
        (`retokenized_responses`).

        Outside a mesh: one callback on the whole batch. Under a mesh: one per batch shard (rows split as
        `activation_batch` says), each on the process that holds the shard."""

        def callback(ids, mask):  # [n, T] -> [n, R] twice, n = the rows at hand
            shapes = (jax.ShapeDtypeStruct((ids.shape[0], self.max_response_tokens), jnp.int32),
                      jax.ShapeDtypeStruct((ids.shape[0], self.max_response_tokens), jnp.bool_))
            return jax.pure_callback(self.retokenized_responses, shapes, ids, mask)

        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return callback(completion_ids, completion_mask)
        spec = sharding.logical_to_spec(("activation_batch", None), completion_ids.shape,
                                        self.rules or sharding.DEFAULT_RULES, dict(mesh.shape))
        return jax.shard_map(callback, mesh=mesh, in_specs=(spec, spec), out_specs=(spec, spec))(
            completion_ids, completion_mask)

    def assemble_ids(self, completion_ids: jax.Array, completion_mask: jax.Array, contexts,
                     context_mask: jax.Array | None = None) -> JudgePrompts:
        """The judge prompts (`JudgePrompts`) of N = B·G completions.

        completion_ids, completion_mask: [N, T] policy ids (mask 1 up to and including the stop token).
        contexts: `prepare_contexts`'s dict (on device), or context_ids [B, C] with `context_mask`; C may be
        any width up to max_context_tokens (the pipeline cuts a batch's contexts to a bucket).
        Completion i reads the context of prompt i // G. Jittable.
        """
        if isinstance(contexts, Mapping):
            context_ids, context_mask = contexts["context_ids"], contexts["context_mask"]
        else:
            context_ids = contexts
        n, b = completion_ids.shape[0], context_ids.shape[0]
        group_size(n, b)
        if self.shared_vocab:
            response, keep = completion_ids, self.response_mask(completion_ids, completion_mask)
        else:
            response, keep = self._retokenized(completion_ids, completion_mask)

        def constant(ids, rows):
            return jnp.broadcast_to(jnp.asarray(ids, jnp.int32), (rows, len(ids))), jnp.ones((rows, len(ids)), bool)

        pad = self.tokenizer.pad_id
        # The context block is as wide as the contexts given (a bucket of the pipeline's, at most C) + MID.
        width = context_ids.shape[1] + len(self.mid_ids)
        context = _pack_left([(context_ids, context_mask), constant(self.mid_ids, b)], width, pad)
        response = _pack_left([(response, keep), constant(self.tail_ids, n)], self.response_length, pad)
        return JudgePrompts(*context, *response)

    # -- in-graph: the scorer -------------------------------------------------------------------------

    def score_logits(self, params, prompts: JudgePrompts) -> jax.Array:
        """[N, 5, 5] float32: per completion and criterion, the judge's logits of "1".."5" after the
        criterion's suffix, for the blocks of B contexts and N = B·G responses (module docstring)."""
        model = nnx.merge(self.graphdef, params)
        context, context_mask, response, response_mask = (jnp.asarray(x) for x in prompts)
        n = response.shape[0]
        group = group_size(n, context.shape[0])
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
        group = group_size(n, b)
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




def load_judge(config, mesh, policy_tokenizer, policy_model: Decoder | None = None):
    """The judge named by `config.judge`, sharded over `mesh` with `config.judge.rules`.

    Exactly one source: `from_policy` (a frozen copy of `policy_model`'s parameters, in new buffers, so
    policy updates that donate their inputs leave it intact), `hf_path` (a Hugging Face checkpoint; its
    own tokenizer unless `tokenizer_path` says otherwise) or `preset` (random init, for tests and
    benchmarks), built by `loading.load_model` as the policy is. The judge's tokenizer is
    `judge.tokenizer_path` if set, else the checkpoint's for `hf_path`, else the policy's.

    Returns (judge: RubricJudge, params: nnx.State).
    """
    j = config.judge
    sources = {"from_policy": bool(j.from_policy), "hf_path": bool(j.hf_path), "preset": bool(j.preset)}
    if sum(sources.values()) != 1:
        raise ValueError(f"config.judge: set exactly one of from_policy=True, hf_path, preset; got {sources}.")
    if j.tokenizer_path or j.hf_path:
        tokenizer = load_tokenizer(j.tokenizer_path or j.hf_path,
                                   key="judge.tokenizer_path" if j.tokenizer_path else "judge.hf_path")
    else:
        tokenizer = policy_tokenizer
    rules = sharding.rules_from_config(j.rules)
    if j.from_policy:
        if policy_model is None:
            raise ValueError("config.judge.from_policy=True needs the policy model: pass policy_model to load_judge.")
        model = loading.frozen_copy(policy_model, mesh, rules, **loading.model_overrides(j))
        source = "a frozen copy of the policy"
    else:
        # Frozen: its embedding is not grown to fit the tokenizer (the span markers never reach it).
        model = loading.load_model(j, tokenizer, mesh, rules, config.seed, name="judge", grow_vocab=False)
        source = j.hf_path or f"preset {j.preset!r} (random init)"
    judge = RubricJudge.from_config(model, j, tokenizer, policy_tokenizer)
    logging.info("Judge: %s; prompts of %d tokens; %s.", source, judge.prompt_length,
                 "assembled in-graph (shared vocabulary)" if judge.shared_vocab else "re-tokenized on the host")
    return judge, nnx.split(model)[1]
