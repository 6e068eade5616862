"""The trainer scaffold SFT (`kardia_jax.sft`) and GRPO (`kardia_jax.train`) share: one parameter
representation, batches on the mesh and their minibatches, one resume path, one end-of-step path
(the optimizer: `kardia_jax.optim`; loading and exporting the model: `kardia_jax.models.loading`).

    mesh = sharding.mesh_from_config(config.mesh)
    with jax.set_mesh(mesh):
        model, tokenizer = loading.load_policy(config, mesh)   # sharded Decoder + its tokenizer
        graphdef, params = split_params(model)                 # params: a pure dict of jax.Arrays
        ...
        start, params, opt_state, rng = restore_or_init(ckpt, params, opt_state, rng, iterator)
        end = StepEnd(...)                                     # log, non-finite stop, save, preemption
        for step in range(start, total_steps):
            batch = shard_batch(next(iterator), mesh)          # [B, ...] numpy -> batch over (data, fsdp)
            # in the jitted step: parts = split_minibatches(batch, k, rules=rules)  [k, B/k, ...]
            if end(step + 1, params, opt_state, rng, stats, logged):
                break                                          # preempted: checkpoint saved

Parameters are pure dicts (`nnx.to_pure_dict`), in both trainers and in their checkpoints: nested dicts
of jax.Arrays, so every leaf is the array itself (`x.sharding`, `x.dtype`, optax's masks and the
jitted steps see no Variable wrappers), a checkpoint reads back without Flax's classes, and
`nnx.merge(graphdef, params)` rebuilds the model inside a jitted function as it does from an nnx.State.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kardia_jax import checkpoints, metrics, optim, sharding, storage

BATCH_AXES = ("data", "fsdp")  # mesh axes the batch dimension of every batch is split over


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """(graphdef, params as a pure dict): the trainers' one parameter representation (module docstring)."""
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


# -- batches -------------------------------------------------------------------------------------


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, Any]:
    """Puts this process's rows of a batch on the mesh: every array [B_local, ...] becomes a global
    [B_local * process_count, ...] jax.Array split over ('data', 'fsdp') on its leading axis (nested
    dicts are walked; 0-d values are replicated). The global batch must divide over data x fsdp."""
    devices = mesh.shape["data"] * mesh.shape["fsdp"]

    def put(path, x):
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec()), x)
        global_rows = x.shape[0] * jax.process_count()
        if global_rows % devices:
            raise ValueError(
                f"shard_batch: {jax.tree_util.keystr(path)} has a global batch of {global_rows} rows, not "
                f"divisible by the {devices} devices of the mesh's data x fsdp axes; make the batch size a "
                "multiple of data x fsdp."
            )
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x,
                                                      (global_rows, *x.shape[1:]))

    return jax.tree_util.tree_map_with_path(put, dict(batch))


def replicate(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """The same host array (identical on every process) as a replicated jax.Array on the mesh."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec()), np.asarray(x))


def distribute(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """The same host array [R, ...] (identical on every process) as a jax.Array whose rows are split over
    ('data', 'fsdp') like a training batch, each device holding only its own rows; replicated when R does
    not divide over those devices (evaluation validates its batch sizes so that it does)."""
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % (mesh.shape["data"] * mesh.shape["fsdp"]):
        return replicate(x, mesh)
    return jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim), lambda index: x[index])


def split_minibatches(tree, k: int, *, num_groups: int | None = None, rules=None):
    """Splits every array's leading (row) axis into k minibatches: [R, ...] -> [k, R / k, ...].

    Each leaf's R rows are `num_groups` groups of R / num_groups consecutive rows (default: every row its
    own group). Groups stay whole and are dealt round-robin: group j goes to minibatch j % k. So with
    num_groups = B, prompts [B, P] (groups of 1) and their completions [N, T] (groups of G = N / B) split
    alike: minibatch a holds prompts a, k + a, 2k + a, ... and exactly their completions, each prompt's
    G rows together. The batch lies on the devices in contiguous blocks of rows, so every minibatch takes
    its groups from every device's block (when a block holds a multiple of k groups) and the split moves
    no data between devices; a contiguous split would put each minibatch on 1/k of the devices.
    The result is constrained to (None, activation_batch, activation_length, ...) under `rules`.
    """

    def split(x):
        groups = x.shape[0] if num_groups is None else num_groups
        if groups % k or x.shape[0] % groups:
            raise ValueError(f"split_minibatches: {x.shape[0]} rows in {groups} groups do not split into {k} "
                             "minibatches of whole groups.")
        size = x.shape[0] // groups  # rows per group
        x = x.reshape(groups // k, k, size, *x.shape[1:]).swapaxes(0, 1)  # [k, groups / k, size, ...]
        x = x.reshape(k, (groups // k) * size, *x.shape[3:])  # [k, R / k, ...]
        axes = (None, "activation_batch", "activation_length")[:x.ndim] + (None,) * (x.ndim - 3)
        return sharding.constrain(x, axes, rules)

    return jax.tree.map(split, tree)


def join_minibatches(tree, num_groups: int | None = None):
    """The inverse of `split_minibatches(tree, k, num_groups=num_groups)`: [k, R / k, ...] -> [R, ...] in
    the batch's row order."""

    def join(x):
        k, rows = x.shape[:2]
        per_part = rows if num_groups is None else num_groups // k  # groups per minibatch
        size = rows // per_part
        x = x.reshape(k, per_part, size, *x.shape[2:]).swapaxes(0, 1)  # [groups / k, k, size, ...]
        return x.reshape(k * rows, *x.shape[3:])

    return jax.tree.map(join, tree)


