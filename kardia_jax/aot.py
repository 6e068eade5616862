"""A config's jobs compiled ahead of time for its TPU topology, on any machine: memory, FLOPs and a
roofline time per phase, and whether the job fits in the chips' HBM.

    python -m kardia_jax.aot --config=configs/qwen7b_tpu.py [--config.grpo.num_minibatches=8 ...]
                             [--topology=v5e:4x8] [--phases=sample,update]

Needs libtpu as the compiler (`pip install -e ".[tpu]"`; the test extra brings it too); no TPU is
used and nothing is downloaded or materialised: the policy and the judge are built with
`nnx.eval_shape` from `model.architecture` / `judge.architecture` (the preset with the architecture of
`model.hf_path` / `judge.hf_path`; `model.preset` when the config trains a preset), with the config's
dtypes, remat, sharding rules and mesh, on the devices of the topology. The phases are the trainers'
own jitted functions on abstract arguments of a full step's shapes (the longest prompt bucket,
`data.max_length`):

  sft           one SFT update: sft.global_batch_size sequences of data.max_length tokens
  sample        B = grpo.prompts_per_step prompts -> B·G completions of grpo.max_new_tokens
  old_logprobs  the policy's teacher-forced logprobs of the B·G completions (grpo.recompute_old_logprobs)
  reference     the same under the frozen reference (stored in the compute dtype; beta > 0)
  score         the rewards with the rubric judge and the group advantages (rubric weight > 0), at the
                widest judge context (judge.max_context_tokens), then `score@W` at each narrower width the
                pipeline cuts a batch's contexts to (judge.context_buckets: one more program each)
  update        the GRPO loss, its gradients over grpo.num_minibatches, AdamW (num_iterations per step)

Per chip and phase it prints XLA's memory analysis (arguments, outputs, temporaries) plus what else
stays resident in HBM meanwhile (policy, optimizer state, reference, judge weights), the peak against
the chip's HBM and the headroom; the compiled FLOPs against the phase's model FLOPs (`model_flops`:
the matmuls and attention our formulation computes, 3x for a backward, no rematerialization); the
bytes accessed; and a roofline time, max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) with the chip's
published figures (`CHIPS`).

XLA's cost analysis counts the body of a loop once, not times its trip count, and every phase has
loops (the scan over layers, over minibatches, over logit chunks, the decode while loops). So the
FLOPs and bytes are measured on one minibatch of the phase at 1 and 2 unrolled layers and two logit
chunk sizes and extrapolated to the model's depth, the chunk loop's trips and the minibatches
(`counted_cost`). The sampler's decode loops run one step per iteration: its cost is the prefill's
(compiled alone) plus `span` times the rest (one body per decode loop), i.e. every loop runs to
max_new_tokens. A run ends with:

    aot <config>: fits|does not fit, peak X.X GiB of Y GiB per chip (Z% headroom), update flops ratio
    R.RR, roofline step S.S s

and exits non-zero when a phase does not fit (or has less than `--min_headroom` of the HBM free).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
import time

# libtpu looks for TPU VM metadata when it starts; here the TPU is only a compile target.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_WORKER_ID", "0")
# Compiling needs no TPU, so several compiles may run at once (libtpu otherwise locks /tmp/libtpu_lockfile).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from kardia_jax import console, sharding  # noqa: E402
from kardia_jax import config_checks  # noqa: E402
from kardia_jax.aot_phases import GIB, architecture, build_phases  # noqa: E402
from kardia_jax.data.pipeline import context_widths  # noqa: E402
from kardia_jax.models import loading  # noqa: E402
from kardia_jax.models.config import ModelConfig, preset  # noqa: E402



@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation's published per-chip figures."""

    name: str
    hbm_gib: float
    bf16_tflops: float  # peak dense bf16 matmul FLOP/s, in 1e12
    hbm_gbps: float  # HBM bandwidth, in 1e9 bytes/s


