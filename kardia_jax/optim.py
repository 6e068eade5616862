"""The trainers' optimizer: AdamW on a warm-up + cosine schedule, inside a guard that skips non-finite
updates (used by SFT and GRPO alike; the rest of what they share is `kardia_jax.scaffold`).

    optimizer = make_optimizer(lr, warmup_steps, total_steps, weight_decay, grad_clip)
    opt_state = init_optimizer(optimizer, params)         # moments sharded like the params
    # in the jitted step:
    updates, opt_state = optimizer.update(grads, opt_state, params, loss=loss)
    params = apply_updates(params, updates, opt_state)    # unchanged if the update was not finite
    # in the loop:
    progress = optimizer_progress(opt_state)              # updates applied, non-finite counts

Gradient accumulation is the trainer's job, not the optimizer's: each trainer runs its minibatches
in a `lax.scan` inside its jitted step and divides the summed gradient by a normalizer of the *whole*
global batch (e.g. its masked-token count), so k minibatches give exactly the one-big-batch update.
`optax.MultiSteps` would average per-minibatch means instead (wrong when minibatches hold different
numbers of tokens) and costs a jitted call per minibatch.

An update whose loss, gradients or updates hold a NaN or an Inf is not applied (`skip_nonfinite`):
parameters and optimizer state stay as they were, bit for bit, so every checkpoint stays finite. The
optimizer state counts such updates, and a trainer stops its run with `nonfinite_error` after
`<section>.max_consecutive_nonfinite` of them in a row.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec


# -- the optimizer -------------------------------------------------------------------------------


def make_schedule(learning_rate: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `learning_rate` over `warmup_steps` updates, then cosine decay to 0 at
    `total_steps` updates. Evaluated at the number of updates applied before the current one (the count
    in the optimizer state), so a trainer making several updates per step passes its counts in updates.

    Without warm-up it is the cosine part alone: optax's warm-up schedule would build a 0-step linear
    part, the same values but a "non-positive transition_steps" log line each time it is built."""
    if warmup_steps <= 0:
        return optax.cosine_decay_schedule(init_value=learning_rate, decay_steps=max(total_steps, 1), alpha=0.0)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=0.0,
    )


def learning_rate_at(learning_rate: float, warmup_steps: int, total_steps: int, update: int) -> float:
    """The learning rate that update number `update` (0-based: the schedule's count before it) uses."""
    return float(make_schedule(learning_rate, warmup_steps, total_steps)(update))


def _decays(path, leaf) -> bool:
    """Weight decay applies to matrices (embeddings, projections), not to norm scales and biases."""
    del leaf
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return not any(n.endswith("norm") or n.endswith("bias") for n in names)


def make_optimizer(learning_rate: float, warmup_steps: int, total_steps: int, weight_decay: float,
                   grad_clip: float, mu_dtype: str = "float32") -> optax.GradientTransformationExtraArgs:
    """AdamW on the warm-up + cosine schedule (steps counted in updates), its first moment stored in
    `mu_dtype` (the second in float32), after clipping the gradient's
    global norm to `grad_clip` (0: no clipping), inside `skip_nonfinite`: call
    `update(grads, state, params, loss=loss)` and apply with `apply_updates`. Works on any parameter
    pytree (pure dicts or nnx.State)."""
    schedule = make_schedule(learning_rate, warmup_steps, total_steps)
    mask = lambda params: jax.tree_util.tree_map_with_path(_decays, params)
    adamw = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, mask=mask,
                        mu_dtype=jnp.dtype(mu_dtype))
    if grad_clip and grad_clip > 0:
        return skip_nonfinite(optax.chain(optax.clip_by_global_norm(grad_clip), adamw))
    return skip_nonfinite(adamw)


# -- non-finite updates --------------------------------------------------------------------------


class SkipNonFiniteState(NamedTuple):
    """State of `skip_nonfinite`: two int32 [] counters (checkpointed with the rest, so a resumed run
    continues them) and the wrapped optimizer's state as of the latest *applied* update."""

    consecutive: jax.Array  # non-finite updates in a row up to the latest one (0: the latest was applied)
    total: jax.Array  # non-finite updates since the optimizer was initialized
    inner: Any


