"""The pod rehearsal: a TPU config's real jobs as several JAX processes on this machine.

    python -m kardia_jax.rehearse --config=configs/qwen7b_tpu.py [--processes=2 --devices_per_process=4]
    python -m kardia_jax.rehearse --config=configs/gemma7b_tpu.py --faults      # + kill / SIGTERM / resume
    python -m kardia_jax.rehearse --config=configs/qwen3b_tpu.py --config.grpo.max_steps=6   # sizes only

Every host-side path a pod takes runs here as it runs there, with local stand-ins for what is remote:

    the pod                                   the rehearsal
    one JAX process per TPU VM host           --processes local processes, each with
                                              --devices_per_process CPU devices, joined by
                                              jax.distributed (gloo collectives), config.distributed
                                              as the config says: arrays are not fully addressable
    models, tokenizers by hub id              an offline Hugging Face cache (HF_HUB_OFFLINE=1) seeded with
                                              tiny random models of the same families and tokenizers
                                              in their formats (`rehearsal.hub`)
    data from hf://Jhcircle/KardiaBench       the same cache, holding the shipped sample as KardiaBench's
                                              train.jsonl / test.jsonl
    the gs:// workdir                         gcp-storage-emulator on a loopback port (`rehearsal.gcs`)

The jobs are the package's own entry points, started on every process with the config file and the
rehearsal's size overrides: `kardia_jax.sft` (SFT, its evaluation, the `sft/hf` export), `kardia_jax.train`
(GRPO from `sft/hf`, its reward table, the `grpo/hf` export) and `kardia_jax.evaluate` (the GRPO
export). Only sizes are overridden (steps, batch sizes, lengths, mesh sizes, model dimensions of the
stand-ins): never a path kind, the distributed flag, the mesh axes' roles, the dtypes or the judge's
family. The overrides are printed; others are rejected.

With --faults, GRPO runs twice from the same SFT export: once uninterrupted (workdir `<workdir>-reference`,
`grpo.init_from` = the SFT export), once with faults: every process is killed with SIGKILL while the
checkpoint of step `2·save_every` is being written, restarted (it must resume from the checkpoint
before), sent SIGTERM after that step (every process must save and exit 0), and restarted again to the
end. The final parameters of both runs must be equal bit for bit.

Each process's log is kept under --logdir; a job that fails stops the rehearsal with the end of the
log of the process that failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/qwen7b_tpu.py", "The TPU config to rehearse.")
_PROCESSES = flags.DEFINE_integer("processes", 2, "JAX processes (the pod's hosts).")
_DEVICES = flags.DEFINE_integer("devices_per_process", 4, "CPU devices of each process (the host's chips).")
_FAULTS = flags.DEFINE_bool("faults", False, "Also rehearse SIGKILL (during a save), SIGTERM and resume.")
_LOGDIR = flags.DEFINE_string("logdir", "", "Where the processes' logs go (default: a temporary directory).")
_JOB_TIMEOUT = flags.DEFINE_integer("job_timeout_s", 1800, "A job that runs longer than this fails.")

# The rehearsal's sizes: small enough for a 2-core machine, large enough that every path is taken
# (several checkpoints, minibatches, a full and a partial evaluation batch, judge contexts truncated).
REHEARSAL_SIZES: dict[str, int] = {
    "data.max_length": 320,
    "data.worker_count": 0,
    "sft.max_steps": 4,
    "sft.global_batch_size": 8,
    "sft.grad_accum_steps": 1,  # 8 sequences over 8 devices: one microbatch (the TPU configs accumulate)
    "sft.save_every": 2,
    "sft.log_every": 2,
    "sft.eval_max_samples": 8,
    "sft.eval_max_new_tokens": 16,
    "sft.eval_batch_size": 8,
    "grpo.max_steps": 4,
    "grpo.prompts_per_step": 8,
    "grpo.num_samples": 2,
    "grpo.num_minibatches": 2,
    "grpo.max_new_tokens": 16,
    "grpo.save_every": 2,
    "grpo.print_samples_every": 2,
    "grpo.eval_max_samples": 8,
    "judge.max_context_tokens": 160,
    "judge.max_response_tokens": 16,
    "eval.max_samples": 12,  # a full batch of 8 and a partial one
    "eval.max_new_tokens": 16,
    "eval.batch_size": 8,
}
# What else may be overridden: sizes, counts and intervals. Anything not matched here is refused.
SIZE_KEYS = re.compile(
    r"^(mesh\.(data|fsdp|tensor)"
    r"|data\.(max_length|worker_count)"
    r"|sft\.(max_steps|num_epochs|global_batch_size|grad_accum_steps|save_every|max_to_keep|log_every"
    r"|eval_max_samples|eval_max_new_tokens|eval_batch_size|logits_chunk_size)"
    r"|grpo\.(max_steps|num_epochs|prompts_per_step|num_samples|num_iterations|num_minibatches|max_new_tokens"
    r"|save_every|max_to_keep|log_every|print_samples_every|eval_max_samples|logits_chunk_size)"
    r"|judge\.(max_context_tokens|max_response_tokens|rows_per_chunk|context_buckets)"
    r"|eval\.(max_samples|max_new_tokens|batch_size|judge_decode_tokens))$"
)
JOBS = ("sft", "train", "evaluate")


class RehearsalError(RuntimeError):
    """A job of the rehearsal failed, or a fault did not have the effect a pod relies on."""


# -- the config ------------------------------------------------------------------------------------


def user_overrides(argv: Sequence[str]) -> dict[str, str]:
    """The `--config.key=value` flags given on the command line, as {key: value text}."""
    found = {}
    for arg in argv:
        match = re.match(r"^--config\.([\w.]+)=(.*)$", arg)
        if match:
            found[match.group(1)] = match.group(2)
        elif arg.startswith("--config."):
            raise app.UsageError(f"{arg}: write config overrides as --config.key=value.")
    return found


def size_overrides(config: ml_collections.ConfigDict, given: dict[str, str]) -> dict[str, str]:
    """The rehearsal's sizes with the user's on top, checked: only sizes, only keys the config has."""
    refused = sorted(key for key in given if not SIZE_KEYS.match(key))
    if refused:
        raise app.UsageError(
            f"The rehearsal overrides sizes only (steps, batch sizes, lengths, mesh sizes); refused: {refused}. "
            "Paths, the distributed flag, dtypes and the judge come from the config as a pod would run it.")
    merged = {key: str(value) for key, value in REHEARSAL_SIZES.items()} | given
    for key in merged:
        section, _, name = key.partition(".")
        if section not in config or name not in config[section]:
            raise app.UsageError(f"--config.{key}: the config has no key {key!r}.")
    return merged


def apply(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> ml_collections.ConfigDict:
    """A copy of `config` with the overrides (parsed to the type of the value they replace)."""
    config = ml_collections.ConfigDict(config.to_dict())
    for key, text in overrides.items():
        section, _, name = key.partition(".")
        config[section][name] = type(config[section][name])(int(text) if text.lstrip("-").isdigit() else text)
    return config


def hub_ids(config: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
    """(model ids, dataset ids) the config reads from the Hugging Face hub."""
    from kardia_jax import storage  # pylint: disable=import-outside-toplevel

    paths = [config.model.hf_path, config.tokenizer.path, config.judge.hf_path, config.judge.tokenizer_path]
    models = sorted({p for p in paths if p and storage.is_hub_id(p)})
    datasets = [config.data.source[len("hf://"):]] if config.data.source.startswith("hf://") else []
    return models, datasets


def check_pod_config(config: ml_collections.ConfigDict, processes: int, devices: int) -> None:
    """The config must be one a pod runs: distributed, a gs:// workdir, a mesh of the processes' devices."""
    from kardia_jax import sharding  # pylint: disable=import-outside-toplevel

    if not config.distributed:
        raise app.UsageError("config.distributed is False: this config runs as one process; the rehearsal is "
                             "for configs that run on several hosts (configs/*_tpu.py).")
    if not config.workdir.startswith("gs://"):
        raise app.UsageError(f"config.workdir is {config.workdir!r}: a pod's hosts share their workdir on GCS, so "
                             "the rehearsal needs a gs:// workdir in the config (--config.workdir=gs://BUCKET/...).")
    sharding.mesh_sizes(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, processes * devices)  # names mesh.*


