"""Checkpoints with Orbax: params, optimizer state, data-iterator state, RNG key, step, config snapshot.

One `Checkpointer` serves both trainers (SFT and GRPO). A checkpoint for step `s` is the directory
`<directory>/<s>/` with one Orbax item per part:

    params/          model parameters (any pytree of jax.Array, possibly sharded; or an nnx.State)
    opt_state/       optimizer state (optax pytree, or the nnx.State of an nnx.Optimizer); optional
    trainer_state/   JSON: the step and the RNG key (key data + PRNG implementation name)
    data_iterator/   process_<i>-of-<n>.json, one per process: that process's Grain iterator state,
                     written by Grain's own Orbax handler (`grain.checkpoint.CheckpointSave`); optional
    metadata/        JSON: a small metadata dict, e.g. the config snapshot

Arrays are restored onto the shardings of the abstract arrays the caller passes, so a checkpoint written
on one mesh can be read on another (a different slice size, or a CPU).

Crash safety: Orbax writes each step into `<s>.orbax-checkpoint-tmp-<timestamp>/` and renames it to
`<s>/` only when every item is complete (on GCS, where there is no atomic rename, it writes a commit
marker instead). A save interrupted half way is therefore never seen as the latest step.

Multi-host: every process must call `save`, `restore*`, `wait_until_finished` and `close`, with the same
step; Orbax coordinates the processes (each writes its own shards; JSON items are written by process 0,
except the data-iterator state, which each process writes for itself: each reads its own shard of the
data).

Preemption: `PreemptionGuard` turns SIGTERM into "save at the next step boundary, then stop".
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from grain import checkpoint as grain_checkpoint
from jax.experimental import multihost_utils

from kardia_jax import checkpoint_items, storage

_PARAMS = "params"
_OPT_STATE = "opt_state"
_TRAINER_STATE = "trainer_state"
_DATA_ITERATOR = "data_iterator"
_METADATA = "metadata"


def _iterator_state_file(step_dir: epath.Path) -> epath.Path:
    """Where Grain's `CheckpointHandler` keeps this process's iterator state in a checkpoint."""
    return step_dir / _DATA_ITERATOR / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


@dataclasses.dataclass(frozen=True)
class Restored:
    """Everything read back from one checkpoint.

    `params` and `opt_state` have the structure, shardings and (for nnx.State targets) the type of
    the abstract trees passed to `restore`; `opt_state` is None when it was not requested.
    `rng` is the saved key (typed or raw, as saved) on the default device, or None. A data iterator
    passed to `restore` is moved to its saved position in place, not returned.
    """

    step: int
    params: Any
    opt_state: Any
    rng: jax.Array | None
    metadata: dict[str, Any]


class Checkpointer:
    """Saves and restores training checkpoints under `directory` (a local path or `gs://...`).

    Args:
      directory: root directory; created if missing.
      save_interval_steps: `save(step)` writes only when `step % save_interval_steps == 0`, or when
        forced, or at a multi-host preemption sync point.
      max_to_keep: number of most recent checkpoints kept; older ones are deleted. None keeps all.
      async_save: write in a background thread. `save` returns once the arrays are copied to host
        memory, so the caller may then donate or overwrite them.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_interval_steps: int = 1,
        max_to_keep: int | None = 3,
        async_save: bool = True,
    ):
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}.")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None (keep all), got {max_to_keep}.")
        directory = storage.absolute(directory)  # (importing storage also turns gcsfs's listing cache off)
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy(
                [policies.FixedIntervalPolicy(save_interval_steps), policies.PreemptionCheckpointingPolicy()]
            ),
            preservation_policy=policies.LatestN(max_to_keep),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(directory, options=options)

    @property
    def directory(self) -> epath.Path:
        return self._manager.directory

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> Sequence[int]:
        """Steps of all complete checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def save(
        self,
        step: int,
        params: Any,
        opt_state: Any = None,
        *,
        data_iterator: Any = None,
        rng: jax.Array | None = None,
        metadata: Any = None,
        force: bool = False,
    ) -> bool:
        """Saves a checkpoint for `step` if the save interval (or `force`) says so. All processes call it.

        Args:
          step: the training step the state belongs to (usually: number of updates done).
          params: pytree of arrays or nnx.State (e.g. `nnx.state(model, nnx.Param)`).
          opt_state: optax state pytree or `nnx.state(optimizer)`; None to save parameters only.
          data_iterator: this process's Grain iterator (`grain.DatasetIterator` or `DataLoaderIterator`),
            or None; its `get_state()` is written before `save` returns, also with async_save.
          rng: a typed key (`jax.random.key`) or raw uint32 key data; replicated, not sharded.
          metadata: JSON-serializable dict or ConfigDict, e.g. the config.
          force: save regardless of the interval (final step, preemption). A step that already has
            a checkpoint is never overwritten.

        Returns:
          Whether a save was started.
        """
        if step in self._manager.all_steps():
            logging.info("Checkpoint for step %d already exists in %s; not saving again.", step,
                         self.directory)
            return False
        if not force and not self._manager.should_save(step):
            return False
        items = {
            _PARAMS: ocp.args.StandardSave(checkpoint_items.to_storable_tree(params, "params")),
            _TRAINER_STATE: ocp.args.JsonSave({"step": int(step), "rng": checkpoint_items.rng_to_json(rng)}),
            _METADATA: ocp.args.JsonSave(checkpoint_items.metadata_to_json(metadata)),
        }
        if opt_state is not None:
            items[_OPT_STATE] = ocp.args.StandardSave(checkpoint_items.to_storable_tree(opt_state, "opt_state"))
        if data_iterator is not None:  # Grain's handler is synchronous: it reads the state now
            items[_DATA_ITERATOR] = grain_checkpoint.CheckpointSave(data_iterator)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(
        self,
        step: int,
        abstract_params: Any,
        abstract_opt_state: Any = None,
        *,
        data_iterator: Any = None,
    ) -> Restored:
        """Restores the checkpoint of `step` onto the shardings of the abstract trees.

        Args:
          step: a step from `all_steps()`.
          abstract_params: the parameter tree to restore into: leaves are `jax.ShapeDtypeStruct` with
            `.sharding`, or concrete sharded arrays (only shape, dtype and sharding are read). An
            nnx.State comes back as an nnx.State; a pure dict as a pure dict.
          abstract_opt_state: the same for the optimizer state; None to skip it (e.g. evaluation).
          data_iterator: this process's Grain iterator of the same pipeline, to move to the saved
            position in place (`grain.checkpoint.CheckpointRestore`); None to leave the saved state unread.
        """
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"No complete checkpoint for step {step} in {self.directory}; available steps: "
                f"{self.all_steps()}."
            )
        targets = {_PARAMS: abstract_params}
        if abstract_opt_state is not None:
            targets[_OPT_STATE] = abstract_opt_state
        items: dict[str, ocp.args.CheckpointArgs] = {
            _TRAINER_STATE: ocp.args.JsonRestore(),
            _METADATA: ocp.args.JsonRestore(),
        }
        for name, target in targets.items():
            pure_target = checkpoint_items.to_storable_tree(target, name)
            checkpoint_items.check_target_shardings(pure_target, f"restore target for {name!r}")
            items[name] = ocp.args.StandardRestore(pure_target)
        if data_iterator is not None:
            self._check_iterator_state(step)
            items[_DATA_ITERATOR] = grain_checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (KeyError, ValueError) as error:
            raise ValueError(
                f"Could not restore step {step} from {self.directory}: {error}\nThe abstract trees must "
                "match what was saved (same structure, shapes and dtypes); pass abstract_opt_state=None "
                "for a checkpoint saved without optimizer state."
            ) from error

        def as_target_type(name: str) -> Any:
            target = targets.get(name)
            if target is None:
                return None
            if isinstance(target, nnx.State):
                state = jax.tree.map(lambda leaf: leaf, target)  # A copy: the caller's tree stays abstract.
                nnx.replace_by_pure_dict(state, restored[name])
                return state
            return restored[name]

        trainer_state = restored[_TRAINER_STATE]
        return Restored(
            step=int(trainer_state["step"]),
            params=as_target_type(_PARAMS),
            opt_state=as_target_type(_OPT_STATE),
            rng=checkpoint_items.rng_from_json(trainer_state["rng"]),
            metadata=dict(restored[_METADATA]),
        )

    def _check_iterator_state(self, step: int) -> None:
        """Raises, saying what to do, unless step `step` holds this process's data-iterator state."""
        step_dir = self.directory / str(step)
        if not (step_dir / _DATA_ITERATOR).exists():
            raise ValueError(f"{step_dir}: the checkpoint has no data-iterator state, so the run cannot "
                             "continue with the batch that comes next.")
        path = _iterator_state_file(step_dir)
        if not path.exists():
            found = sorted(p.name for p in path.parent.iterdir())
            raise FileNotFoundError(
                f"No data-iterator state for process {jax.process_index()} of {jax.process_count()} in "
                f"{path.parent} (found: {found}). The checkpoint was written by a different number of "
                "processes; restart the data pipeline from scratch by restoring without a data iterator."
            )

    def restore_latest(
        self,
        abstract_params: Any,
        abstract_opt_state: Any = None,
        *,
        data_iterator: Any = None,
    ) -> Restored | None:
        """Restores the newest complete checkpoint (see `restore`), or returns None if there is none."""
        step = self.latest_step()
        if step is None:
            return None
        return self.restore(
            step, abstract_params, abstract_opt_state, data_iterator=data_iterator
        )

    def wait_until_finished(self) -> None:
        """Blocks until any background save has been written and committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's resources."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class PreemptionGuard:
    """Turns a preemption notice (SIGTERM) into "save at the next step boundary, then stop".

    Single process: installs a handler for `signals` that only sets a flag; the previous handlers are
    put back on exit. Multi-process (`jax.process_count() > 1`): installs nothing, because JAX's
    distributed runtime already catches SIGTERM and agrees with the other processes on a common step
    (`multihost_utils.reached_preemption_sync_point`); a per-process flag would make the processes
    disagree and hang in the collective save. Call `reached(step)` once per step on every process.

        with PreemptionGuard() as preemption:
            for step in range(start, total_steps):
                ...  # one update
                stop = preemption.reached(step + 1)
                ckpt.save(step + 1, params, opt_state, ..., force=stop or step + 1 == total_steps)
                if stop:
                    break
        ckpt.close()
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
        self._signals = tuple(signals)
        self._previous_handlers: dict[int, Any] = {}
        self._received: int | None = None

    @property
    def signal_received(self) -> int | None:
        """The signal number received, if any (single-process mode only)."""
        return self._received

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self._received = signum
        logging.warning("Received %s: will save a checkpoint and stop at the next step boundary.",
                        signal.Signals(signum).name)

    def __enter__(self) -> PreemptionGuard:
        if jax.process_count() > 1:
            return self
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "PreemptionGuard must be entered on the main thread (Python only delivers signals "
                "there); enter it in the trainer's main loop, not in a worker thread."
            )
        for signum in self._signals:
            self._previous_handlers[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def reached(self, step: int) -> bool:
        """True when the trainer should save now and stop. Call at every step, on every process."""
        if self._received is not None:
            return True
        if jax.process_count() == 1:
            return False
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # Preemption service disabled (jax_enable_preemption_service=False).
            return False