def all_finite(tree) -> jax.Array:
    """bool []: no leaf of `tree` holds a NaN or an Inf (None leaves are skipped)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """`inner`, except that an update whose loss, gradients or resulting updates are not all finite is
    not applied: it returns zero updates and `inner`'s state unchanged, bit for bit, and is counted.

    `update(grads, state, params, *, loss)`: `loss` is the scalar the gradients are of. The trainers apply
    the result with `apply_updates` (the params, too, stay bit-identical) and stop the run themselves
    once `consecutive` reaches their limit (`nonfinite_error`).

    Not `optax.apply_if_finite`: it checks the gradients only, not the loss nor the updates `inner` makes
    of them (finite gradients can still overflow, or meet a non-finite learning rate), and after
    `max_consecutive_errors` it applies the non-finite update, which poisons Adam's moments for good.

    How: `inner`'s updates are computed once only to be checked, then the update is made (again) inside
    a `lax.cond` whose other branch returns the old state as it is, bit for bit. A select over the trees
    (`jnp.where(finite, new, old)`) would keep the same bits but needs the new moments stored next to the
    old ones until `finite` is known: +1.25x the parameters' bytes in temporaries for AdamW (XLA:CPU,
    `memory_analysis`), where the check pass fuses into its reduction and stores nothing, so the
    guarded step needs no more memory than the plain one; the cost is one more elementwise pass.
    """

    def init(params):
        # Two arrays, not one twice: a step that donates the state may not donate a buffer twice.
        return SkipNonFiniteState(consecutive=jnp.zeros([], jnp.int32), total=jnp.zeros([], jnp.int32),
                                  inner=inner.init(params))

    def update(grads, state: SkipNonFiniteState, params=None, *, loss=None):
        candidate, _ = inner.update(grads, state.inner, params)
        finite = all_finite((loss, grads, candidate))
        updates, inner_state = jax.lax.cond(
            finite, lambda: inner.update(grads, state.inner, params),
            lambda: (optax.tree.zeros_like(candidate), state.inner))
        return updates, SkipNonFiniteState(
            consecutive=jnp.where(finite, 0, optax.safe_increment(state.consecutive)),
            total=jnp.where(finite, state.total, optax.safe_increment(state.total)),
            inner=inner_state,
        )

    return optax.GradientTransformationExtraArgs(init, update)


def apply_updates(params, updates, opt_state: SkipNonFiniteState):
    """`optax.apply_updates`, except after an update `skip_nonfinite` rejected: then `params` themselves,
    bit for bit (adding its zero updates would turn -0.0 into +0.0, and TPUs flush subnormals)."""
    return optax.tree.where(opt_state.consecutive == 0, optax.apply_updates(params, updates), params)


@dataclasses.dataclass(frozen=True)
class OptimizerProgress:
    """What a `make_optimizer` state says about the run so far, on the host."""

    updates: int  # updates applied: the count the learning-rate schedule reads
    nonfinite: int  # updates skipped as non-finite since the start (resumed runs included)
    consecutive_nonfinite: int  # of those, how many in a row up to the latest update

    @property
    def latest_update(self) -> int:
        """The schedule's count when the latest update was made: the learning rate it used is the schedule's
        value there (a skipped update did not advance the count)."""
        return self.updates - 1 if self.consecutive_nonfinite == 0 else self.updates

    def metrics(self) -> dict[str, int]:
        return {"train/nonfinite_updates": self.nonfinite, "train/consecutive_nonfinite": self.consecutive_nonfinite}


def optimizer_progress(opt_state: SkipNonFiniteState) -> OptimizerProgress:
    """The counters of a `make_optimizer` state, fetched to the host (this waits for the update)."""
    count = optax.tree.get(opt_state.inner, "count",
                           filtering=lambda path, _: path[-1].tuple_name == "ScaleByScheduleState")
    updates, nonfinite, consecutive = jax.device_get((count, opt_state.total, opt_state.consecutive))
    return OptimizerProgress(int(updates), int(nonfinite), int(consecutive))


def nonfinite_error(progress: OptimizerProgress, *, section: str, limit: int, step: int, stats,
                    checkpoint_dir) -> FloatingPointError | None:
    """The error that stops a run once `limit` (`<section>.max_consecutive_nonfinite`) updates in a row
    were not finite, or None. `stats`: the latest update's, with its "loss" and "grad_norm"."""
    if progress.consecutive_nonfinite < limit:
        return None
    loss, grad_norm = (float(x) for x in jax.device_get((stats["loss"], stats["grad_norm"])))
    found = []
    if not math.isfinite(loss):
        found.append(f"the loss is {loss}")
    if not math.isfinite(grad_norm):
        found.append(f"the gradient norm is {grad_norm}")
    what = " and ".join(found) or (f"the loss ({loss:.4g}) and the gradients (norm {grad_norm:.4g}) are finite but "
                                   "the optimizer's update is not")
    return FloatingPointError(
        f"{progress.consecutive_nonfinite} updates in a row were not finite, the last at step {step} "
        f"({section}.max_consecutive_nonfinite={limit}): {what}. None of them was applied, so the parameters, the "
        f"optimizer state and every checkpoint in {checkpoint_dir} are those of the last finite update "
        f"(update {progress.updates}); a rerun resumes from the newest checkpoint, these counts included. Try a lower "
        f"{section}.learning_rate or a longer warm-up, gradient clipping ({section}.grad_clip > 0), "
        f"model.param_dtype='float32', and look at the batches of these steps; raise "
        f"{section}.max_consecutive_nonfinite if such steps are rare and pass."
    )


def nonfinite_limit(section: ml_collections.ConfigDict, name: str) -> int:
    """`<name>.max_consecutive_nonfinite` of a trainer's config section, checked."""
    limit = section.max_consecutive_nonfinite
    if limit < 1:
        raise ValueError(f"{name}.max_consecutive_nonfinite={limit} must be >= 1: the number of non-finite updates "
                         "in a row (each skipped) after which the run stops.")
    return limit


def optimizer_shardings(optimizer: optax.GradientTransformation, params):
    """Shardings of `optimizer.init(params)`'s state: every params-shaped tree (Adam's moments) like the
    params, everything else (step counts) replicated over the params' mesh. `params` holds jax.Arrays
    or ShapeDtypeStructs with shardings."""
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    mesh = jax.tree.leaves(param_shardings)[0].mesh
    return optax.tree_map_params(
        optimizer,
        lambda _, sharding_: sharding_,
        jax.eval_shape(optimizer.init, params),
        param_shardings,
        transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()),
    )


def init_optimizer(optimizer: optax.GradientTransformation, params):
    """The optimizer state, laid out by `optimizer_shardings`. (A plain `jax.jit(optimizer.init)` puts
    state that does not depend on the params' values on one device: a 7B model's Adam moments on one chip.)"""
    return jax.jit(optimizer.init, out_shardings=optimizer_shardings(optimizer, params))(params)