# -- processes -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Job:
    """One job started on every process: `python -m kardia_jax.<module> <args>`."""

    name: str
    module: str
    args: list[str]
    processes: list[subprocess.Popen] = dataclasses.field(default_factory=list)
    logs: list[str] = dataclasses.field(default_factory=list)

    def start(self, env: dict[str, str], count: int, devices: int, logdir: str, attempt: int) -> None:
        port = _free_port()
        for index in range(count):
            log = os.path.join(logdir, f"{attempt}-{self.module}-process{index}.log")
            process_env = env | {
                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JAX_NUM_PROCESSES": str(count),
                "JAX_PROCESS_ID": str(index),
                "JAX_PLATFORMS": "cpu",
                "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                "PYTHONUNBUFFERED": "1",
            }
            with open(log, "w", encoding="utf-8") as out:
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-m", f"kardia_jax.{self.module}", *self.args],
                    env=process_env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            self.logs.append(log)

    def signal_all(self, signum: int) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signum)

    def wait(self, timeout_s: float, watch: Callable[["Job"], None] | None = None) -> list[int]:
        """Waits until every process has exited; returns their exit codes. A process that fails makes
        the others be killed (they would wait for it in a collective until JAX's heartbeat timeout)."""
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in self.processes):
            if any(p.poll() not in (None, 0) for p in self.processes):
                self.signal_all(signal.SIGKILL)
            if time.monotonic() > deadline:
                self.signal_all(signal.SIGKILL)
                raise RehearsalError(f"{self.name}: still running after {timeout_s:.0f} s (logs: {self.logs}).")
            if watch is not None:
                watch(self)
            time.sleep(0.05)
        return [p.returncode for p in self.processes]

    def failure(self, codes: Sequence[int]) -> str:
        first = next(i for i, code in enumerate(codes) if code != 0)
        with open(self.logs[first], encoding="utf-8", errors="replace") as f:
            tail = "".join(f.readlines()[-40:])
        return f"{self.name}: process {first} exited with {codes[first]} (all: {list(codes)}); {self.logs[first]} ends:\n{tail}"

    def output(self, index: int = 0) -> str:
        with open(self.logs[index], encoding="utf-8", errors="replace") as f:
            return f.read()


