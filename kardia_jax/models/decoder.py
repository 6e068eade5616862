"""One Flax NNX decoder for the Qwen2/2.5, Qwen3 and Gemma (v1) families.

Parameters of the L transformer layers are stacked on a leading `layers` axis and the layer is applied
with `jax.lax.scan`, so compile time does not grow with depth. Every parameter carries `logical_axes`
metadata that `kardia_jax.sharding` maps to the mesh.

Shapes: B batch, T new tokens, S cache length, D hidden, H query heads, K kv heads, G = H // K,
Dh head dim, F mlp width, V vocab, L layers.

Attention masks come as a per-token validity mask [B, T] (1 = real token, 0 = padding); causality is
added here. Left padding works because positions are passed explicitly (`positions_from_mask`).

A KV cache (for sampling) is a dict
  k, v   L-tuples of [B, K, S, Dh]  keys/values of each layer's cached columns (heads before columns,
                                    so the attention contractions read the cache without transposing)
  valid  [B, S] bool                which cached columns hold real tokens
  end    [] int32                   the next column to write (the same for every row: prompts are
                                    left-padded)
With a cache the layers are unrolled rather than scanned: one buffer per layer is updated in place,
where slicing a stacked [L, ...] cache inside a scan costs a copy of the layer's cache per step (3x
slower decode on CPU). A step writes its new keys/values into the buffer first and then reads the
buffer, so the update needs no copy. Sampler compile time therefore grows with depth; training
forwards (no cache) stay scanned unless `ModelConfig.scan_layers` is False.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kardia_jax import sharding
from kardia_jax.models.config import DTYPES, ModelConfig

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully-masked rows give no NaN

# Per-layer parameters: name -> (logical axes without the leading `layers`, shape from the config).
def _layer_param_shapes(c: ModelConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    d, h, k, dh, f = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    shapes = {
        "attn_norm": (("embed",), (d,)),
        "q": (("embed", "heads", "head_dim"), (d, h, dh)),
        "k": (("embed", "kv_heads", "head_dim"), (d, k, dh)),
        "v": (("embed", "kv_heads", "head_dim"), (d, k, dh)),
        "o": (("heads", "head_dim", "embed"), (h, dh, d)),
        "mlp_norm": (("embed",), (d,)),
        "gate": (("embed", "mlp"), (d, f)),
        "up": (("embed", "mlp"), (d, f)),
        "down": (("mlp", "embed"), (f, d)),
    }
    if c.qkv_bias:
        shapes |= {
            "q_bias": (("heads", "head_dim"), (h, dh)),
            "k_bias": (("kv_heads", "head_dim"), (k, dh)),
            "v_bias": (("kv_heads", "head_dim"), (k, dh)),
        }
    if c.qk_norm:
        shapes |= {"q_norm": (("head_dim",), (dh,)), "k_norm": (("head_dim",), (dh,))}
    return shapes


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Positions for a left- or right-padded batch: [B, T] int mask -> [B, T] int32 (pads get 0)."""
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)


