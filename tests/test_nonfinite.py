"""`optim.skip_nonfinite`: a non-finite loss, gradient or update is not applied (parameters and optimizer
state keep their exact bits), it is counted, and the error that stops a run says what to do."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kardia_jax import optim
from helpers_training import assert_same_bits, tiny_config

PARAMS = {"w": jnp.array([[1.0, -0.0], [2.0, -3.0]]), "final_norm": jnp.array([1.0, 0.5])}  # -0.0: +0 would flip it


def _step(optimizer):
    @jax.jit
    def step(params, opt_state, grads, loss):
        updates, opt_state = optimizer.update(grads, opt_state, params, loss=loss)
        return optim.apply_updates(params, updates, opt_state), opt_state

    return step


def _progress(opt_state):
    p = optim.optimizer_progress(opt_state)
    return p.updates, p.nonfinite, p.consecutive_nonfinite


@pytest.mark.parametrize("poison", ["loss", "grads", "updates"])
def test_a_nonfinite_update_is_skipped_bit_for_bit_and_counted(poison):
    """One finite update, then one poisoned in its loss (NaN), its gradients (an Inf) or only in the
    updates AdamW makes of finite gradients (an infinite learning rate), then a finite one again."""
    lr = jnp.inf if poison == "updates" else 1e-2
    optimizer = optim.make_optimizer(lr, 0, 10, weight_decay=0.1, grad_clip=1.0)
    step = _step(optimizer)
    grads = {"w": jnp.array([[0.5, -1.0], [0.0, 2.0]]), "final_norm": jnp.array([0.1, -0.2])}
    state = optimizer.init(PARAMS)
    if poison != "updates":
        params, state = step(PARAMS, state, grads, 1.0)
        assert _progress(state) == (1, 0, 0)
    else:
        params = PARAMS
    before = (params, state)

    bad_grads = jax.tree.map(lambda g: g.at[0].set(jnp.inf), grads) if poison == "grads" else grads
    params, state = step(params, state, bad_grads, jnp.nan if poison == "loss" else 1.0)
    assert_same_bits((params, state.inner), (before[0], before[1].inner))
    updates, nonfinite, consecutive = _progress(before[1])
    assert _progress(state) == (updates, nonfinite + 1, 1)
    params, state = step(params, state, bad_grads, jnp.nan if poison == "loss" else 1.0)
    assert_same_bits(params, before[0])
    assert _progress(state) == (updates, nonfinite + 2, 2)
    if poison == "updates":
        return
    # A finite update afterwards is applied exactly as it would have been without the skipped ones.
    params, state = step(params, state, grads, 1.0)
    assert _progress(state) == (updates + 1, 2, 0)
    want_params, want_state = step(*before, grads, 1.0)
    assert_same_bits((params, state.inner), (want_params, want_state.inner))


def test_finite_updates_are_the_wrapped_optimizers():
    """The guard changes nothing on finite steps: the updates of plain AdamW + clipping."""
    schedule = optim.make_schedule(1e-2, 2, 10)
    plain = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1, mask=lambda p: {
        "w": True, "final_norm": False}))
    guarded = optim.make_optimizer(1e-2, 2, 10, weight_decay=0.1, grad_clip=1.0)
    grads = {"w": jnp.full((2, 2), 0.3), "final_norm": jnp.array([0.1, -0.2])}
    p, s = PARAMS, plain.init(PARAMS)
    q, t = PARAMS, guarded.init(PARAMS)
    step = _step(guarded)
    for _ in range(3):
        updates, s = plain.update(grads, s, p)
        p = optax.apply_updates(p, updates)
        q, t = step(q, t, grads, 1.0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), q, p)  # float32, jit vs eager
    assert _progress(t) == (3, 0, 0)


def test_a_bfloat16_first_moment_is_optax_adamws_with_mu_dtype():
    """mu_dtype="bfloat16": the first moment is stored in bfloat16 (the second stays float32), and the
    updates are those of optax.adamw(mu_dtype=bfloat16) exactly (the same float32 arithmetic, jitted alike)."""
    schedule = optim.make_schedule(1e-2, 0, 10)
    plain = optax.adamw(schedule, weight_decay=0.0, mu_dtype=jnp.bfloat16)
    guarded = optim.make_optimizer(1e-2, 0, 10, weight_decay=0.0, grad_clip=0.0, mu_dtype="bfloat16")
    grads = {"w": jnp.array([[0.3, -1.7], [1e-3, 2.5]]), "final_norm": jnp.array([0.1, -0.2])}
    p, s = PARAMS, plain.init(PARAMS)
    q, t = PARAMS, guarded.init(PARAMS)
    step, plain_step = _step(guarded), jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(*plain.update(grads, s, p)))
    for _ in range(3):
        p, s = plain_step(p, s)
        q, t = step(q, t, grads, 1.0)
    assert_same_bits(q, p)
    adam = t.inner[0]
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(adam.mu))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(adam.nu))


def test_learning_rate_of_the_latest_update():
    """The schedule index of the latest update: the count before it, which a skipped update leaves alone."""
    applied = optim.OptimizerProgress(updates=5, nonfinite=1, consecutive_nonfinite=0)
    skipped = optim.OptimizerProgress(updates=5, nonfinite=2, consecutive_nonfinite=1)
    assert applied.latest_update == 4 and skipped.latest_update == 5
    assert skipped.metrics() == {"train/nonfinite_updates": 2, "train/consecutive_nonfinite": 1}


def test_the_error_says_where_what_and_what_to_try():
    stats = {"loss": np.float32(np.nan), "grad_norm": np.float32(np.inf)}
    below = optim.OptimizerProgress(updates=7, nonfinite=3, consecutive_nonfinite=2)
    assert optim.nonfinite_error(below, section="sft", limit=3, step=9, stats=stats, checkpoint_dir="/ckpt") is None
    at = optim.OptimizerProgress(updates=7, nonfinite=4, consecutive_nonfinite=3)
    error = optim.nonfinite_error(at, section="sft", limit=3, step=10, stats=stats, checkpoint_dir="/ckpt")
    assert isinstance(error, FloatingPointError)
    message = str(error)
    for part in ("3 updates in a row", "step 10", "sft.max_consecutive_nonfinite=3", "the loss is nan",
                 "the gradient norm is inf", "/ckpt", "update 7", "sft.learning_rate", "sft.grad_clip"):
        assert part in message, (part, message)
    finite = {"loss": np.float32(2.5), "grad_norm": np.float32(0.5)}
    message = str(optim.nonfinite_error(at, section="grpo", limit=3, step=10, stats=finite, checkpoint_dir="/c"))
    assert "the optimizer's update is not" in message and "grpo.learning_rate" in message


def test_the_limit_is_checked():
    config = tiny_config()
    assert optim.nonfinite_limit(config.sft, "sft") == 10
    config.grpo.max_consecutive_nonfinite = 0
    with pytest.raises(ValueError, match="grpo.max_consecutive_nonfinite=0 must be >= 1"):
        optim.nonfinite_limit(config.grpo, "grpo")