# -- the rehearsal ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Rehearsal:
    """The environment of one rehearsal and the jobs it ran."""

    config_file: str
    config: ml_collections.ConfigDict  # with the overrides applied
    overrides: dict[str, str]
    processes: int
    devices: int
    env: dict[str, str]
    logdir: str
    listing: Callable[[str], list[str]]
    timeout_s: float
    attempts: int = 0

    def flags(self, extra: dict[str, str] | None = None) -> list[str]:
        overrides = self.overrides | (extra or {})
        return [f"--config={self.config_file}", *(f"--config.{k}={v}" for k, v in overrides.items())]

    def run(self, name: str, module: str, args: list[str], *, watch=None, expect_codes=None,
            workdir: str | None = None) -> Job:
        """Runs one job on every process; raises unless every exit code is 0 (or `expect_codes`). Reports
        what it wrote under `workdir` (default: the config's)."""
        self.attempts += 1
        job = Job(name, module, args)
        start = time.monotonic()
        workdir = workdir or self.config.workdir
        before = set(self.listing(workdir))
        job.start(self.env, self.processes, self.devices, self.logdir, self.attempts)
        codes = job.wait(self.timeout_s, watch)
        if codes != (expect_codes or [0] * self.processes):
            raise RehearsalError(job.failure(codes))
        written = sorted(set(self.listing(workdir)) - before)
        print(f"\n== {name}: {self.processes} processes x {self.devices} CPU devices, "
              f"{time.monotonic() - start:.0f} s, exit codes {codes}; wrote {len(written)} objects:")
        for line in _summarize(written):
            print(f"   {line}")
        return job


def _summarize(lines: Sequence[str]) -> list[str]:
    """A bucket listing (`<size>  gs://...` lines) in path order, each checkpoint step directory (hundreds
    of Orbax objects) folded into one line with its object count, size and whether it is complete."""
    steps, shown = {}, []
    for line in sorted(lines, key=lambda line: line.split()[-1]):
        size, uri = line.split()
        match = re.match(r"^(.*/\d+)/(.*)$", uri)
        if match is None:
            shown.append(line)
            continue
        if match.group(1) not in steps:
            steps[match.group(1)] = {"objects": 0, "bytes": 0, "complete": False}
            shown.append(match.group(1))
        entry = steps[match.group(1)]
        entry["objects"] += 1
        entry["bytes"] += int(size)
        entry["complete"] |= match.group(2) == "commit_success.txt"
    return [
        f"{steps[line]['bytes']:>12}  {line}/ ({steps[line]['objects']} objects, "
        f"{'complete' if steps[line]['complete'] else 'INCOMPLETE'})" if line in steps else line
        for line in shown
    ]


def _reward_table(output: str) -> str:
    start = output.rfind("reward component")
    return output[start:].strip() if start >= 0 else "(no reward table in process 0's output)"


