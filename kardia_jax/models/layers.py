"""Stateless building blocks of the decoder: RMSNorm, rotary embeddings, positions, `dense` and the
embedding lookup.

They are plain functions of arrays (no parameters of their own), shared by `decoder` and `logprobs`.
Shapes: B batch, T tokens, N any feature axis, Dh head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kardia_jax import sharding


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Positions for a left- or right-padded batch: [B, T] int mask -> [B, T] int32 (pads get 0)."""
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: float) -> jax.Array:
    """RMSNorm in float32, scaled by (offset + weight), cast back to x's dtype. x [..., N], weight [N]."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * (offset + weight.astype(jnp.float32))).astype(x.dtype)


@functools.lru_cache(maxsize=16)
def _rope_table(length: int, head_dim: int, theta: float) -> np.ndarray:
    """[length, 2, Dh/2] float32: sin and cos of the rotary angles of positions 0 … length - 1, computed
    as HF does (angle = position * inverse frequency in float32)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = np.float32(1.0) / np.float32(theta) ** exponents  # [Dh/2], float32 throughout as in HF
    angles = np.arange(length, dtype=np.float32)[:, None] * inv_freq  # [length, Dh/2] float32
    return np.stack([np.sin(angles), np.cos(angles)], axis=1)


def rope_tables(positions: jax.Array, head_dim: int, theta: float, max_positions: int) -> tuple[jax.Array, jax.Array]:
    """(sin, cos) [B, T, 1, Dh/2] float32 of the rotary angles at `positions` [B, T], looked up in a
    constant table of `max_positions` rows; a position outside it gives NaN, not a wrong rotation.

    A forward looks them up once and every layer's q and k rotations (forward and backward) read them;
    sines and cosines computed in the graph instead are fused by XLA into each rotation and evaluated
    again for every element of q and k.
    """
    table = jnp.take(jnp.asarray(_rope_table(max_positions, head_dim, theta)), positions, axis=0, mode="fill",
                     fill_value=jnp.nan)  # [B, T, 2, Dh/2]
    return table[:, :, None, 0], table[:, :, None, 1]


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotary embedding, half-split layout as in HF. x [B, T, N, Dh]; rope: `rope_tables` of its positions."""
    sin, cos = rope
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def dense(x: jax.Array, w: jax.Array, n_in: int = 1, out_dtype=None) -> jax.Array:
    """x [..., *in] @ w [*in, *out] -> [..., *out] as one 2-D matmul ([rows, prod(in)] @ [prod(in), prod(out)]).

    `n_in` is the number of input dims; `out_dtype` the accumulation/output dtype (default x's). On
    TPU an einsum with several free dims is the same program; on XLA:CPU its backward is slower than
    the flattened matmul's.
    """
    lead, out_shape = x.shape[: x.ndim - n_in], w.shape[n_in:]
    k = math.prod(w.shape[:n_in])
    y = jax.lax.dot(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=out_dtype)
    return y.reshape(lead + out_shape)


def embedding_lookup(table: jax.Array, tokens: jax.Array, dtype, rules: sharding.Rules | None) -> jax.Array:
    """table [V, D] (the parameter, e.g. the float32 master, sharded ("vocab", "embed")), tokens [B, T]
    int -> [B, T, D] rows of the table in `dtype`, split over the batch.

    Forward: the table cast to `dtype` and gathered over fsdp but kept split over the vocabulary on the
    tensor axis; each device looks up its own batch rows in its vocabulary shard and the tensor axis sums
    them (a vocab-parallel embedding). Left to itself, the SPMD partitioner gathers the ids too and
    computes the whole batch's lookup on every device, then re-splits it.
    Backward (`_lookup_bwd`): jnp.take's transpose would scatter-add every device's rows into a dense
    [V, D] table and all-reduce it (for Qwen2.5-3B, 0.6 GB per buffer, the peak of the GRPO update);
    here the table's gradient is formed already sharded like the parameter, in float32.
    """
    return _lookup(table, tokens, (tuple(table.shape), jnp.dtype(table.dtype), jnp.dtype(dtype)), rules)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _lookup(table, tokens, static, rules):
    table = sharding.constrain(table.astype(static[2]), ("vocab", None), rules)  # [V, D]: V split over tensor
    tokens = sharding.constrain(tokens, ("activation_batch", "activation_length"), rules)
    return jnp.take(table, tokens, axis=0)


def _lookup_fwd(table, tokens, static, rules):
    return _lookup(table, tokens, static, rules), tokens


def _lookup_bwd(static, rules, tokens, g):
    """d table [V, D] = sum of g's rows at their ids, returned sharded ("vocab", "embed"): every device takes
    the whole batch's ids (int32, small) and its D slice of g [B, T, D] (an all-to-all of activations), and
    scatter-adds them into a table split over D by fsdp (on TPU the partitioner keeps the scatter whole
    over the vocabulary, [V, D / fsdp] in float32; XLA's dump for qwen3b on v5e-8: 0.31 GB, where take's
    transpose held four 0.62 GB [V, D] buffers)."""
    shape, master_dtype, _ = static
    g = sharding.constrain(g.astype(jnp.float32), (None, None, "embed"), rules)  # [B, T, D]: D split over fsdp
    ids = sharding.constrain(tokens, (None, None), rules)
    zeros = sharding.constrain(jnp.zeros(shape, jnp.float32), ("vocab", "embed"), rules)
    table = sharding.constrain(zeros.at[ids].add(g), ("vocab", "embed"), rules)
    return table.astype(master_dtype), None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)
