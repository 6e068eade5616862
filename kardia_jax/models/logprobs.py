"""Log-probabilities of target tokens under the LM head, T positions at a time.

The [B, T, V] logits of a long batch do not fit next to the model, so both entry points work on
chunks of C positions, from final-normed hidden states h [B, T, D] and the unembedding [D, V]:
`chunked_logprobs` (logprobs and entropies; autodiff through rematerialized chunks) and
`fused_token_loss` (a loss summed over per-token terms, whose gradient is formed in the forward by a
custom VJP: the GRPO and SFT losses).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kardia_jax.models.layers import dense


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
