"""One Flax NNX decoder for the Qwen2/2.5, Qwen3 and Gemma (v1) families.

Parameters of the L transformer layers are stacked on a leading `layers` axis and the layer is applied
with `jax.lax.scan`, so compile time does not grow with depth. Every parameter carries `logical_axes`
metadata that `kardia_jax.sharding` maps to the mesh.

Shapes: B batch, T new tokens, S cache length, D hidden, H query heads, K kv heads, G = H // K,
Dh head dim, F mlp width, V vocab, L layers.

Attention masks come as a per-token validity mask [B, T] (1 = real token, 0 = padding); causality is
added here. Left padding works because positions are passed explicitly (`positions_from_mask`).

A KV cache (for sampling) is a dict
  k, v   [L, B, S, K, Dh]   keys/values of all cached columns
  valid  [B, S] bool        which cached columns hold real tokens
  end    [] int32           the next column to write (the same for every row: prompts are left-padded)
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
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "valid": jnp.zeros((batch, length), bool),
        "end": jnp.zeros((), jnp.int32),
    }


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
        x = jnp.take(self.embed.value, tokens, axis=0).astype(dtype)
        if self.config.scale_embeddings:
            x = x * jnp.asarray(math.sqrt(self.config.hidden_size), dtype)
        return self._constrain(x, "activation_batch", "activation_length", "activation_embed")

    def unembed_matrix(self) -> jax.Array:
        """[D, V]."""
        return self.embed.value.T if self.config.tie_embeddings else self.lm_head.value

    def final_hidden(self, x: jax.Array) -> jax.Array:
        c = self.config
        return rms_norm(x, self.final_norm.value, c.rms_norm_eps, c.norm_offset)

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        """[B, T, D] final-normed hidden -> [B, T, V] float32 logits."""
        w = self.unembed_matrix().astype(h.dtype)
        logits = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
        return self._constrain(logits, "activation_batch", "activation_length", "activation_vocab")

    def _layer(self, x, p, positions, key_mask, kv, cache_k, cache_v):
        """One transformer layer. x [B, T, D]; p: this layer's params; key_mask [B, T, S] bool.

        Without a cache (cache_k is None) the keys are the T new tokens (S = T). With a cache the new
        keys/values are written at column `kv` of cache_k/cache_v [B, S, K, Dh] and attention runs over S.
        Returns (x, cache_k, cache_v).
        """
        c = self.config
        dtype = x.dtype
        b, t, _ = x.shape
        h = rms_norm(x, p["attn_norm"], c.rms_norm_eps, c.norm_offset)
        q = jnp.einsum("btd,dhk->bthk", h, p["q"].astype(dtype))  # [B, T, H, Dh]
        k = jnp.einsum("btd,dhk->bthk", h, p["k"].astype(dtype))  # [B, T, K, Dh]
        v = jnp.einsum("btd,dhk->bthk", h, p["v"].astype(dtype))  # [B, T, K, Dh]
        if c.qkv_bias:
            q, k, v = q + p["q_bias"].astype(dtype), k + p["k_bias"].astype(dtype), v + p["v_bias"].astype(dtype)
        if c.qk_norm:
            q = rms_norm(q, p["q_norm"], c.rms_norm_eps, c.norm_offset)
            k = rms_norm(k, p["k_norm"], c.rms_norm_eps, c.norm_offset)
        q = apply_rope(q, positions, c.rope_theta)
        k = apply_rope(k, positions, c.rope_theta)
        q = self._constrain(q, "activation_batch", "activation_length", "activation_heads", None)
        if cache_k is not None:
            cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, kv, 0, 0))
            cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, kv, 0, 0))
            k, v = cache_k.astype(dtype), cache_v.astype(dtype)  # [B, S, K, Dh]

        groups = c.num_heads // c.num_kv_heads
        q = q.reshape(b, t, c.num_kv_heads, groups, c.head_dim)  # [B, T, K, G, Dh]
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(c.head_dim)
        scores = jnp.where(key_mask[:, None, None], scores, _NEG_INF)  # [B, K, G, T, S]
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        attn = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, c.num_heads, c.head_dim)
        x = x + jnp.einsum("bthk,hkd->btd", attn, p["o"].astype(dtype))
        x = self._constrain(x, "activation_batch", "activation_length", "activation_embed")

        h = rms_norm(x, p["mlp_norm"], c.rms_norm_eps, c.norm_offset)
        gate = jnp.einsum("btd,df->btf", h, p["gate"].astype(dtype))
        up = jnp.einsum("btd,df->btf", h, p["up"].astype(dtype))
        act = jax.nn.gelu(gate, approximate=True) if c.activation == "gelu_tanh" else jax.nn.silu(gate)
        mlp = self._constrain(act * up, "activation_batch", "activation_length", "activation_mlp")
        x = x + jnp.einsum("btf,fd->btd", mlp, p["down"].astype(dtype))
        x = self._constrain(x, "activation_batch", "activation_length", "activation_embed")
        return x, cache_k, cache_v

    # -- forward ---------------------------------------------------------------------------------
    def hidden_states(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        input_mask: jax.Array,
        cache: dict[str, jax.Array] | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """Final-normed hidden states [B, T, D] and the updated cache (None without one).

        tokens, positions, input_mask: [B, T]. With a cache the T tokens occupy columns
        [end, end + T) and attend to every valid earlier column.
        """
        x = self.embed_tokens(tokens)
        t = tokens.shape[1]
        valid_new = input_mask.astype(bool)
        if cache is None:
            causal = jnp.tril(jnp.ones((t, t), bool))
            key_mask = causal[None] & valid_new[:, None, :]  # [B, T, T]
            end = None
        else:
            end = cache["end"]
            valid = jax.lax.dynamic_update_slice(cache["valid"], valid_new, (0, end))  # [B, S]
            cols = jnp.arange(valid.shape[1])
            causal = cols[None, :] <= (end + jnp.arange(t))[:, None]  # [T, S]
            key_mask = causal[None] & valid[:, None, :]  # [B, T, S]

        layer_params = {name: v.value for name, v in self.layers.items()}
        layer_fn = self._layer
        if self.config.remat != "none":
            policy = {
                "full": None,
                "dots": jax.checkpoint_policies.checkpoint_dots,
                "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
            }[self.config.remat]
            layer_fn = jax.checkpoint(layer_fn, policy=policy, static_argnums=())

        if cache is None:
            def body(x, p):
                x, _, _ = layer_fn(x, p, positions, key_mask, None, None, None)
                return x, None

            x, _ = jax.lax.scan(body, x, layer_params)
            new_cache = None
        else:
            # The cache rides in the scan carry and is updated in place, one layer slice at a time.
            def body(carry, p):
                x, ks, vs, i = carry
                x, k_i, v_i = layer_fn(x, p, positions, key_mask, end, ks[i], vs[i])
                ks = jax.lax.dynamic_update_index_in_dim(ks, k_i, i, 0)
                vs = jax.lax.dynamic_update_index_in_dim(vs, v_i, i, 0)
                return (x, ks, vs, i + 1), None

            (x, ks, vs, _), _ = jax.lax.scan(body, (x, cache["k"], cache["v"], 0), layer_params)
            new_cache = {"k": ks, "v": vs, "valid": valid, "end": end + t}
        return self.final_hidden(x), new_cache

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
