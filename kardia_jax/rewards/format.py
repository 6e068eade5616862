"""Format reward on token ids: 1 iff a completion is the four well-formed spans, else 0.

It is the id-level twin of `kardia_jax.spans.parse_spans(text) is not None`, computed in-graph:

  completion_ids   [N, T] int32   sampled tokens (anything after the mask is ignored)
  completion_mask  [N, T]         1 on generated tokens, up to and including the stop token
  -> reward        [N]    float32

Well formed means: each of the eight marker tokens occurs exactly once within the mask, in the order
understanding_begin < understanding_end < reasoning_begin < ... < response_end; each span holds at
least one content token; nothing but filler lies outside the spans. Filler is whitespace-only tokens
(`whitespace_ids`, built on the host by `whitespace_token_ids`) and the stop tokens (`ignore_ids`,
e.g. `<|im_end|>`), which are never content.

Where the two can differ (the id path is never more lenient than the text one):
- a whitespace character that the tokenizer splits over several byte tokens (e.g. U+3000 in a
  byte-level BPE) is content on ids, whitespace in text;
- markers count only as their special-token ids: marker text spelled with ordinary tokens, or the
  `<understanding>`-style tags that `parse_spans` also accepts, are content on ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kardia_jax.spans import MARKER_TOKENS

# Host-side builders take a kardia_jax `Tokenizer` (models/tokenizer.py): encode(text) -> ids with no
# BOS/EOS added, decode(ids, skip_special_tokens=False) -> str, and vocab_size.


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, without any special tokens the tokenizer would add (BOS, ...)."""
    return list(tokenizer.encode(text))


def is_whitespace_token(tokenizer, token_id: int) -> bool:
    """True if the token, decoded alone, is empty or whitespace only (str.isspace)."""
    return not tokenizer.decode([int(token_id)], skip_special_tokens=False).strip()


def whitespace_token_ids(tokenizer) -> np.ndarray:
    """[W] int32: every vocabulary id that decodes (alone) to whitespace or nothing. Host side."""
    return np.array([i for i in range(tokenizer.vocab_size) if is_whitespace_token(tokenizer, i)], np.int32)


def marker_id_array(marker_ids: Mapping[str, int]) -> jax.Array:
    """[8] int32: the marker token ids in output order (MARKER_TOKENS), from a name -> id mapping."""
    missing = [m for m in MARKER_TOKENS if m not in marker_ids]
    if missing:
        raise KeyError(f"marker_ids lacks {missing}; it needs an id for each of {MARKER_TOKENS}.")
    return jnp.stack([jnp.asarray(marker_ids[m], jnp.int32) for m in MARKER_TOKENS])


def find_token(completion_ids: jax.Array, valid: jax.Array, token_id) -> tuple[jax.Array, jax.Array]:
    """Occurrences of `token_id` among the valid positions: (count [N] int32, first position [N] int32).

    The first position is 0 when the token does not occur; check the count.
    """
    hits = (completion_ids == token_id) & valid  # [N, T]
    return hits.sum(axis=1, dtype=jnp.int32), jnp.argmax(hits, axis=1).astype(jnp.int32)


def format_reward(
    completion_ids: jax.Array,
    completion_mask: jax.Array,
    marker_ids: Mapping[str, int],
    ignore_ids: Sequence[int] | jax.Array = (),
    whitespace_ids: Sequence[int] | jax.Array = (),
) -> jax.Array:
    """[N] float32: 1.0 where the completion is four well-formed spans (see the module docstring)."""
    ids = completion_ids  # [N, T]
    valid = completion_mask > 0  # [N, T]
    markers = marker_id_array(marker_ids)  # [8]
    counts, positions = jax.vmap(lambda m: find_token(ids, valid, m), out_axes=1)(markers)  # [N, 8] each
    each_once = jnp.all(counts == 1, axis=1)  # [N]
    in_order = jnp.all(positions[:, 1:] > positions[:, :-1], axis=1)  # [N]

    is_marker = valid & jnp.isin(ids, markers)  # [N, T]
    is_filler = jnp.isin(ids, jnp.asarray(whitespace_ids, jnp.int32)) | jnp.isin(
        ids, jnp.asarray(ignore_ids, jnp.int32)
    )
    is_content = valid & ~is_marker & ~is_filler  # [N, T]
    # Segment of each token = markers before it: even segments lie outside the spans, odd ones inside
    # (once each marker occurs once, in order). Count content tokens per segment.
    segment = jnp.cumsum(is_marker, axis=1)  # [N, T], in 0..8 when well formed
    content_per_segment = jnp.sum(
        jax.nn.one_hot(segment, len(MARKER_TOKENS) + 1, dtype=jnp.int32) * is_content[..., None], axis=1
    )  # [N, 9]
    spans_filled = jnp.all(content_per_segment[:, 1::2] > 0, axis=1)  # [N]
    outside_clean = jnp.all(content_per_segment[:, 0::2] == 0, axis=1)  # [N]
    return (each_once & in_order & spans_filled & outside_clean).astype(jnp.float32)
