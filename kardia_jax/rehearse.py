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
                                              in their formats (`rehearsal.hub`, `rehearsal.stand_ins`)
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
end. The final parameters of both runs must be equal bit for bit (`rehearsal.faults`).

Each process's log is kept under --logdir; a job that fails stops the rehearsal with the end of the
log of the process that failed (`rehearsal.jobs`).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from kardia_jax.rehearsal.faults import fault_steps, rehearse_faults
from kardia_jax.rehearsal.jobs import Rehearsal, check_export, evaluation_table, reward_table, summarize

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


def main(argv):
    del argv
    from kardia_jax import storage  # pylint: disable=import-outside-toplevel
    from kardia_jax.data.sources import sample_path  # pylint: disable=import-outside-toplevel
    from kardia_jax.rehearsal import gcs, hub, stand_ins  # pylint: disable=import-outside-toplevel

    config_file = flags.FLAGS["config"].config_filename
    given = user_overrides(sys.argv[1:])
    overrides = size_overrides(_CONFIG.value, given)
    config = apply(_CONFIG.value, overrides)
    n, d = _PROCESSES.value, _DEVICES.value
    check_pod_config(config, n, d)
    if _FAULTS.value:
        fault_steps(config)  # a GRPO too short to kill during its second save fails now, not after SFT
    print(f"Rehearsing {config_file}: {n} processes x {d} CPU devices, workdir {config.workdir}")
    print("Size overrides: " + ", ".join(f"{k}={v}" + ("" if k in given else " (rehearsal default)")
                                         for k, v in overrides.items()))

    with contextlib.ExitStack() as stack:
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="kardia_rehearsal_"))
        logdir = _LOGDIR.value or os.path.join(scratch, "logs")
        os.makedirs(logdir, exist_ok=True)
        models, datasets = hub_ids(config)
        cache = hub.seed_cache(os.path.join(scratch, "hub"), {m: stand_ins.TinySize() for m in models},
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
            print("\n" + reward_table(job.output(0)))
        job = r.run("evaluate grpo/hf", "evaluate", r.flags() + [f"--checkpoint={config.workdir}/grpo/hf"])
        print("\n" + evaluation_table(job.output(0)))
        for export in ("sft/hf", "grpo/hf"):
            print(check_export(f"{config.workdir}/{export}", storage))
        print(f"\nRehearsal of {config_file} passed in {time.monotonic() - start:.0f} s. Bucket gs://{bucket}:")
        for line in summarize(emulator.listing(config.workdir)):
            print(f"   {line}")


if __name__ == "__main__":
    app.run(main)
