"""The rehearsal's jobs: a package entry point run as one JAX process per simulated host, and what it wrote.

`Job` starts `python -m kardia_jax.<module>` on every process (each with its own CPU devices, joined by
`jax.distributed` over gloo on a loopback coordinator port, its output in a log file) and waits for all of
them; `Rehearsal` holds one rehearsal's environment and runs its jobs one after another, printing what each
wrote to the bucket. `summarize`, `reward_table` and `check_export` read the jobs' results.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import ml_collections


class RehearsalError(RuntimeError):
    """A job of the rehearsal failed, or a fault did not have the effect a pod relies on."""


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
        for line in summarize(written):
            print(f"   {line}")
        return job


def summarize(lines: Sequence[str]) -> list[str]:
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


def reward_table(output: str) -> str:
    start = output.rfind("reward component")
    return output[start:].strip() if start >= 0 else "(no reward table in process 0's output)"


def evaluation_table(output: str) -> str:
    """The table `kardia_jax.evaluate` prints (with its notes, up to the list of its files)."""
    start, end = output.rfind("Evaluation on "), output.rfind("evaluate outputs:")
    return output[start:end].strip() if 0 <= start < end else "(no evaluation table in process 0's output)"


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