def causal_mask(input_mask: jax.Array) -> jax.Array:
    """[N, T] validity -> [N, T, T] bool: query t sees valid keys at positions <= t."""
    t = input_mask.shape[1]
    return jnp.tril(jnp.ones((t, t), bool))[None] & input_mask.astype(bool)[:, None, :]


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

    A forward looks them up once and every layer's q and k rotations (forward and backward) read them.
    Sines and cosines computed in the graph instead are fused by XLA into each rotation and evaluated
    again for every element of q and k: on CPU that made the rotations ~5x slower.
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
    TPU an einsum with several free dims is the same program; on XLA:CPU its backward is ~2x slower
    than the flattened matmul's.
    """
    lead, out_shape = x.shape[: x.ndim - n_in], w.shape[n_in:]
    k = math.prod(w.shape[:n_in])
    y = jax.lax.dot(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=out_dtype)
    return y.reshape(lead + out_shape)


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None) -> dict[str, jax.Array]:
    """An empty KV cache for `batch` rows and `length` columns."""
    dtype = dtype or DTYPES[config.dtype]
    shape = (batch, config.num_kv_heads, length, config.head_dim)
    return {
        "k": tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        "v": tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        "valid": jnp.zeros((batch, length), bool),
        "end": jnp.zeros((), jnp.int32),
    }


def attend(q: jax.Array, blocks) -> jax.Array:
    """Attention of q over several key/value blocks with one joint softmax.

    q: [N, T, K, G, Dh], already scaled by 1/sqrt(Dh). Each block is (k, v, mask) with k, v
    [Nb, K, S, Dh] and mask [Nb, T or 1, S] bool. A block may have fewer rows than q (Nb divides N):
    query rows n*F ... n*F + F - 1 (F = N // Nb) then share block row n. That is how the G samples of
    one prompt read the prompt's KV cache once instead of G copies of it. Blocks with no columns are
    skipped. Returns [N, T, K, G, Dh].
    """
    n, t, kh, g, dh = q.shape
    # Per block, the F·T·G query rows that read one key/value row form one row axis R, so both products
    # are plain batched matmuls over (block row, kv head): [R, Dh] x [S, Dh]^T and [R, S] x [S, Dh].
    # (Einsums with the query axes spread out send XLA:CPU to slow transposes in the backward.)
    # The per-query statistics meet in the common [N, T, K, G] layout.
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
        s = jnp.where(cols.reshape(nb, 1, -1, mask.shape[-1]), s, _NEG_INF)  # [Nb, K, R, S]
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


def fan_out_prefix(cache: dict, num_samples: int, length: int) -> dict:
    """A fresh cache of B·num_samples rows and `length` empty columns whose shared *prefix* is `cache`.

    The cache's own columns join its prefix blocks (outermost first), so prefixes nest: rows
    r·F … r·F + F - 1 of the new cache read row r of `cache` in place, not copies of it. With
    `length` 0 the new cache only reads (its tokens are not written anywhere).
    """
    n = cache["valid"].shape[0] * num_samples
    own = {
        "k": tuple(jnp.zeros((n, k.shape[1], length, k.shape[3]), k.dtype) for k in cache["k"]),
        "v": tuple(jnp.zeros((n, v.shape[1], length, v.shape[3]), v.dtype) for v in cache["v"]),
        "valid": jnp.zeros((n, length), bool),
        "end": jnp.zeros((), jnp.int32),
    }
    block = {"k": cache["k"], "v": cache["v"], "valid": cache["valid"]}
    return own | {"prefix": (*cache.get("prefix", ()), block)}


def _cache_blocks(cache: dict, layer: int, own: bool = True) -> list:
    """The read-only (k, v, mask) attention blocks of one layer: the cache's own columns (unless `own` is
    False: they are being written), then its prefixes."""
    blocks = ([cache] if own else []) + list(cache.get("prefix", ()))
    return [(b["k"][layer], b["v"][layer], b["valid"][:, None, :]) for b in blocks]


class Decoder(nnx.Module):
    """Decoder-only transformer. `rules` (logical -> mesh axes) turns on activation sharding constraints."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, rules: sharding.Rules | None = None):
        self.config = config
        self.rules = None if rules is None else tuple(rules)
        c = config
        pdtype = DTYPES[c.param_dtype]
        normal = nnx.initializers.normal(0.02)

        def param(key, axes, shape, init):
            return nnx.Param(init(key, shape, pdtype), logical_axes=axes)

        self.embed = param(rngs.params(), ("vocab", "embed"), (c.vocab_size, c.hidden_size), normal)
        if not c.tie_embeddings:
            self.lm_head = param(rngs.params(), ("embed", "vocab"), (c.hidden_size, c.vocab_size), normal)
        self.final_norm = param(rngs.params(), ("embed",), (c.hidden_size,), self._norm_init)
        self.layers = nnx.Dict(
            {
                name: param(
                    rngs.params(),
                    ("layers",) + axes,
                    (c.num_layers,) + shape,
                    self._norm_init if name.endswith("norm") else (nnx.initializers.zeros if name.endswith("bias") else normal),
                )
                for name, (axes, shape) in _layer_param_shapes(c).items()
            }
        )

    def _norm_init(self, key, shape, dtype):
        """Norm weights start at identity: 1, or 0 under Gemma's (1 + weight)."""
        return jnp.full(shape, 1.0 - self.config.norm_offset, dtype)

    # -- pieces ----------------------------------------------------------------------------------
    def _constrain(self, x, *axes):
        return sharding.constrain(x, axes, self.rules)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """[B, T] int -> [B, T, D] in the compute dtype (scaled by sqrt(D) for Gemma)."""
        dtype = DTYPES[self.config.dtype]
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
        if self.config.scale_embeddings:
            x = x * jnp.asarray(math.sqrt(self.config.hidden_size), dtype)
        return self._constrain(x, "activation_batch", "activation_length", "activation_embed")

    def unembed_matrix(self) -> jax.Array:
        """[D, V]."""
        return self.embed[...].T if self.config.tie_embeddings else self.lm_head[...]

    def final_hidden(self, x: jax.Array) -> jax.Array:
        c = self.config
        return rms_norm(x, self.final_norm[...], c.rms_norm_eps, c.norm_offset)

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        """[B, T, D] final-normed hidden -> [B, T, V] float32 logits."""
        w = self.unembed_matrix().astype(h.dtype)
        logits = dense(h, w, out_dtype=jnp.float32)
        return self._constrain(logits, "activation_batch", "activation_length", "activation_vocab")

    def _layer(self, x, p, rope, self_mask, cached_blocks, own=None):
        """One transformer layer. x [N, T, D]; p: this layer's params; rope: `rope_tables` of the tokens' positions.

        The T new tokens attend to their own block under `self_mask` and to every valid column of the
        read-only `cached_blocks` (prefixes; see `attend`). Their own block is either
          own None: their keys/values alone, self_mask [N, T, T] (causal and valid);
          own (k, v, end): this layer's cache buffers [N, K, S, Dh]; the new keys/values are written
            at columns [end, end + T) first and the tokens read the whole buffer, self_mask [N, T, S].
            Write-then-read keeps the update in place: the buffer is not read after it is written.
        Returns (x, (k, v)): the new k, v [N, K, T, Dh], or with `own` the updated buffers.
        """
        c = self.config
        dtype = x.dtype
        n, t, _ = x.shape
        h = rms_norm(x, p["attn_norm"], c.rms_norm_eps, c.norm_offset)
        q = dense(h, p["q"].astype(dtype))  # [N, T, H, Dh]
        k = dense(h, p["k"].astype(dtype))  # [N, T, K, Dh]
        v = dense(h, p["v"].astype(dtype))  # [N, T, K, Dh]
        if c.qkv_bias:
            q, k, v = q + p["q_bias"].astype(dtype), k + p["k_bias"].astype(dtype), v + p["v_bias"].astype(dtype)
        if c.qk_norm:
            q = rms_norm(q, p["q_norm"], c.rms_norm_eps, c.norm_offset)
            k = rms_norm(k, p["k_norm"], c.rms_norm_eps, c.norm_offset)
        q = apply_rope(q, rope)
        k = apply_rope(k, rope)
        q = self._constrain(q, "activation_batch", "activation_length", "activation_heads", None)
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)  # [N, K, T, Dh]
        if own is not None:
            k_buf, v_buf, end = own
            write = lambda buf, new: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, 0, end, 0))
            k, v = write(k_buf, k), write(v_buf, v)
        q = q.reshape(n, t, c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim)
        q = q / jnp.asarray(math.sqrt(c.head_dim), dtype)
        attn = attend(q, [(k, v, self_mask), *cached_blocks]).reshape(n, t, c.num_heads, c.head_dim)
        x = x + dense(attn, p["o"].astype(dtype), n_in=2)
        x = self._constrain(x, "activation_batch", "activation_length", "activation_embed")

        h = rms_norm(x, p["mlp_norm"], c.rms_norm_eps, c.norm_offset)
        gate = dense(h, p["gate"].astype(dtype))  # [N, T, F]
        up = dense(h, p["up"].astype(dtype))
        act = jax.nn.gelu(gate, approximate=True) if c.activation == "gelu_tanh" else jax.nn.silu(gate)
        mlp = self._constrain(act * up, "activation_batch", "activation_length", "activation_mlp")
        x = x + dense(mlp, p["down"].astype(dtype))
        x = self._constrain(x, "activation_batch", "activation_length", "activation_embed")
        return x, (k, v)

    # -- forward ---------------------------------------------------------------------------------
    def _layer_fn(self):
        """The layer function with the configured remat policy."""
        if self.config.remat == "none":
            return self._layer
        policy = {
            "full": None,
            "dots": jax.checkpoint_policies.checkpoint_dots,
            "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        }[self.config.remat]
        return jax.checkpoint(self._layer, policy=policy)

    @property
    def _unroll(self) -> int:
        """`lax.scan`'s unroll for the layers: 1 (a loop) or all of them (`ModelConfig.scan_layers`)."""
        return 1 if self.config.scan_layers else self.config.num_layers

    def _stacked_params(self) -> dict[str, jax.Array]:
        return {name: v[...] for name, v in self.layers.items()}

    def layer_params(self) -> list[dict[str, jax.Array]]:
        """One parameter dict per layer, sliced from the stacked [L, ...] parameters.

        A decode loop slices them once, before the loop, and passes them as `layers=`: sliced inside
        the loop body, XLA:CPU copies every layer's weights on every step.
        """
        stacked = self._stacked_params()
        return [{name: value[i] for name, value in stacked.items()} for i in range(self.config.num_layers)]

    def _rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        c = self.config
        return rope_tables(positions, c.head_dim, c.rope_theta, c.max_position_embeddings)

    def _scan_layers(self, tokens, positions, input_mask):
        """Scanned forward without a cache: (final-normed hidden [N, T, D], (k, v) [L, N, K, T, Dh])."""
        layer_fn, self_mask, rope = self._layer_fn(), causal_mask(input_mask), self._rope(positions)
        x, kv = jax.lax.scan(
            lambda x, p: layer_fn(x, p, rope, self_mask, []), self.embed_tokens(tokens), self._stacked_params(), unroll=self._unroll
        )
        return self.final_hidden(x), kv

    def _unrolled(self, tokens, positions, input_mask, cache: dict, layers=None, written_valid=None):
        """Forward over `cache`'s blocks, layers unrolled. Returns (hidden [N, T, D], k, v per layer).

        Without `written_valid` the cache is only read; k, v are the new tokens' [N, K, T, Dh]. With it
        (the cache's `valid` [N, S] after the write) the new tokens are written into the cache's own
        columns at [end, end + T) (see `_layer`); k, v are the updated buffers [N, K, S, Dh].
        """
        x = self.embed_tokens(tokens)
        layer_fn = self._layer_fn()
        write = written_valid is not None
        if write:
            t, s = tokens.shape[1], written_valid.shape[1]
            seen = jnp.arange(s)[None, :] <= cache["end"] + jnp.arange(t)[:, None]  # [T, S] causal
            self_mask = written_valid[:, None, :] & seen[None]  # [N, T, S]
        else:
            self_mask = causal_mask(input_mask)
        ks, vs, rope = [], [], self._rope(positions)
        for i, p in enumerate(layers or self.layer_params()):
            own = (cache["k"][i], cache["v"][i], cache["end"]) if write else None
            x, (k, v) = layer_fn(x, p, rope, self_mask, _cache_blocks(cache, i, own=not write), own)
            ks.append(k)
            vs.append(v)
        return self.final_hidden(x), ks, vs

    def shared_prefix_hidden(self, prefix, prefix_positions, prefix_mask, tokens, positions, input_mask):
        """Final-normed hidden states of B prefixes [B, P, D] and of N rows continuing them [N, T, D].

        Rows r·F … r·F + F - 1 of `tokens` (F = N // B) continue prefix row r, e.g. the G completions
        of one GRPO prompt. Each layer runs on a prefix once, not F times, and the continuations attend
        causally to each other and to their prefix's valid columns in place (see `attend`); in the
        backward the prefix's keys and values gather the gradients of all F rows. Layers go through
        `lax.scan` as in `_scan_layers`.
        prefix*: [B, P]; tokens, positions, input_mask: [N, T].
        """
        layer_fn = self._layer_fn()
        prefix_self, self_mask = causal_mask(prefix_mask), causal_mask(input_mask)
        prefix_cols = prefix_mask.astype(bool)[:, None, :]  # [B, 1, P]
        prefix_rope, rope = self._rope(prefix_positions), self._rope(positions)

        def layer(carry, p):
            xp, x = carry
            xp, (kp, vp) = layer_fn(xp, p, prefix_rope, prefix_self, [])
            x, _ = layer_fn(x, p, rope, self_mask, [(kp, vp, prefix_cols)])
            return (xp, x), None

        init = (self.embed_tokens(prefix), self.embed_tokens(tokens))
        (xp, x), _ = jax.lax.scan(layer, init, self._stacked_params(), unroll=self._unroll)
        return self.final_hidden(xp), self.final_hidden(x)

    def prefill(self, tokens: jax.Array, positions: jax.Array, input_mask: jax.Array, context: dict | None = None):
        """Hidden states [N, T, D] and a cache holding exactly these T columns.

        Without `context` the layers are scanned, as in training. With one (a cache whose rows divide N,
        e.g. a prompt shared by all rows) the tokens attend to it too, and the returned cache keeps it as
        its prefix. Use the result as the prefix of a decode cache (`fan_out_prefix`).
        """
        if context is None:
            hidden, (k, v) = self._scan_layers(tokens, positions, input_mask)
            k, v = [k[i] for i in range(self.config.num_layers)], [v[i] for i in range(self.config.num_layers)]
            prefix = ()
        else:
            hidden, k, v = self._unrolled(tokens, positions, input_mask, context)
            prefix = fan_out_prefix(context, 1, 0)["prefix"]
        cache = {
            "k": tuple(k),
            "v": tuple(v),
            "valid": input_mask.astype(bool),
            "end": jnp.asarray(tokens.shape[1], jnp.int32),
        }
        return hidden, cache | ({"prefix": prefix} if prefix else {})

    def hidden_states(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        input_mask: jax.Array,
        cache: dict | None = None,
        layers: list[dict] | None = None,
    ) -> tuple[jax.Array, dict | None]:
        """Final-normed hidden states [N, T, D] and the updated cache (None without one).

        tokens, positions, input_mask: [N, T]. With a cache the T tokens are written at columns
        [end, end + T) of its own buffers and attend to every valid column there (causally) and in its
        prefixes; a cache with no columns of its own (prefixes only) is read and returned as it is. `layers`: `layer_params()`,
        sliced once by a caller that runs many steps.
        """
        if cache is None:
            return self._scan_layers(tokens, positions, input_mask)[0], None
        if cache["valid"].shape[1] == 0:
            return self._unrolled(tokens, positions, input_mask, cache, layers)[0], cache
        valid = jax.lax.dynamic_update_slice(cache["valid"], input_mask.astype(bool), (0, cache["end"]))
        hidden, ks, vs = self._unrolled(tokens, positions, input_mask, cache, layers, written_valid=valid)
        return hidden, cache | {"k": tuple(ks), "v": tuple(vs), "valid": valid, "end": cache["end"] + tokens.shape[1]}

    def constrain_cache(self, cache: dict) -> dict:
        """Rows over the batch axes and KV heads over `tensor`, for every block of a cache."""
        kv_axes = ("activation_batch", "activation_kv_heads", None, None)

        def block(b):
            return b | {
                "k": tuple(sharding.constrain(k, kv_axes, self.rules) for k in b["k"]),
                "v": tuple(sharding.constrain(v, kv_axes, self.rules) for v in b["v"]),
                "valid": sharding.constrain(b["valid"], ("activation_batch", None), self.rules),
            }

        out = block(cache)
        if "prefix" in cache:
            out["prefix"] = tuple(block(b) for b in cache["prefix"])
        return out

    def __call__(self, tokens, positions, input_mask, cache=None, layers=None):
        """Logits [B, T, V] float32 and the updated cache (None without one)."""
        h, cache = self.hidden_states(tokens, positions, input_mask, cache, layers)
        return self.logits_from_hidden(h), cache

    def target_logprobs(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        input_mask: jax.Array,
        targets: jax.Array,
        *,
        temperature: float = 1.0,
        chunk_size: int = 256,
        with_entropy: bool = False,
    ):
        """log p(targets[b, t] | tokens[b, :t+1]) [B, T] float32, computed `chunk_size` positions at a
        time so the [B, T, V] logits never exist at once (each chunk is rematerialized in the backward
        when there are several).
        Logits are divided by `temperature`. With `with_entropy`, also the entropy [B, T] of each
        position's distribution.
        """
        h, _ = self.hidden_states(tokens, positions, input_mask)
        return chunked_logprobs(h, self.unembed_matrix(), targets, temperature, chunk_size, with_entropy)


def _split_positions(x: jax.Array, chunk: int, mode: str = "constant") -> jax.Array:
    """[B, T, ...] -> [n, B, chunk, ...], T padded to n·chunk (zeros, or `mode` of `jnp.pad`)."""
    b, t = x.shape[:2]
    pad = -t % chunk
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), mode=mode)
    return x.reshape((b, (t + pad) // chunk, chunk) + x.shape[2:]).swapaxes(0, 1)


def _join_positions(x: jax.Array, t: int) -> jax.Array:
    """[n, B, chunk, ...] -> [B, t, ...], the inverse of `_split_positions`."""
    x = x.swapaxes(0, 1)
    return x.reshape((x.shape[0], -1) + x.shape[3:])[:, :t]


def _chunk_logprobs(hc, w, tc, temperature):
    """One chunk's logits [B, C, V] float32 (divided by `temperature`), log-normalizer and target
    logprobs [B, C]."""
    logits = dense(hc, w, out_dtype=jnp.float32) / temperature  # [B, C, V]
    logz = jax.nn.logsumexp(logits, axis=-1)  # [B, C]
    logp = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0] - logz
    return logits, logz, logp


def _softmax(logits, logz):
    """[B, C, V] probabilities from logits [B, C, V] and their log-normalizers [B, C]."""
    return jnp.exp(logits - logz[..., None])


def _entropy(probs, logits, logz):
    """[B, C] entropy of each position's distribution."""
    return logz - jnp.sum(probs * logits, axis=-1)


def chunked_logprobs(h, unembed, targets, temperature=1.0, chunk_size=256, with_entropy=False):
    """Log-probabilities of `targets` [B, T] under logits h @ unembed / temperature, in T-chunks.

    h [B, T, D], unembed [D, V]. Returns logp [B, T] (and entropy [B, T] if asked), float32. For a loss
    that is a sum of per-token terms, `fused_token_loss` computes the same values with a cheaper gradient.
    """
    t = h.shape[1]
    chunk = min(chunk_size, t)
    w = unembed.astype(h.dtype)

    def one(args):
        hc, tc = args
        logits, logz, logp = _chunk_logprobs(hc, w, tc, temperature)
        if not with_entropy:
            return logp, jnp.zeros_like(logp)
        return logp, _entropy(_softmax(logits, logz), logits, logz)

    chunks = (_split_positions(h, chunk), _split_positions(targets, chunk))
    # With several chunks each is rematerialized in the backward, so only one chunk's [B, C, V] logits
    # exist at a time; one chunk is computed directly (remat would only add a matmul).
    if chunks[0].shape[0] == 1:
        logp, ent = jax.tree.map(lambda x: x[None], one(jax.tree.map(lambda x: x[0], chunks)))
    else:
        logp, ent = jax.lax.map(jax.checkpoint(one), chunks)  # [n, B, C]
    if not with_entropy:
        return _join_positions(logp, t)
    return _join_positions(logp, t), _join_positions(ent, t)


def fused_token_loss(h, unembed, targets, token_loss, aux, *, temperature=1.0, chunk_size=32, with_entropy=False):
    """A loss that sums per-token terms of the targets' logprobs, with its gradient formed in the forward.

    loss = sum_{b,t} token_loss(logp, aux)[b, t], where logp [B, T] = log softmax(h @ unembed /
    temperature)[targets] (h [B, T, D], unembed [D, V], targets [B, T]) and `aux` is a pytree of [B, T]
    arrays. `token_loss(logp_chunk, aux_chunk)` gets [B, C] slices and must be elementwise: its
    [b, t] entry may depend only on logp[b, t] and aux[·][b, t].

    Returns (loss [], logp [B, T], entropy [B, T] or None); only `loss` carries a gradient, to h and
    unembed (aux is treated as constant).

    Why: the gradient of such a loss with respect to the logits is c ⊙ (onehot(target) − softmax) with
    c = d token_loss / d logp, known as soon as the chunk's logits are. So, `chunk_size` positions at a
    time, the forward computes the logits, c, and from them dh (= dlogits @ unembedᵀ) and the
    accumulated d unembed (= hᵀ @ dlogits); the backward only scales them. That is three vocab-sized
    matmuls (autodiff of a rematerialized `chunked_logprobs` takes four), and only one chunk's
    [B, C, V] logits is ever alive, in the gradient as in the forward.
    """
    loss, logp, ent = _fused_token_loss(h, unembed, targets, aux, token_loss, temperature, chunk_size, with_entropy)
    logp = jax.lax.stop_gradient(logp)
    return loss, logp, jax.lax.stop_gradient(ent) if with_entropy else None


def _fused_chunks(h, unembed, targets, aux, token_loss, temperature, chunk_size, with_entropy, grads):
    """`fused_token_loss`'s chunked pass. Returns (loss, logp, entropy) and, if `grads`, (dh, d unembed)."""
    b, t, d = h.shape
    chunk = min(chunk_size, t)
    w = unembed.astype(h.dtype)
    valid = _split_positions(jnp.ones((b, t), bool), chunk)  # padded positions add no loss
    # Pad aux by repeating its last position, so token_loss sees finite values there too.
    chunks = (_split_positions(h, chunk), _split_positions(targets, chunk), valid,
              jax.tree.map(lambda x: _split_positions(x, chunk, mode="edge"), aux))

    def one(dw, args):
        hc, tc, vc, ac = args
        logits, logz, logp = _chunk_logprobs(hc, w, tc, temperature)  # [B, C, V], [B, C], [B, C]
        probs = _softmax(logits, logz) if with_entropy or grads else None
        ent = _entropy(probs, logits, logz) if with_entropy else jnp.zeros_like(logp)
        per_token = lambda lp: jnp.sum(jnp.where(vc, token_loss(lp, ac), 0.0))
        if not grads:
            return dw, (per_token(logp), logp, ent, None)
        loss, coef = jax.value_and_grad(per_token)(logp)  # coef = d loss / d logp  [B, C]
        onehot = jax.nn.one_hot(tc, logits.shape[-1], dtype=jnp.float32)
        dlogits = ((coef / temperature)[..., None] * (onehot - probs)).astype(h.dtype)  # [B, C, V]
        dh = dense(dlogits, w.T, out_dtype=jnp.float32).astype(h.dtype)  # [B, C, D]
        dw = dw + jax.lax.dot(hc.reshape(-1, d).T, dlogits.reshape(-1, dlogits.shape[-1]),
                              preferred_element_type=jnp.float32)  # [D, V]
        return dw, (loss, logp, ent, dh)

    dw, (loss, logp, ent, dh) = jax.lax.scan(one, jnp.zeros(unembed.shape, jnp.float32) if grads else None, chunks)
    outputs = (loss.sum(), _join_positions(logp, t), _join_positions(ent, t))
    return (outputs, (_join_positions(dh, t), dw.astype(unembed.dtype))) if grads else outputs


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused_token_loss(h, unembed, targets, aux, token_loss, temperature, chunk_size, with_entropy):
    """Without differentiation (evaluation): the chunked loss, no gradient work."""
    return _fused_chunks(h, unembed, targets, aux, token_loss, temperature, chunk_size, with_entropy, grads=False)


def _fused_token_loss_fwd(h, unembed, targets, aux, token_loss, temperature, chunk_size, with_entropy):
    return _fused_chunks(h, unembed, targets, aux, token_loss, temperature, chunk_size, with_entropy, grads=True)


def _fused_token_loss_bwd(token_loss, temperature, chunk_size, with_entropy, residuals, cotangents):
    del token_loss, temperature, chunk_size, with_entropy
    dh, dw = residuals
    g = cotangents[0]  # logp and entropy leave `fused_token_loss` through stop_gradient: no cotangent
    return g.astype(dh.dtype) * dh, g.astype(dw.dtype) * dw, None, None


_fused_token_loss.defvjp(_fused_token_loss_fwd, _fused_token_loss_bwd)
