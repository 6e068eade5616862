"""Attention over blocks of keys/values with one joint softmax, and the block-structured KV cache.

Shapes: N query rows, T new tokens, S columns of a block, K kv heads, G = H // K query heads per kv
head, Dh head dim, L layers.

A cache is one block of its *own* columns, which decoding writes, and a tuple of read-only *prefix*
blocks that it reads in place. A prefix block may have fewer rows than the cache (the row count
divides N): rows r·F … r·F + F - 1 then read its row r. That is how the G samples of a prompt (or the
five criteria of a judged completion) read one copy of their shared prompt's keys and values instead
of G copies. Keys and values are stored heads before columns, [N, K, S, Dh], so the attention
contractions read them without transposing.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kardia_jax.models.config import DTYPES, ModelConfig

# Masked scores: finite, so a fully-masked row gives a uniform softmax instead of NaN.
NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def causal_mask(input_mask: jax.Array) -> jax.Array:
    """[N, T] validity -> [N, T, T] bool: query t sees valid keys at positions <= t."""
    t = input_mask.shape[1]
    return jnp.tril(jnp.ones((t, t), bool))[None] & input_mask.astype(bool)[:, None, :]


def attend(q: jax.Array, blocks) -> jax.Array:
    """Attention of q over several key/value blocks with one joint softmax.

    q: [N, T, K, G, Dh], already scaled by 1/sqrt(Dh). Each block is (k, v, mask) with k, v
    [Nb, K, S, Dh] and mask [Nb, T or 1, S] bool. A block may have fewer rows than q (Nb divides N):
    query rows n*F ... n*F + F - 1 (F = N // Nb) then share block row n. Blocks with no columns are
    skipped. Returns [N, T, K, G, Dh].
    """
    n, t, kh, g, dh = q.shape
    # Per block, the F·T·G query rows that read one key/value row form one row axis R, so both products
    # are plain batched matmuls over (block row, kv head): [R, Dh] x [S, Dh]^T and [R, S] x [S, Dh]
    # (einsums with the query axes spread out make XLA:CPU transpose in the backward). The per-query
    # statistics meet in the common [N, T, K, G] layout.
    def rows(x, nb):  # [N, T, K, G, ...] -> [Nb, K, R, ...]
        x = x.reshape((nb, n // nb) + x.shape[1:])
        return jnp.moveaxis(x, 3, 1).reshape((nb, kh, -1) + x.shape[5:])

    def unrows(x, nb):  # [Nb, K, R, ...] -> [N, T, K, G, ...]
        x = x.reshape((nb, kh, n // nb, t, g) + x.shape[3:])
        return jnp.moveaxis(x, 1, 3).reshape((n, t, kh, g) + x.shape[5:])

    scores, values = [], []
    for k, v, mask in blocks:
        if k.shape[2] == 0:
            continue
        nb = k.shape[0]
        s = jnp.einsum("bkrd,bksd->bkrs", rows(q, nb), k.astype(q.dtype), preferred_element_type=jnp.float32)
        cols = jnp.broadcast_to(mask[:, None, :, None, :], (nb, n // nb, t, g, mask.shape[-1]))  # [Nb, F, T, G, S]
        s = jnp.where(cols.reshape(nb, 1, -1, mask.shape[-1]), s, NEG_INF)  # [Nb, K, R, S]
        scores.append(s)
        values.append(v.astype(q.dtype))
    top = functools.reduce(jnp.maximum, [unrows(s.max(-1), s.shape[0]) for s in scores])  # [N, T, K, G]
    out = jnp.zeros((n, t, kh, g, dh), jnp.float32)
    norm = jnp.zeros((n, t, kh, g), jnp.float32)
    for s, v in zip(scores, values):
        nb = v.shape[0]
        e = jnp.exp(s - rows(top, nb)[..., None])  # [Nb, K, R, S]
        norm = norm + unrows(e.sum(-1), nb)
        o = jnp.einsum("bkrs,bksd->bkrd", e.astype(q.dtype), v, preferred_element_type=jnp.float32)
        out = out + unrows(o, nb)
    return (out / norm[..., None]).astype(q.dtype)


class KVBlock(NamedTuple):
    """The keys and values of S cached columns for every layer (a pytree)."""

    k: tuple[jax.Array, ...]  # L x [Nb, K, S, Dh]
    v: tuple[jax.Array, ...]  # L x [Nb, K, S, Dh]
    valid: jax.Array  # [Nb, S] bool: which columns hold real tokens

    def layer(self, i: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Layer i's block as `attend` reads it: (k, v, mask [Nb, 1, S])."""
        return self.k[i], self.v[i], self.valid[:, None, :]


class KVCache(NamedTuple):
    """A KV cache (a pytree): its own block of columns, the write position, and read-only prefixes.

    `own` holds the columns this cache writes; decoding T tokens writes columns [end, end + T) of it
    (`end` is the same for every row: prompts are left-padded). `prefix` holds blocks of earlier tokens,
    outermost first, that every step reads in place; each has a row count dividing `own`'s (see the
    module docstring).
    """

    own: KVBlock  # [N, K, S, Dh] per layer; S may be 0 (a cache that only reads its prefixes)
    end: jax.Array  # [] int32: the next column of `own` to write
    prefix: tuple[KVBlock, ...] = ()

    def as_prefix(self) -> tuple[KVBlock, ...]:
        """All blocks of this cache, outermost first: the prefix of a cache that continues it."""
        return (*self.prefix, self.own)

    def read_blocks(self, layer: int, own: bool = True) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
        """Layer `layer`'s read-only (k, v, mask) blocks for `attend`: the own columns (unless `own` is
        False: they are being written), then the prefixes."""
        return [b.layer(layer) for b in ((self.own,) if own else ()) + self.prefix]


def _empty_block(rows: int, length: int, num_layers: int, kv_heads: int, head_dim: int, dtype) -> KVBlock:
    shape = (rows, kv_heads, length, head_dim)
    return KVBlock(
        k=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
        v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
        valid=jnp.zeros((rows, length), bool),
    )


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
    """An empty KV cache for `batch` rows and `length` columns."""
    dtype = dtype or DTYPES[config.dtype]
    own = _empty_block(batch, length, config.num_layers, config.num_kv_heads, config.head_dim, dtype)
    return KVCache(own, jnp.zeros((), jnp.int32))


def fan_out_prefix(cache: KVCache, num_samples: int, length: int) -> KVCache:
    """A fresh cache of N·num_samples rows and `length` empty columns whose prefix is all of `cache`.

    The cache's own block joins its prefix blocks (outermost first), so prefixes nest: rows
    r·F … r·F + F - 1 of the new cache read row r of `cache` in place, not copies of it. With
    `length` 0 the new cache only reads (its tokens are not written anywhere).
    """
    k = cache.own.k[0]  # [N, K, S, Dh]
    own = _empty_block(k.shape[0] * num_samples, length, len(cache.own.k), k.shape[1], k.shape[3], k.dtype)
    return KVCache(own, jnp.zeros((), jnp.int32), cache.as_prefix())