# Keyed by a substring of `device_kind` (e.g. "TPU v5 lite"); Cloud TPU documentation figures.
CHIPS = {
    "v5 lite": Chip("v5e", 16.0, 197.0, 819.0),
    "v5e": Chip("v5e", 16.0, 197.0, 819.0),
    "v5p": Chip("v5p", 95.0, 459.0, 2765.0),
    "v5": Chip("v5p", 95.0, 459.0, 2765.0),
    "v6 lite": Chip("v6e", 32.0, 918.0, 1640.0),
    "v6e": Chip("v6e", 32.0, 918.0, 1640.0),
    "v4": Chip("v4", 32.0, 275.0, 1200.0),
}


def chip_of(device_kind: str) -> Chip:
    kind = device_kind.lower()
    for key, chip in CHIPS.items():  # ordered: the more specific keys first
        if key in kind:
            return chip
    raise ValueError(f"No published figures for TPU device kind {device_kind!r}; add it to kardia_jax.aot.CHIPS.")


# Per phase: (config section, its rows key, its passes key or None, its logit-chunk key and the length it
# chunks, or None). A phase makes `passes` identical passes (minibatches, microbatches) of rows / passes.
LOOPS = {
    "sft": ("sft", "global_batch_size", "grad_accum_steps", ("logits_chunk_size", "data.max_length")),
    "old_logprobs": ("grpo", "prompts_per_step", "num_minibatches", ("logits_chunk_size", "grpo.max_new_tokens")),
    "reference": ("grpo", "prompts_per_step", "num_minibatches", ("logits_chunk_size", "grpo.max_new_tokens")),
    "update": ("grpo", "prompts_per_step", "num_minibatches", ("logits_chunk_size", "grpo.max_new_tokens")),
    "sample": ("grpo", "prompts_per_step", None, None),
    "score": ("grpo", "prompts_per_step", None, None),
}


def one_pass(config: ml_collections.ConfigDict, name: str, chunk_scale: int = 1) -> ml_collections.ConfigDict:
    """`config` reduced to one of phase `name`'s passes: its rows / passes rows in one minibatch (or
    microbatch), the judge unchunked, the logit chunk `chunk_scale` times the config's."""
    c = ml_collections.ConfigDict(config.to_dict())
    section, rows, passes, chunk = LOOPS[name]
    if passes:
        c[section][rows] //= c[section][passes]
        c[section][passes] = 1
    if chunk:
        c[section][chunk[0]] *= chunk_scale
    c.judge.rows_per_chunk = 0
    return c


def cost(compiled) -> np.ndarray:
    """[FLOPs, bytes accessed] per chip, as XLA counts them (a loop body once)."""
    analysis = compiled.cost_analysis() or {}
    return np.asarray([analysis.get("flops", 0.0), analysis.get("bytes accessed", 0.0)], np.float64)


def measured_cost(config, mesh, policy: ModelConfig, judge_model, name: str, context_width: int = 0) -> np.ndarray:
    """[FLOPs, bytes] per chip of phase `name` of `config` as XLA counts them, except for the sampler's
    decode loops: its prefill (compiled alone) plus `decode_span` times the rest (one body per loop)."""
    phase = build_phases(config, mesh, policy, judge_model, {name}, context_width)[name]
    measured = cost(phase.fn.trace(*phase.args).lower().compile())
    if phase.prefill is not None:
        prefill = cost(phase.prefill[0].trace(*phase.prefill[1]).lower().compile())
        measured = prefill + phase.decode_span * (measured - prefill)
    return measured


