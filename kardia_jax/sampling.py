"""Jitted batched sampler: one prefill per prompt, fanned out to G samples, decoded in a while loop.

    prompts [B, P] (left-padded)  --prefill once-->  prompt KV cache, per layer [B, K, P, Dh]
        --becomes the shared prefix of-->  a per-sample cache [B·G, K, T_new, Dh]
        --lax.while_loop, one token per step-->  completions [B·G, T_new]

Sample i·G + g is the g-th sample of prompt i. The G samples of a prompt read its prompt cache in place
(`attention.attend` groups query rows over a shared block) instead of G copies of it: G times less cache
memory and memory traffic for the prompt part of every decode step. The loop stops early once every
row has emitted a stop token. The step key is `fold_in(key, step)`, so a run is reproducible and
independent of how many rows there are per device. The cache and the output buffers are loop carries,
updated in place.

Decode is memory-bound: a step reads every cached column. The new tokens' cache is therefore split
into `decode_segments` blocks, decoded by consecutive while loops; a loop writes only its own block,
and the blocks of finished segments join the read-only prefix. A step reads the columns filled so far
rounded up to a block, (1 + 1/s)/2 of T_new on average instead of all T_new, and the loop carry is one
small block. The price: the decode step is compiled once per segment. The layer weights are sliced out
of their stacked [L, ...] arrays once, before the loops.

A token is drawn by inverse-CDF sampling with one uniform per row, in two levels (a block of ids, then
an id inside it), which avoids both the V Gumbel draws of `jax.random.categorical` and a cumulative
sum over all V ids: both dominate the step of a small model on CPU.

Log-probabilities. `logprobs[r, t]` is log softmax(logits / temperature) at the sampled token: the
*unfiltered* temperature-scaled distribution, i.e. exactly what the trainer recomputes with
`Decoder.target_logprobs(..., temperature=...)`. Top-k / top-p only restrict which tokens can be drawn;
they do not renormalize the returned log-probabilities. With temperature 0 (greedy) the logprobs are
those of the untempered distribution (temperature 1).

Shapes are static: P comes bucketed from the data pipeline and max_new_tokens from the config, so a
training run compiles one sampler program per prompt bucket.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from kardia_jax.models import Decoder, KVCache, fan_out_prefix, positions_from_mask


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample. Hashable: it is a static argument of the jitted sampler."""

    num_samples: int = 1  # G, completions per prompt
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0  # written after a row has stopped
    decode_segments: int = 4  # while loops over equal spans of the new tokens (see the module doc)

    @classmethod
    def from_config(cls, section, tokenizer) -> "SamplingConfig":
        """How a config's `grpo` section samples (the fields it declares), stopping at `tokenizer`'s stop
        ids and padding with its pad id."""
        fields = {f.name: section[f.name] for f in dataclasses.fields(cls) if f.name in section}
        return cls(**fields, stop_ids=tuple(tokenizer.stop_ids), pad_id=tokenizer.pad_id)