# -- checkpoints and config ----------------------------------------------------------------------


def restore_or_init(ckpt: checkpoints.Checkpointer, params, opt_state, rng: jax.Array, iterator=None, *,
                    snapshot: dict[str, Any] | None = None):
    """Resumes from the newest checkpoint in `ckpt`, if there is one: the one resume path of both trainers.

    `params`/`opt_state` are the freshly initialized, sharded trees: they are the restore targets
    (structure, shapes, shardings) and what is returned when there is nothing to resume. The data
    iterator, if given, is moved to the saved position in place. `snapshot` (`config_snapshot`), if
    given, is written to `<checkpoint directory>/run_config.json`: the config this run used.

    Returns (step, params, opt_state, rng): step 0 and the inputs for a fresh run.
    """
    if snapshot is not None:
        write_json(str(ckpt.directory / "run_config.json"), snapshot)
    restored = ckpt.restore_latest(params, opt_state, data_iterator=iterator)
    if restored is None:
        return 0, params, opt_state, rng
    # A warning: resuming changes what the run does, so it is said at every verbosity.
    logging.warning("Resumed from %s at step %d.", ckpt.directory, restored.step)
    return restored.step, restored.params, restored.opt_state, restored.rng if restored.rng is not None else rng


class StepEnd:
    """How every training step of both trainers ends, in this order: its metrics logged (with the learning
    rate its last update used and the optimizer's non-finite counts), or only the progress bar moved;
    the run stopped with `optim.nonfinite_error` once `<section>.max_consecutive_nonfinite` updates in a
    row were not finite; a checkpoint saved (forced at the last step and when stopping); and whether to
    stop now (SIGTERM via `preemption`, or the caller's own request), in which case the checkpointer is
    closed (the save is complete) and the loop returns.

    `schedule`: the optimizer's learning-rate schedule, counted in updates (`optim.make_schedule`)."""

    def __init__(self, *, section: str, limit: int, schedule, total_steps: int, ckpt: checkpoints.Checkpointer,
                 logger: metrics.MetricsLogger, preemption: checkpoints.PreemptionGuard, iterator,
                 metadata: dict[str, Any]):
        self.section, self.limit, self.schedule, self.total_steps = section, limit, schedule, total_steps
        self.ckpt, self.logger, self.preemption, self.iterator = ckpt, logger, preemption, iterator
        self.metadata = metadata

    def __call__(self, done: int, progress: optim.OptimizerProgress, params, opt_state, rng: jax.Array, stats,
                 logged: Mapping[str, Any] | None, *, stop: bool = False) -> bool:
        """Ends step `done` (1-based). `progress`: `optim.optimizer_progress(opt_state)`; `stats`: the
        step's last update's, with its "loss" and "grad_norm"; `logged`: the step's metrics, or None not
        to log this step. Returns True when the run must stop now (checkpoint saved and closed)."""
        if logged is not None:
            learning_rate = float(self.schedule(progress.latest_update))
            self.logger.log(done, dict(logged) | {"learning_rate": learning_rate} | progress.metrics())
        else:
            self.logger.advance(done)
        error = optim.nonfinite_error(progress, section=self.section, limit=self.limit, step=done, stats=stats,
                                      checkpoint_dir=self.ckpt.directory)
        if error is not None:
            self.ckpt.close()  # waits for pending saves, all of finite parameters
            raise error
        stop = self.preemption.reached(done) or stop
        self.ckpt.save(done, params, opt_state, data_iterator=self.iterator, rng=rng,
                       metadata=self.metadata, force=stop or done == self.total_steps)
        if stop:
            self.ckpt.close()
            logging.warning("%s stopped at step %d of %d: checkpoint saved; rerun to resume.", self.section.upper(),
                            done, self.total_steps)
        return stop


def data_source(data_config: ml_collections.ConfigDict) -> str:
    """Where `config.data` says the dialogues are; empty means the sample shipped with the package."""
    from kardia_jax.data.sources import sample_path  # pylint: disable=import-outside-toplevel

    return data_config.source or sample_path()


def config_snapshot(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON data (tuples become lists), for checkpoint metadata and config.json."""
    return json.loads(json.dumps(config.to_dict(), default=str))


def write_json(path: str, data: Any) -> None:
    """Writes `data` as JSON to `path` (local or gs://; process 0 only), atomically: a reader never sees
    half a file."""
    if jax.process_index() != 0:
        return
    storage.write_text(path, json.dumps(data, indent=2, sort_keys=True))


def read_json(path: str) -> Any | None:
    """The JSON document at `path` (local or gs://), or None if there is none."""
    if not storage.exists(path):
        return None
    return json.loads(storage.read_text(path))


def num_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
