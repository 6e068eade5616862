"""Emotion reward on token ids: 1 iff the emotion span is the gold label (case/whitespace-normalized).

Host side, once per tokenizer, `build_label_table` encodes the accepted surface forms of each of the
32 labels ("anxious", " Anxious", "ANXIOUS\n", ...) and keeps every distinct encoding, stripped of
leading and trailing whitespace-only tokens:

  label_table  [32, V, L] int32, V = most distinct encodings of a label, L = max_len, padded with PAD_ID

In-graph, the emotion span (the tokens strictly between the two emotion markers, each present exactly
once, begin before end) is stripped the same way, left-aligned into L slots and compared with the
gold label's V rows:

  completion_ids [N, T] int32, completion_mask [N, T], gold_emotion_id [N] int32 -> reward [N] float32

Only the emotion markers have to be well formed; the rest of the format is the format reward's job.
Compared with the text path, normalize_emotion(parse_spans(text)["emotion"]) == EMOTIONS[gold], the id
path is stricter where the policy spells a label with a non-canonical tokenization, in a mixed case
("aNxious"), or with whitespace split over byte tokens (see rewards/format.py); it is more lenient only
in not requiring the other three spans (the text path has no emotion span without a full parse).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kardia_jax.spans import EMOTIONS, SPAN_MARKERS
from kardia_jax.rewards.format import encode_text, find_token, is_whitespace_token

PAD_ID = -1  # never a token id

# The surface forms of a label that count as the label: the cases a model writes a word in, with the
# whitespace a tokenizer may merge into the word's first or last token. Forms whose stripped encodings
# coincide are stored once.
_CASES = (str.lower, str.capitalize, str.upper)
_PREFIXES = ("", " ", "\n")
_SUFFIXES = ("", " ", "\n")


def _strip_whitespace_tokens(tokenizer, ids: list[int]) -> list[int]:
    content = [i for i, t in enumerate(ids) if not is_whitespace_token(tokenizer, t)]
    return ids[content[0] : content[-1] + 1] if content else []


def build_label_table(tokenizer, max_len: int | None = None) -> np.ndarray:
    """[32, V, L] int32: each label's distinct whitespace-stripped encodings, in EMOTIONS order.

    A label with fewer than V encodings repeats its first one (a row of PAD_ID would match an empty
    span). L is `max_len`, or by default the longest encoding; raises if an encoding is longer than a
    given `max_len`.
    """
    table = []
    for label in EMOTIONS:
        variants = []
        for case in _CASES:
            for prefix in _PREFIXES:
                for suffix in _SUFFIXES:
                    surface = prefix + case(label) + suffix
                    ids = _strip_whitespace_tokens(tokenizer, encode_text(tokenizer, surface))
                    if max_len is not None and len(ids) > max_len:
                        raise ValueError(
                            f"build_label_table: {surface!r} is {len(ids)} tokens, more than "
                            f"max_len={max_len}; raise max_len."
                        )
                    if ids not in variants:
                        variants.append(ids)
        table.append(variants)
    num_variants = max(len(v) for v in table)
    max_len = max_len or max(len(ids) for variants in table for ids in variants)
    out = np.full((len(EMOTIONS), num_variants, max_len), PAD_ID, np.int32)
    for label_index, variants in enumerate(table):
        for v in range(num_variants):
            ids = variants[v] if v < len(variants) else variants[0]
            out[label_index, v, : len(ids)] = ids
    return out


def emotion_reward(
    completion_ids: jax.Array,
    completion_mask: jax.Array,
    marker_ids: Mapping[str, int],
    gold_emotion_id: jax.Array,
    label_table: jax.Array,
    whitespace_ids: Sequence[int] | jax.Array = (),
) -> jax.Array:
    """[N] float32: 1.0 where the emotion span equals the gold label (index into EMOTIONS).

    marker_ids: mapping marker string -> id (only the emotion markers are used); label_table from
    `build_label_table`; whitespace_ids from `whitespace_token_ids` (the same tokenizer).
    """
    ids = completion_ids  # [N, T]
    num_positions = ids.shape[1]
    max_len = label_table.shape[-1]
    valid = completion_mask > 0  # [N, T]
    begin_marker, end_marker = SPAN_MARKERS["emotion"]
    begin_count, begin = find_token(ids, valid, marker_ids[begin_marker])  # [N] each
    end_count, end = find_token(ids, valid, marker_ids[end_marker])
    span_found = (begin_count == 1) & (end_count == 1) & (begin < end)  # [N]

    position = jnp.arange(num_positions)  # [T]
    inside = valid & (position > begin[:, None]) & (position < end[:, None])  # [N, T]
    word = inside & ~jnp.isin(ids, jnp.asarray(whitespace_ids, jnp.int32))  # [N, T]
    first = jnp.argmax(word, axis=1)  # [N]
    last = num_positions - 1 - jnp.argmax(word[:, ::-1], axis=1)  # [N]
    length = jnp.where(word.any(axis=1), last - first + 1, 0)  # [N]

    slot = jnp.arange(max_len)  # [L]
    gathered = jnp.take_along_axis(ids, jnp.minimum(first[:, None] + slot, num_positions - 1), axis=1)  # [N, L]
    span = jnp.where(slot < length[:, None], gathered, PAD_ID)  # [N, L]
    candidates = jnp.asarray(label_table)[gold_emotion_id]  # [N, V, L]
    matches = jnp.any(jnp.all(candidates == span[:, None, :], axis=-1), axis=-1)  # [N]
    return (span_found & (length > 0) & (length <= max_len) & matches).astype(jnp.float32)
