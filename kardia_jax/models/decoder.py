"""One Flax NNX decoder for the Qwen2/2.5, Qwen3 and Gemma (v1) families.

Parameters of the L transformer layers are stacked on a leading `layers` axis and the layer is applied
with `jax.lax.scan`, so compile time does not grow with depth. Every parameter carries `logical_axes`
metadata that `kardia_jax.sharding` maps to the mesh.

Shapes: B batch, T new tokens, S cache length, D hidden, H query heads, K kv heads, G = H // K,
Dh head dim, F mlp width, V vocab, L layers.

Attention masks come as a per-token validity mask [B, T] (1 = real token, 0 = padding); causality is
added here. Left padding works because positions are passed explicitly (`positions_from_mask`).

With a KV cache (`attention.KVCache`, for sampling and the judge) the layers are unrolled rather than
scanned: each layer's buffer is then its own array, updated in place, where slicing a stacked
[L, ...] cache inside a scan copies the layer's cache on every step. A step writes its new
keys/values into the buffer first and then reads the buffer, so the update needs no copy. Sampler
compile time therefore grows with depth; training forwards (no cache) stay scanned unless
`ModelConfig.scan_layers` is False. (CPU measurements behind these choices: docs/benchmarks.md.)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from kardia_jax import sharding
from kardia_jax.models.attention import KVBlock, KVCache, attend, causal_mask
from kardia_jax.models.config import DTYPES, ModelConfig
from kardia_jax.models.layers import apply_rope, dense, embedding_lookup, rms_norm, rope_tables
from kardia_jax.models.logprobs import chunked_logprobs


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
        x = embedding_lookup(self.embed[...], tokens, dtype, self.rules)  # [B, T, D], split over the batch
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

    def _unrolled(self, tokens, positions, input_mask, cache: KVCache, layers=None, written_valid=None):
        """Forward over `cache`'s blocks, layers unrolled. Returns (hidden [N, T, D], k, v per layer).

        Without `written_valid` the cache is only read; k, v are the new tokens' [N, K, T, Dh]. With it
        (the own block's `valid` [N, S] after the write) the new tokens are written into the cache's own
        columns at [end, end + T) (see `_layer`); k, v are the updated buffers [N, K, S, Dh].
        """
        x = self.embed_tokens(tokens)
        layer_fn = self._layer_fn()
        write = written_valid is not None
        if write:
            t, s = tokens.shape[1], written_valid.shape[1]
            seen = jnp.arange(s)[None, :] <= cache.end + jnp.arange(t)[:, None]  # [T, S] causal
            self_mask = written_valid[:, None, :] & seen[None]  # [N, T, S]
        else:
            self_mask = causal_mask(input_mask)
        ks, vs, rope = [], [], self._rope(positions)
        for i, p in enumerate(layers or self.layer_params()):
            own = (cache.own.k[i], cache.own.v[i], cache.end) if write else None
            x, (k, v) = layer_fn(x, p, rope, self_mask, cache.read_blocks(i, own=not write), own)
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

    def prefill(self, tokens: jax.Array, positions: jax.Array, input_mask: jax.Array, context: KVCache | None = None):
        """Hidden states [N, T, D] and a cache holding exactly these T columns.

        Without `context` the layers are scanned, as in training. With one (a cache whose rows divide N,
        e.g. a prompt shared by all rows) the tokens attend to it too, and the returned cache keeps it as
        its prefix. Use the result as the prefix of a decode cache (`attention.fan_out_prefix`).
        """
        if context is None:
            hidden, (k, v) = self._scan_layers(tokens, positions, input_mask)
            k, v = [k[i] for i in range(self.config.num_layers)], [v[i] for i in range(self.config.num_layers)]
            prefix = ()
        else:
            hidden, k, v = self._unrolled(tokens, positions, input_mask, context)
            prefix = context.as_prefix()
        own = KVBlock(tuple(k), tuple(v), input_mask.astype(bool))
        return hidden, KVCache(own, jnp.asarray(tokens.shape[1], jnp.int32), prefix)

    def hidden_states(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        input_mask: jax.Array,
        cache: KVCache | None = None,
        layers: list[dict] | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-normed hidden states [N, T, D] and the updated cache (None without one).

        tokens, positions, input_mask: [N, T]. With a cache the T tokens are written at columns
        [end, end + T) of its own block and attend to every valid column there (causally) and in its
        prefixes; a cache with no columns of its own (prefixes only) is read and returned as it is.
        `layers`: `layer_params()`, sliced once by a caller that runs many steps.
        """
        if cache is None:
            return self._scan_layers(tokens, positions, input_mask)[0], None
        if cache.own.valid.shape[1] == 0:
            return self._unrolled(tokens, positions, input_mask, cache, layers)[0], cache
        valid = jax.lax.dynamic_update_slice(cache.own.valid, input_mask.astype(bool), (0, cache.end))
        hidden, ks, vs = self._unrolled(tokens, positions, input_mask, cache, layers, written_valid=valid)
        return hidden, cache._replace(own=KVBlock(tuple(ks), tuple(vs), valid), end=cache.end + tokens.shape[1])

    def constrain_cache(self, cache: KVCache) -> KVCache:
        """Rows over the batch axes and KV heads over `tensor`, for every block of a cache."""
        kv_axes = ("activation_batch", "activation_kv_heads", None, None)

        def block(b: KVBlock) -> KVBlock:
            return KVBlock(
                k=tuple(sharding.constrain(k, kv_axes, self.rules) for k in b.k),
                v=tuple(sharding.constrain(v, kv_axes, self.rules) for v in b.v),
                valid=sharding.constrain(b.valid, ("activation_batch", None), self.rules),
            )

        return KVCache(block(cache.own), cache.end, tuple(block(b) for b in cache.prefix))

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
