"""A TPU config's GRPO step, compiled ahead of time for its topology on this (CPU) machine.

Nothing is loaded or materialised: the policy is built with `nnx.eval_shape` from the preset of the same
architecture as the config's checkpoint (`--preset`), with the config's dtypes, remat and sharding rules,
on a mesh over the devices of the config's `topology` (e.g. v5e:4x4). The jitted phases of
`kardia_jax.train.Steps` (the trainer's own functions) are traced, lowered and compiled for TPU on
abstract arguments of a full step's shapes:

  sample      prompts [B, P] -> B·G completions of grpo.max_new_tokens (the jitted sampler)
  reference   teacher-forced logprobs of the B·G completions (the frozen reference, stored in the
              compute dtype as `train.reference_params` makes it)
  update      GRPO loss, gradients over grpo.num_minibatches, AdamW (float32 masters)
  score       the rewards of the B·G completions with the rubric judge (`--judge_preset`, the config's
              judge dtype, rules, context/response budgets and rows_per_chunk) and the group advantages.
              The judge's prompts are built with the shipped tokenizer (the real judge tokenizer cannot be
              downloaded here); its rubric text is longer in those tokens than in Qwen's, so the prompt, and
              the figure, err on the large side.

XLA's memory analysis per chip (arguments + outputs + temporaries) of each phase is printed; what stays in
HBM through the whole step besides a phase's own arguments (the policy and its optimizer state, the
reference, the judge's weights: `--judge_preset` in the judge's dtype and rules) is added to each phase's
peak and compared with `--hbm_gib`.

Needs libtpu: `pip install "jax[tpu]==0.10.2"`, or `--libtpu_dir` pointing at an unpacked libtpu wheel.

    python scripts/aot_compile.py --config configs/qwen7b_tpu.py --preset qwen2.5-7b --libtpu_dir /tmp/libtpu_pkg
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time

from tpu_aot import setup_libtpu


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/qwen7b_tpu.py", help="a config file with get_config()")
    p.add_argument("--preset", default="qwen2.5-7b", help="the model preset of the config's checkpoint architecture")
    p.add_argument("--judge_preset", default="qwen3-8b", help="the judge's architecture ('' if the config has none)")
    p.add_argument("--prompt_len", type=int, default=1024, help="prompt bucket P (tokens)")
    p.add_argument("--phases", default="", help="comma-separated; empty: all (score needs --judge_preset)")
    p.add_argument("--topology", default="", help="a TPU topology instead of the config's (e.g. v5e:4x8)")
    p.add_argument("--mesh", default="", help="data,fsdp,tensor sizes instead of the config's (e.g. 1,4,4)")
    p.add_argument("--hbm_gib", type=float, default=16.0, help="HBM per chip (v5e: 16, v5p: 95, v6e: 32)")
    p.add_argument("--libtpu_dir", default="", help="directory holding an unpacked `libtpu` package")
    return p.parse_args()


ARGS = parse_args()
setup_libtpu(ARGS.libtpu_dir)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from kardia_jax.models import loading
from kardia_jax import sharding, training  # noqa: E402
from kardia_jax.config import validate  # noqa: E402
from kardia_jax.models import preset  # noqa: E402
from kardia_jax.models.config import DTYPES  # noqa: E402
from kardia_jax.models.tokenizer import load_tokenizer, tokenizer_path  # noqa: E402
from kardia_jax.rewards.judge import RubricJudge  # noqa: E402
from kardia_jax.train import Rollout, Steps  # noqa: E402

GIB = 1 << 30


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("aot_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def spec(shape, dtype, mesh, axes=None):
    """A ShapeDtypeStruct sharded by logical `axes` (None: replicated)."""
    partition = sharding.logical_to_spec(axes, shape, sharding.DEFAULT_RULES, dict(mesh.shape)) if axes else jax.sharding.PartitionSpec()
    return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(mesh, partition))


def bytes_per_chip(tree) -> int:
    """HBM one chip holds for a tree of ShapeDtypeStructs (no sharding: replicated)."""
    shard = lambda x: x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return sum(math.prod(shard(x)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def report(label: str, compiled, seconds: float, resident: int) -> None:
    """One phase: compile time, XLA's memory analysis per chip, the step's residents besides its
    arguments, and its FLOPs."""
    mem = compiled.memory_analysis()
    args, out, alias, temp = (getattr(mem, f"{k}_size_in_bytes", 0) or 0 for k in ("argument", "output", "alias", "temp"))
    peak = args + out - alias + temp + resident
    verdict = "fits" if peak <= ARGS.hbm_gib * GIB else "DOES NOT FIT"
    flops = (compiled.cost_analysis() or {}).get("flops", 0.0)
    print(f"  {label:9s} compile {seconds:6.1f} s | per chip: args {args / GIB:6.2f} GiB, out {out / GIB:6.2f}, alias "
          f"{alias / GIB:6.2f}, temp {temp / GIB:6.2f}, other residents {resident / GIB:6.2f} -> {peak / GIB:6.2f} GiB of "
          f"{ARGS.hbm_gib:.0f} ({verdict}) | {flops / 1e12:8.2f} TFLOP per chip")


def main():
    import libtpu  # noqa: F401 - fail here, clearly, without a TPU compiler
    from jax.experimental import topologies

    config = load_config(ARGS.config)
    g = config.grpo
    topology = ARGS.topology or config.topology
    devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    if ARGS.mesh:
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = (int(x) for x in ARGS.mesh.split(","))
    validate(config, "grpo", device_count=len(devices))  # the trainer's own checks, against the topology's chips
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    rules = sharding.rules_from_config(config.rules)
    model_config = preset(ARGS.preset, **loading.model_overrides(config.model))
    b, n, p, t = g.prompts_per_step, g.prompts_per_step * g.num_samples, ARGS.prompt_len, g.max_new_tokens
    print(f"jax {jax.__version__}; {ARGS.config}: {topology} ({len(devices)} x {devices[0].device_kind}), mesh "
          f"{dict(mesh.shape)}; policy {ARGS.preset} ({model_config.num_params() / 1e9:.2f} B params, "
          f"{model_config.param_dtype} params, {model_config.dtype} compute, remat {model_config.remat}); "
          f"{b} prompts x {p} tokens, G={g.num_samples}, {t} new tokens, {g.num_minibatches} minibatches")

    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        graphdef, params = loading.abstract_model(model_config, mesh, rules)
        total_steps = 1000
        optimizer = training.make_optimizer(g.learning_rate, g.warmup_steps, total_steps, g.weight_decay, g.grad_clip)
        opt_shardings = training.optimizer_shardings(optimizer, params)  # as `training.init_optimizer` lays it out
        opt_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                 jax.eval_shape(optimizer.init, params), opt_shardings)
        tokenizer = load_tokenizer(tokenizer_path())
        judge, judge_params = None, {}
        if ARGS.judge_preset:  # as `rewards.judge.load_judge` builds it, with abstract parameters
            judge_graphdef, judge_params = loading.abstract_model(preset(ARGS.judge_preset, **loading.model_overrides(config.judge)),
                                                                  mesh, sharding.rules_from_config(config.judge.rules))
            judge = RubricJudge.from_config(nnx.merge(judge_graphdef, judge_params), config.judge, tokenizer, tokenizer)
        steps = Steps(graphdef, params, judge, tokenizer, config, optimizer)
        compute = DTYPES[model_config.dtype]
        reference = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, compute if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, sharding=x.sharding),
            params,
        )
        judge_bytes = bytes_per_chip(judge_params)
        policy, optimizer_state, ref = bytes_per_chip(params), bytes_per_chip(opt_state), bytes_per_chip(reference)
        print(f"  resident per chip: policy {policy / GIB:.2f} GiB, optimizer state {optimizer_state / GIB:.2f} GiB, "
              f"reference {ref / GIB:.2f} GiB, judge ({ARGS.judge_preset or 'none'}) {judge_bytes / GIB:.2f} GiB")

        batch = ("activation_batch", None)
        prompt, prompt_mask = spec((b, p), jnp.int32, mesh, batch), spec((b, p), jnp.int32, mesh, batch)
        rows = lambda dtype: spec((n, t), dtype, mesh, batch)
        rollout = Rollout(prompt, prompt_mask, rows(jnp.int32), rows(jnp.int32), spec((n,), bool, mesh, ("activation_batch",)),
                          rows(jnp.float32), rows(jnp.float32), spec((n,), jnp.float32, mesh, ("activation_batch",)))
        # Each phase: (jitted function, its arguments, what else stays in HBM meanwhile).
        calls = {
            "sample": (steps.sample, (params, prompt, prompt_mask, jax.random.key(0)), optimizer_state + ref + judge_bytes),
            "reference": (steps.logprobs, (reference, prompt, prompt_mask, rollout.completion, rollout.completion_mask),
                          policy + optimizer_state + judge_bytes),
            "update": (steps.update, (params, opt_state, rollout), ref + judge_bytes),
        }
        if judge is not None:
            contexts = {k: spec((b, judge.max_context_tokens), jnp.int32, mesh, batch) for k in ("context_ids", "context_mask")}
            emotion_id = spec((n,), jnp.int32, mesh, ("activation_batch",))
            calls["score"] = (steps.score, (judge_params, rollout.completion, rollout.completion_mask, emotion_id, contexts),
                              policy + optimizer_state + ref)
        for name in ARGS.phases.split(",") if ARGS.phases else calls:
            if name not in calls:
                raise SystemExit(f"--phases: {name!r} is not one of {sorted(calls)} ('score' needs --judge_preset).")
            fn, args, resident = calls[name]
            start = time.perf_counter()
            try:
                compiled = fn.trace(*args).lower().compile()
            except jax.errors.JaxRuntimeError as e:  # e.g. RESOURCE_EXHAUSTED: the compiler's own fit check
                print(f"  {name:9s} compile failed: {str(e).splitlines()[0][:300]}")
                continue
            report(name, compiled, time.perf_counter() - start, resident)


if __name__ == "__main__":
    main()
