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
slower decode on CPU). Sampler compile time therefore grows with depth; training forwards (no cache)
stay scanned.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
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


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: float) -> jax.Array:
    """RMSNorm in float32, scaled by (offset + weight), cast back to x's dtype. x [..., N], weight [N]."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * (offset + weight.astype(jnp.float32))).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, half-split layout as in HF. x [B, T, N, Dh], positions [B, T]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2 / x.shape[-1]))  # [Dh/2]
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, Dh/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


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
    scores, values = [], []
    for k, v, mask in blocks:
        if k.shape[2] == 0:
            continue
        nb = k.shape[0]
        qb = q.reshape(nb, n // nb, t, kh, g, dh)
        s = jnp.einsum("bftkgd,bksd->bfkgts", qb, k.astype(q.dtype), preferred_element_type=jnp.float32)
        s = jnp.where(mask[:, None, None, None], s, _NEG_INF)  # [Nb, F, K, G, T, S]
        scores.append(s)
        values.append(v.astype(q.dtype))
    top = functools.reduce(jnp.maximum, [s.max(-1).reshape(n, kh, g, t) for s in scores])  # [N, K, G, T]
    out = jnp.zeros((n, t, kh, g, dh), jnp.float32)
    norm = jnp.zeros((n, kh, g, t), jnp.float32)
    for s, v in zip(scores, values):
        nb = v.shape[0]
        e = jnp.exp(s - top.reshape(nb, n // nb, kh, g, t)[..., None])
        norm = norm + e.sum(-1).reshape(n, kh, g, t)
        o = jnp.einsum("bfkgts,bksd->bftkgd", e.astype(q.dtype), v, preferred_element_type=jnp.float32)
        out = out + o.reshape(n, t, kh, g, dh)
    return (out / jnp.moveaxis(norm, -1, 1)[..., None]).astype(q.dtype)


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


def _cache_blocks(cache: dict, layer: int) -> list:
    """The (k, v, mask) attention blocks of one layer: the cache's own columns, then its prefixes."""
    blocks = [cache] + list(cache.get("prefix", ()))
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
        logits = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
        return self._constrain(logits, "activation_batch", "activation_length", "activation_vocab")

    def _layer(self, x, p, positions, self_mask, cached_blocks):
        """One transformer layer. x [N, T, D]; p: this layer's params; self_mask [N, T, T] bool.

        The T new tokens attend causally to each other and to every valid column of `cached_blocks`
        (this layer's KV cache and its shared prefixes; see `attend`). The cache is only read
        here: the caller writes the returned new keys/values into it.
        Returns (x, (k, v)) with the new k, v [N, K, T, Dh].
        """
        c = self.config
        dtype = x.dtype
        n, t, _ = x.shape
        h = rms_norm(x, p["attn_norm"], c.rms_norm_eps, c.norm_offset)
        q = jnp.einsum("btd,dhk->bthk", h, p["q"].astype(dtype))  # [N, T, H, Dh]
        k = jnp.einsum("btd,dhk->bthk", h, p["k"].astype(dtype))  # [N, T, K, Dh]
        v = jnp.einsum("btd,dhk->bthk", h, p["v"].astype(dtype))  # [N, T, K, Dh]
        if c.qkv_bias:
            q, k, v = q + p["q_bias"].astype(dtype), k + p["k_bias"].astype(dtype), v + p["v_bias"].astype(dtype)
        if c.qk_norm:
            q = rms_norm(q, p["q_norm"], c.rms_norm_eps, c.norm_offset)
            k = rms_norm(k, p["k_norm"], c.rms_norm_eps, c.norm_offset)
        q = apply_rope(q, positions, c.rope_theta)
        k = apply_rope(k, positions, c.rope_theta)
        q = self._constrain(q, "activation_batch", "activation_length", "activation_heads", None)
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)  # [N, K, T, Dh]

        q = q.reshape(n, t, c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim)
        q = q / jnp.asarray(math.sqrt(c.head_dim), dtype)
        attn = attend(q, [(k, v, self_mask), *cached_blocks]).reshape(n, t, c.num_heads, c.head_dim)
        x = x + jnp.einsum("bthk,hkd->btd", attn, p["o"].astype(dtype))
        x = self._constrain(x, "activation_batch", "activation_length", "activation_embed")

        h = rms_norm(x, p["mlp_norm"], c.rms_norm_eps, c.norm_offset)
        gate = jnp.einsum("btd,df->btf", h, p["gate"].astype(dtype))
        up = jnp.einsum("btd,df->btf", h, p["up"].astype(dtype))
        act = jax.nn.gelu(gate, approximate=True) if c.activation == "gelu_tanh" else jax.nn.silu(gate)
        mlp = self._constrain(act * up, "activation_batch", "activation_length", "activation_mlp")
        x = x + jnp.einsum("btf,fd->btd", mlp, p["down"].astype(dtype))
        x = self._constrain(x, "activation_batch", "activation_length", "activation_embed")
        return x, (k, v)

    # -- forward ---------------------------------------------------------------------------------
    def _layer_fn_and_params(self):
        """The layer function (with the configured remat policy) and the stacked layer parameters."""
        layer_fn = self._layer
        if self.config.remat != "none":
            policy = {
                "full": None,
                "dots": jax.checkpoint_policies.checkpoint_dots,
                "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
            }[self.config.remat]
            layer_fn = jax.checkpoint(layer_fn, policy=policy)
        return layer_fn, {name: v[...] for name, v in self.layers.items()}

    def _scan_layers(self, tokens, positions, input_mask):
        """Scanned forward without a cache: (final-normed hidden [N, T, D], (k, v) [L, N, K, T, Dh])."""
        x = self.embed_tokens(tokens)
        t = tokens.shape[1]
        self_mask = jnp.tril(jnp.ones((t, t), bool))[None] & input_mask.astype(bool)[:, None, :]  # [N, T, T]
        layer_fn, layer_params = self._layer_fn_and_params()
        x, kv = jax.lax.scan(lambda x, p: layer_fn(x, p, positions, self_mask, []), x, layer_params)
        return self.final_hidden(x), kv

    def _unrolled(self, tokens, positions, input_mask, cache: dict):
        """Forward over `cache`'s blocks, layers unrolled. Returns (hidden [N, T, D], new k, v per layer
        [N, K, T, Dh])."""
        x = self.embed_tokens(tokens)
        t = tokens.shape[1]
        self_mask = jnp.tril(jnp.ones((t, t), bool))[None] & input_mask.astype(bool)[:, None, :]  # [N, T, T]
        layer_fn, layer_params = self._layer_fn_and_params()
        ks, vs = [], []
        for i in range(self.config.num_layers):
            p = {name: value[i] for name, value in layer_params.items()}
            x, (k, v) = layer_fn(x, p, positions, self_mask, _cache_blocks(cache, i))
            ks.append(k)
            vs.append(v)
        return self.final_hidden(x), ks, vs

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
    ) -> tuple[jax.Array, dict | None]:
        """Final-normed hidden states [N, T, D] and the updated cache (None without one).

        tokens, positions, input_mask: [N, T]. With a cache the T tokens attend to every valid cached
        column (its own and its prefixes') and are then written at columns [end, end + T); a cache
        with no columns of its own (prefixes only) is returned as it is.
        """
        if cache is None:
            return self._scan_layers(tokens, positions, input_mask)[0], None
        hidden, ks, vs = self._unrolled(tokens, positions, input_mask, cache)
        if cache["valid"].shape[1] == 0:
            return hidden, cache
        end = cache["end"]
        write = lambda buffer, new: jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), (0, 0, end, 0))
        return hidden, cache | {
            "k": tuple(map(write, cache["k"], ks)),
            "v": tuple(map(write, cache["v"], vs)),
            "valid": jax.lax.dynamic_update_slice(cache["valid"], input_mask.astype(bool), (0, end)),
            "end": end + tokens.shape[1],
        }

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

    def __call__(self, tokens, positions, input_mask, cache=None):
        """Logits [B, T, V] float32 and the updated cache (None without one)."""
        h, cache = self.hidden_states(tokens, positions, input_mask, cache)
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
        time so the [B, T, V] logits never exist at once (each chunk is rematerialized in the backward).
        Logits are divided by `temperature`. With `with_entropy`, also the entropy [B, T] of each
        position's distribution.
        """
        h, _ = self.hidden_states(tokens, positions, input_mask)
        return chunked_logprobs(h, self.unembed_matrix(), targets, temperature, chunk_size, with_entropy)


def chunked_logprobs(h, unembed, targets, temperature=1.0, chunk_size=256, with_entropy=False):
    """Log-probabilities of `targets` [B, T] under logits h @ unembed / temperature, in T-chunks.

    h [B, T, D], unembed [D, V]. Returns logp [B, T] (and entropy [B, T] if asked), float32.
    """
    b, t, d = h.shape
    chunk = min(chunk_size, t)
    pad = -t % chunk
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    h_chunks = h.reshape(b, n, chunk, d).swapaxes(0, 1)  # [n, B, C, D]
    t_chunks = targets.reshape(b, n, chunk).swapaxes(0, 1)  # [n, B, C]
    w = unembed.astype(h.dtype)

    @jax.checkpoint
    def one(args):
        hc, tc = args
        logits = jnp.einsum("bcd,dv->bcv", hc, w, preferred_element_type=jnp.float32) / temperature
        logz = jax.nn.logsumexp(logits, axis=-1)  # [B, C]
        logp = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0] - logz
        if not with_entropy:
            return logp, jnp.zeros_like(logp)
        probs = jnp.exp(logits - logz[..., None])
        return logp, logz - jnp.sum(probs * logits, axis=-1)

    logp, ent = jax.lax.map(one, (h_chunks, t_chunks))  # [n, B, C]
    logp = logp.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
    if not with_entropy:
        return logp
    return logp, ent.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