def _checkpoint_state(listing: list[str], directory: str, step: int) -> str:
    """'absent', 'writing' (objects but no commit marker yet) or 'complete', from a bucket listing."""
    prefix = f"{directory}/{step}/"
    names = [line.split()[-1] for line in listing if line.split()[-1].startswith(prefix)]
    if not names:
        return "absent"
    return "complete" if f"{prefix}commit_success.txt" in names else "writing"


def rehearse_faults(r: Rehearsal) -> None:
    """GRPO uninterrupted vs GRPO killed during a save, resumed, sent SIGTERM, resumed: equal params."""
    from kardia_jax import storage  # pylint: disable=import-outside-toplevel

    g = r.config.grpo
    every, total = g.save_every, g.max_steps
    kill_step = 2 * every
    if total <= kill_step:
        raise app.UsageError(f"--faults needs grpo.max_steps > 2 x grpo.save_every ({total} <= {kill_step}).")
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
    print("\n" + _reward_table(job.output(0)))

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


def check_export(uri: str, storage) -> str:
    """Loads an HF export from the bucket with transformers (the model itself where torch is installed)."""
    import importlib.util  # pylint: disable=import-outside-toplevel

    import transformers  # pylint: disable=import-outside-toplevel

    local = storage.local_copy(uri)
    config = transformers.AutoConfig.from_pretrained(local)
    loaded = [f"config ({config.model_type})"]
    if any(name.startswith("tokenizer") for name in os.listdir(local)):
        loaded.append(f"tokenizer ({len(transformers.AutoTokenizer.from_pretrained(local))} ids)")
    if importlib.util.find_spec("torch") is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(local)
        loaded.append(f"model ({sum(p.numel() for p in model.parameters())} parameters)")
    return f"transformers loads {uri}: " + ", ".join(loaded)


def main(argv):
    del argv
    from kardia_jax import storage  # pylint: disable=import-outside-toplevel
    from kardia_jax.data.sources import sample_path  # pylint: disable=import-outside-toplevel
    from kardia_jax.rehearsal import gcs, hub  # pylint: disable=import-outside-toplevel

    config_file = flags.FLAGS["config"].config_filename
    given = user_overrides(sys.argv[1:])
    overrides = size_overrides(_CONFIG.value, given)
    config = apply(_CONFIG.value, overrides)
    n, d = _PROCESSES.value, _DEVICES.value
    check_pod_config(config, n, d)
    print(f"Rehearsing {config_file}: {n} processes x {d} CPU devices, workdir {config.workdir}")
    print("Size overrides: " + ", ".join(f"{k}={v}" + ("" if k in given else " (rehearsal default)")
                                         for k, v in overrides.items()))

    with contextlib.ExitStack() as stack:
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="kardia_rehearsal_"))
        logdir = _LOGDIR.value or os.path.join(scratch, "logs")
        os.makedirs(logdir, exist_ok=True)
        models, datasets = hub_ids(config)
        cache = hub.seed_cache(os.path.join(scratch, "hub"), {m: hub.TinySize() for m in models},
                               {ds: sample_path() for ds in datasets})
        print(f"Seeded an offline Hugging Face cache with stand-ins for {models + datasets}")
        bucket = config.workdir[len("gs://"):].split("/", 1)[0]
        emulator = stack.enter_context(gcs.emulator(buckets=(bucket,)))
        print(f"GCS emulator at {emulator.url} serving gs://{bucket}; process logs in {logdir}")
        # One persistent compilation cache for every job and restart (as a pod would keep one in its
        # workdir): a restarted job loads the programs its previous run compiled.
        env = dict(os.environ) | emulator.env | cache.env() | {
            "JAX_COMPILATION_CACHE_DIR": os.path.join(scratch, "compilation_cache")}
        r = Rehearsal(config_file, config, overrides, n, d, env, logdir, emulator.listing, _JOB_TIMEOUT.value)

        start = time.monotonic()
        r.run("sft", "sft", r.flags())
        if _FAULTS.value:
            rehearse_faults(r)
        else:
            job = r.run("grpo", "train", r.flags())
            print("\n" + _reward_table(job.output(0)))
        r.run("evaluate grpo/hf", "evaluate", r.flags() + [f"--checkpoint={config.workdir}/grpo/hf"])
        for export in ("sft/hf", "grpo/hf"):
            print(check_export(f"{config.workdir}/{export}", storage))
        print(f"\nRehearsal of {config_file} passed in {time.monotonic() - start:.0f} s. Bucket gs://{bucket}:")
        for line in _summarize(emulator.listing(config.workdir)):
            print(f"   {line}")


if __name__ == "__main__":
    app.run(main)