def counted_cost(config, mesh, policy: ModelConfig, judge_model, name: str, context_width: int = 0) -> np.ndarray:
    """[FLOPs, bytes accessed] per chip of phase `name`, every loop counted by its trip count.

    Measured on one pass of the phase (`one_pass`: one minibatch or microbatch, whose memory is the
    phase's own) with the layers unrolled at depth 1 and 2, and with the logit chunk at c and 2c: the
    chunk loop's body at 2c costs twice its body at c, so cost(c) + (n - 1)·(cost(2c) - cost(c)) counts
    its n = ceil(T / c) trips; the layers are identical, so cost(1) + (L - 1)·(cost(2) - cost(1)) counts
    L of them; the phase is `passes` such passes (the optimizer's work, counted once per pass, is the
    one overcount). The sampler's decode loops: see `measured_cost`."""
    section, _, passes, chunk = LOOPS[name]
    trips, scales = 1, (1,)
    if chunk:
        size, length = config[section][chunk[0]], config[chunk[1]]
        trips = -(-length // size)
        scales = (1, 2) if trips > 1 else (1,)
    shallow = lambda mc, layers: mc.replace(num_layers=layers, scan_layers=False) if mc is not None else None
    per_depth = []
    for layers in (1, 2):
        at = [measured_cost(one_pass(config, name, scale), mesh, shallow(policy, layers), shallow(judge_model, layers),
                            name, context_width) for scale in scales]
        per_depth.append(at[0] + (trips - 1) * (at[-1] - at[0]))
    depth = (judge_model if name == "score" else policy).num_layers
    one = per_depth[0] + (depth - 1) * (per_depth[1] - per_depth[0])
    return one * (config[section][passes] if passes else 1)


@dataclasses.dataclass
class Report:
    name: str
    compile_s: float
    args: int
    out: int
    alias: int
    temp: int
    resident: int
    flops: float  # per chip, loops counted
    bytes: float  # per chip, loops counted
    model_flops: float  # per chip
    chip: Chip
    error: str = ""  # the compiler's message when it refused the program (temp: what it asked for)

    @property
    def peak(self) -> int:
        return self.args + self.out - self.alias + self.temp + self.resident

    @property
    def headroom(self) -> float:
        return 1.0 - self.peak / (self.chip.hbm_gib * GIB)

    @property
    def roofline_s(self) -> float:
        return max(self.flops / (self.chip.bf16_tflops * 1e12), self.bytes / (self.chip.hbm_gbps * 1e9))

    def line(self) -> str:
        if self.error:
            return f"  {self.name:12s} does not fit: {self.error}"
        gib = lambda x: f"{x / GIB:6.2f}"
        ratio = f"{self.flops / self.model_flops:5.2f}" if self.model_flops else "    -"
        return (f"  {self.name:12s} {self.compile_s:6.1f} s | args {gib(self.args)} out {gib(self.out)} temp "
                f"{gib(self.temp)} resident {gib(self.resident)} -> peak {gib(self.peak)} GiB of "
                f"{self.chip.hbm_gib:.0f} ({100 * self.headroom:5.1f}% free) | {self.flops / 1e12:8.2f} TFLOP, "
                f"x{ratio} of model | {self.bytes / 1e9:8.1f} GB | roofline {self.roofline_s:7.3f} s")


def _exhausted(name: str, error: Exception, resident: int, chip: Chip) -> Report:
    """The report of a phase the TPU compiler refused for lack of HBM (its message names the bytes)."""
    message = str(error).splitlines()[0]
    if "RESOURCE_EXHAUSTED" not in message:
        raise error
    asked = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", message)
    temp = int(float(asked.group(1)) * 1024 ** " KMGT".index(asked.group(2))) if asked else 0
    return Report(name, 0.0, 0, 0, 0, temp, resident, 0.0, 0.0, 0.0, chip, error=message[:300])


def compile_config(config: ml_collections.ConfigDict, topology: str, names) -> list[Report]:
    """Compiles the phases `names` of `config` for `topology` and returns their reports (printing each)."""
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

    devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    chip = chip_of(devices[0].device_kind)
    for stage in ("sft", "grpo") if "sft" in names else ("grpo",):  # the trainers' own checks
        config_checks.validate(config, stage, device_count=len(devices))
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    overrides = loading.model_overrides(config.model)
    policy = preset(architecture(config.model, "model"), **overrides)
    judge_model = None  # its weights stay resident through every GRPO phase, scored or not
    if config.grpo.reward_weights.rubric > 0:
        judge_arch = architecture(config.model if config.judge.from_policy else config.judge, "judge")
        judge_model = preset(judge_arch, **loading.model_overrides(config.judge))
    g = config.grpo
    print(f"{topology}: {len(devices)} x {devices[0].device_kind} ({chip.name}: {chip.hbm_gib:.0f} GiB, "
          f"{chip.bf16_tflops:.0f} TFLOP/s bf16, {chip.hbm_gbps:.0f} GB/s), mesh {dict(mesh.shape)}; policy "
          f"{architecture(config.model, 'model')} ({policy.num_params() / 1e9:.2f} B, {policy.param_dtype} params, "
          f"{policy.dtype} compute, remat {policy.remat}); {g.prompts_per_step} prompts x {config.data.max_length} "
          f"tokens, G={g.num_samples}, {g.max_new_tokens} new tokens, {g.num_minibatches} minibatches; "
          f"judge {judge_arch if judge_model else 'none'}", flush=True)
    reports = []
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        phases = build_phases(config, mesh, policy, judge_model, names)
        if "score" in phases:  # each narrower context width of the pipeline is one more judge program
            widths = context_widths(config.judge.max_context_tokens, config.judge.context_buckets)[:-1]
            phases |= {f"score@{w}": build_phases(config, mesh, policy, judge_model, {"score"}, w)["score"]
                       for w in widths}
        for name, phase in phases.items():
            start = time.perf_counter()
            try:
                compiled = phase.fn.trace(*phase.args).lower().compile()
            except jax.errors.JaxRuntimeError as e:  # RESOURCE_EXHAUSTED: the compiler's own fit check
                reports.append(_exhausted(name, e, phase.resident, chip))
                print(f"  {name:12s} {time.perf_counter() - start:6.1f} s | does not fit: {reports[-1].error}", flush=True)
                continue
            seconds = time.perf_counter() - start
            mem = compiled.memory_analysis()
            base, _, width = name.partition("@")
            flops, nbytes = counted_cost(config, mesh, policy, judge_model, base, int(width or 0))
            sizes = (int(getattr(mem, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp"))
            reports.append(Report(name, seconds, *sizes, phase.resident, flops, nbytes,
                                  phase.model_flops / len(devices), chip))
            print(reports[-1].line(), flush=True)
    return reports


def summary(name: str, reports: list[Report], num_iterations: int, min_headroom: float) -> tuple[str, bool]:
    """The final line of a config and whether every phase fits with `min_headroom` of the HBM free."""
    worst = max(reports, key=lambda r: r.peak)
    fits = all(r.headroom >= min_headroom for r in reports)
    update = next((r for r in reports if r.name == "update"), None)
    ratio = f"{update.flops / update.model_flops:.2f}" if update else "-"
    # A step: every GRPO phase once (the update num_iterations times), the judge at its widest contexts.
    step = sum(r.roofline_s * (num_iterations if r.name == "update" else 1) for r in reports
               if r.name != "sft" and "@" not in r.name)
    return (f"aot {name}: {'fits' if fits else 'does not fit'}, peak {worst.peak / GIB:.1f} GiB of "
            f"{worst.chip.hbm_gib:.0f} GiB per chip ({100 * worst.headroom:.0f}% headroom, {worst.name}), update "
            f"flops ratio {ratio}, roofline step {step:.1f} s"), fits


PHASES = ("sft", "sample", "old_logprobs", "reference", "score", "update")


def define_flags() -> None:
    """The command line's flags, defined only when this module is the program (`python -m kardia_jax.aot`):
    importing it (the tests do) must not claim `--config`, which other entry points define too."""
    config_flags.DEFINE_config_file("config", "configs/qwen7b_tpu.py", "Config file (get_config()).")
    flags.DEFINE_string("topology", "", "A TPU topology instead of the config's `topology` (e.g. v5e:4x8).")
    flags.DEFINE_list("phases", list(PHASES), f"Phases to compile, of {PHASES}.")
    flags.DEFINE_float("min_headroom", 0.10, "Fraction of HBM that must stay free for 'fits'.")


def main(argv):
    del argv
    console.setup(False)
    args = flags.FLAGS
    config = args.config
    unknown = sorted(set(args.phases) - set(PHASES))
    if unknown:
        raise app.UsageError(f"--phases: {unknown} not among {PHASES}.")
    topology = args.topology or config.topology
    if not topology:
        raise app.UsageError("The config names no topology (config.topology): pass --topology=v5e:2x4 or similar.")
    if importlib.util.find_spec("libtpu") is None:
        raise SystemExit("kardia_jax.aot needs libtpu as its compiler: pip install -e \".[tpu]\".")
    reports = compile_config(config, topology, set(args.phases))
    name = os.path.splitext(os.path.basename(config_flags.get_config_filename(args["config"])))[0]
    line, fits = summary(name, reports, config.grpo.num_iterations, args.min_headroom)
    print(line)
    sys.exit(0 if fits else 1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