class SampleOutput(NamedTuple):
    tokens: jax.Array  # [B·G, T_new] int32; pad_id after the stop token
    mask: jax.Array  # [B·G, T_new] int32; 1 on generated tokens up to and including the stop token
    logprobs: jax.Array  # [B·G, T_new] float32; 0 where mask is 0
    lengths: jax.Array  # [B·G] int32 = mask.sum(-1)
    truncated: jax.Array  # [B·G] bool; True if no stop token within max_new_tokens


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Sets logits outside the top-k / nucleus (top-p) set to -inf. logits [N, V] float32."""
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [N, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [N, V] descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        # The smallest logit still kept: the top token is always kept.
        kept = jnp.where(before < top_p, sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def _last_positive(x: jax.Array) -> jax.Array:
    """[N, M] -> [N] index of the last positive entry of each row."""
    return x.shape[-1] - 1 - jnp.argmax((x > 0)[:, ::-1], axis=-1)


def _draw(key: jax.Array, weights: jax.Array) -> jax.Array:
    """One id per row, drawn with probability proportional to `weights` [N, V] (non-negative, positive
    row sums), by inverse-CDF sampling with one uniform per row, in two levels: a block of ~sqrt(V)
    consecutive ids from the cumulative block masses, then an id from the cumulative weights inside it.
    """
    n, v = weights.shape
    size = 128 * max(1, math.ceil(math.sqrt(v) / 128))
    blocks = -(-v // size)
    w = jnp.pad(weights, ((0, 0), (0, blocks * size - v))).reshape(n, blocks, size)
    mass = w.sum(-1)  # [N, blocks]
    cdf = jnp.cumsum(mass, axis=-1)
    u = jax.random.uniform(key, (n,)) * cdf[:, -1]
    # The first block whose cdf exceeds u; rounding can push u past the last block with mass.
    j = jnp.minimum(jnp.sum(cdf <= u[:, None], axis=-1), _last_positive(mass))  # [N]
    inner = jnp.take_along_axis(w, j[:, None, None], axis=1)[:, 0]  # [N, size]
    below = jnp.take_along_axis(cdf - mass, j[:, None], axis=1)[:, 0]  # mass of the blocks before j
    u_inner = jnp.maximum(u - below, 0.0)
    i = jnp.minimum(jnp.sum(jnp.cumsum(inner, axis=-1) <= u_inner[:, None], axis=-1), _last_positive(inner))
    return j * size + i


def _choose(logits: jax.Array, key: jax.Array, config: SamplingConfig):
    """Next token [N] and its logprob under the unfiltered temperature-scaled distribution [N]."""
    greedy = config.temperature == 0
    scaled = logits if greedy else logits / config.temperature  # [N, V]
    top = jnp.max(scaled, axis=-1, keepdims=True)
    weights = jnp.exp(scaled - top)  # unnormalized probabilities
    logz = top[:, 0] + jnp.log(jnp.sum(weights, axis=-1))  # [N]
    if greedy:
        token = jnp.argmax(scaled, axis=-1)
    else:
        if config.top_k or config.top_p < 1.0:
            weights = jnp.where(filter_logits(scaled, config.top_k, config.top_p) > -jnp.inf, weights, 0.0)
        token = _draw(key, weights)
    logprob = jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0] - logz
    return token.astype(jnp.int32), logprob


def sample(model: Decoder, prompt_tokens: jax.Array, prompt_mask: jax.Array, key: jax.Array, config: SamplingConfig) -> SampleOutput:
    """Samples G completions per prompt. Pure function of its inputs: call it inside `jax.jit`
    (see `make_sampler`). prompt_tokens, prompt_mask: [B, P], left-padded."""
    b, p = prompt_tokens.shape
    g, t_new = config.num_samples, config.max_new_tokens

    # Prefill once per distinct prompt; only the last position's logits are needed.
    positions = positions_from_mask(prompt_mask)
    hidden, cache = model.prefill(prompt_tokens, positions, prompt_mask)
    logits = model.logits_from_hidden(hidden[:, -1:])[:, 0]  # [B, V]

    logits = jnp.repeat(logits, g, axis=0)  # [B·G, V]
    next_position = jnp.repeat(positions[:, -1] + 1, g)  # [B·G]
    n = b * g
    stop_ids = jnp.asarray(config.stop_ids or (-1,), jnp.int32)
    layers = model.layer_params()

    class Carry(NamedTuple):
        step: jax.Array
        cache: KVCache  # this segment's block, with the prompt and earlier segments as prefixes
        logits: jax.Array  # [N, V] logits for the token about to be chosen
        tokens: jax.Array  # [N, T_new]
        mask: jax.Array  # [N, T_new]
        logprobs: jax.Array  # [N, T_new]
        done: jax.Array  # [N] bool, stop token already emitted

    def body(c: Carry):
        token, logprob = _choose(c.logits, jax.random.fold_in(key, c.step), config)
        live = ~c.done
        token = jnp.where(live, token, config.pad_id)
        tokens = c.tokens.at[:, c.step].set(token)
        mask = c.mask.at[:, c.step].set(live.astype(jnp.int32))
        logprobs = c.logprobs.at[:, c.step].set(jnp.where(live, logprob, 0.0))
        done = c.done | jnp.isin(token, stop_ids)
        # The forward after the last step is wasted work but keeps the loop body uniform.
        step_logits, cache = model(
            token[:, None], (next_position + c.step)[:, None], live[:, None].astype(jnp.int32), c.cache, layers
        )
        return Carry(c.step + 1, cache, step_logits[:, 0], tokens, mask, logprobs, done)

    span = max(1, math.ceil(t_new / max(1, config.decode_segments)))  # new tokens per cache block
    # Fan out: the prompt cache becomes the shared prefix of the G samples' first block.
    c = Carry(
        step=jnp.zeros((), jnp.int32),
        cache=model.constrain_cache(fan_out_prefix(cache, g, min(span, t_new))),
        logits=logits,
        tokens=jnp.full((n, t_new), config.pad_id, jnp.int32),
        mask=jnp.zeros((n, t_new), jnp.int32),
        logprobs=jnp.zeros((n, t_new), jnp.float32),
        done=jnp.zeros((n,), bool),
    )
    for start in range(0, t_new, span):
        stop = min(start + span, t_new)
        if start:  # the finished block joins the read-only prefixes of a fresh one
            c = c._replace(cache=model.constrain_cache(fan_out_prefix(c.cache, 1, stop - start)))
        c = jax.lax.while_loop(lambda c, stop=stop: (c.step < stop) & ~jnp.all(c.done), body, c)
    return SampleOutput(c.tokens, c.mask, c.logprobs, c.mask.sum(-1), ~c.done)


def make_sampler(graphdef: nnx.GraphDef, config: SamplingConfig):
    """A jitted `fn(params, prompt_tokens, prompt_mask, key) -> SampleOutput` for one model graph.

    Parameters enter as arguments (not constants), so the same program serves every training step.
    """

    @jax.jit
    def run(params, prompt_tokens, prompt_mask, key):
        return sample(nnx.merge(graphdef, params), prompt_tokens, prompt_mask, key, config)

    return run


def generate(model: Decoder, prompt_tokens, prompt_mask, key, config: SamplingConfig) -> SampleOutput:
    """Convenience wrapper for one-off generation (compiles on each call with a new shape)."""
    graphdef, params = nnx.split(model)
    return _cached_sampler(graphdef, config)(params, prompt_tokens, prompt_mask, key)


@functools.lru_cache(maxsize=32)
def _cached_sampler(graphdef, config):
    return make_sampler(graphdef, config)
