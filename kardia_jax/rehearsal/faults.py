"""The fault rehearsal (`python -m kardia_jax.rehearse --faults`): SIGKILL during a save, SIGTERM, resume.

GRPO runs twice from the same SFT export: once uninterrupted, once killed while a checkpoint is being
written, restarted, sent SIGTERM after that step and restarted to the end. Each fault must have the
effect a pod relies on (the newest complete checkpoint is the one before the kill; SIGTERM saves and
exits 0; a restart resumes from the newest checkpoint), and both runs must end with the same parameters,
bit for bit. The checkpoints' states are read from the emulated bucket's listing.
"""

from __future__ import annotations

import os
import re
import signal

import numpy as np
from absl import app

from kardia_jax.rehearsal.jobs import Job, Rehearsal, RehearsalError, reward_table


def _checkpoint_state(listing: list[str], directory: str, step: int) -> str:
    """'absent', 'writing' (objects but no commit marker yet) or 'complete', from a bucket listing."""
    prefix = f"{directory}/{step}/"
    names = [line.split()[-1] for line in listing if line.split()[-1].startswith(prefix)]
    if not names:
        return "absent"
    return "complete" if f"{prefix}commit_success.txt" in names else "writing"


def fault_steps(config) -> tuple[int, int]:
    """(save_every, the step whose save is killed); raises before any job runs if GRPO is too short for it."""
    every, total = config.grpo.save_every, config.grpo.max_steps
    kill_step = 2 * every
    if total <= kill_step:
        raise app.UsageError(f"--faults needs grpo.max_steps > 2 x grpo.save_every ({total} <= {kill_step}).")
    return every, kill_step


def rehearse_faults(r: Rehearsal) -> None:
    """GRPO uninterrupted vs GRPO killed during a save, resumed, sent SIGTERM, resumed: equal params."""
    from kardia_jax import storage  # pylint: disable=import-outside-toplevel

    every, kill_step = fault_steps(r.config)
    total = r.config.grpo.max_steps
    workdir = r.config.workdir
    grpo_dir = f"{workdir}/grpo"
    reference = f"{workdir}-reference"
    r.run("grpo reference (uninterrupted)", "train",
          r.flags() + [f"--config.workdir={reference}", f"--config.grpo.init_from={workdir}/sft/hf"],
          workdir=reference)

    seen = {}

    def kill_during_save(job: Job) -> None:
        state = _checkpoint_state(r.listing(grpo_dir), grpo_dir, kill_step)
        if state == "writing" and not seen:
            job.signal_all(signal.SIGKILL)
            seen["killed"] = state
        elif state == "complete" and not seen:
            raise RehearsalError(f"the checkpoint of step {kill_step} completed before it could be seen being "
                                 "written; raise grpo.save_every's model or step sizes so the save takes longer.")

    r.run(f"grpo, SIGKILL during the save of step {kill_step}", "train", r.flags(), watch=kill_during_save,
          expect_codes=[-signal.SIGKILL] * r.processes)
    latest = _latest_complete(r.listing(grpo_dir), grpo_dir)
    print(f"   killed while step {kill_step} was being written; newest complete checkpoint: {latest}")
    if latest != kill_step - every:
        raise RehearsalError(f"after a kill during the save of step {kill_step} the newest complete checkpoint is "
                             f"{latest}, not {kill_step - every}.")

    def sigterm_after_save(job: Job) -> None:
        if not seen.get("sigterm") and _checkpoint_state(r.listing(grpo_dir), grpo_dir, kill_step) == "complete":
            job.signal_all(signal.SIGTERM)
            seen["sigterm"] = True

    job = r.run(f"grpo resumed, SIGTERM after step {kill_step}", "train", r.flags(), watch=sigterm_after_save)
    latest = _latest_complete(r.listing(grpo_dir), grpo_dir)
    if not seen.get("sigterm") or latest is None or latest <= kill_step or latest >= total:
        raise RehearsalError(f"SIGTERM after step {kill_step}: expected every process to save a checkpoint past "
                             f"it and exit 0 before step {total}; newest checkpoint {latest}.")
    _check_resumed(job, grpo_dir, kill_step - every)
    print(f"   resumed from step {kill_step - every}; SIGTERM: every process exited 0, checkpoint of step {latest} written")
    job = r.run("grpo resumed to the end", "train", r.flags())
    _check_resumed(job, grpo_dir, latest)
    print("\n" + reward_table(job.output(0)))

    equal = _same_tensors(f"{reference}/grpo/hf", f"{grpo_dir}/hf", storage)
    print(f"   final parameters of the interrupted run equal the uninterrupted run's, bit for bit: {equal}")
    if not equal:
        raise RehearsalError("the interrupted-and-resumed GRPO run ended with other parameters than the "
                             "uninterrupted one.")


def _check_resumed(job: Job, directory: str, step: int) -> None:
    """The restarted job's process 0 said it resumed from `directory` at `step` (not from scratch)."""
    if f"Resumed from {directory} at step {step}." not in job.output(0):
        raise RehearsalError(f"{job.name}: process 0 did not resume from {directory} at step {step} "
                             f"(log: {job.logs[0]}).")


def _latest_complete(listing: list[str], directory: str) -> int | None:
    steps = {int(m.group(1)) for line in listing
             if (m := re.match(re.escape(directory) + r"/(\d+)/commit_success\.txt$", line.split()[-1]))}
    return max(steps) if steps else None


def _same_tensors(first: str, second: str, storage) -> bool:
    """Whether two HF exports hold the same tensors, bit for bit."""
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

    def tensors(uri):
        local = storage.local_copy(uri, patterns=["*.safetensors"])
        out = {}
        for name in sorted(os.listdir(local)):
            if name.endswith(".safetensors"):
                out |= load_file(os.path.join(local, name))
        return out

    a, b = tensors(first), tensors(second)
    return a.keys() == b.keys() and all(np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)) for k in a)
