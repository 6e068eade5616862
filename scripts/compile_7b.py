"""Compile cost of the Qwen2.5-7B forward, measured abstractly (no weights are ever materialised).

The model is built with `nnx.eval_shape`, so parameters are ShapeDtypeStructs; the jitted function is
traced, lowered and compiled ahead of time on those shapes. The measured function is the one the GRPO
trainer calls on the policy: `Decoder.target_logprobs` (bf16 params and compute, logits in float32
`--chunk` positions at a time) on a [batch, length] token batch; `--grad` also measures its gradient.

1. On this machine's CPU, for each depth in `--layers` (default 2 and 28): trace, lower and compile
   times. Layers are scanned, so the compile time should be flat in depth.
2. With libtpu importable (`pip install "jax[tpu]==0.10.2"`, or `--libtpu_dir` pointing at an unpacked
   libtpu wheel), the same function is compiled for a TPU topology (`--tpu_topology`, e.g. v5e:2x2)
   on a (data, fsdp, tensor) mesh with the default sharding rules, and XLA's memory analysis is printed
   per device: does the step fit in HBM?

    python scripts/compile_7b.py                       # CPU only (TPU part skipped without libtpu)
    python scripts/compile_7b.py --libtpu_dir /tmp/libtpu_pkg --tpu_topology v5e:2x2 --mesh 1,4,1 --grad
"""

from __future__ import annotations

import argparse
import os
import time

from tpu_aot import setup_libtpu


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen2.5-7b")
    p.add_argument("--layers", default="2,28", help="comma-separated depths to compile on CPU")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=256, help="target_logprobs chunk size (positions)")
    p.add_argument("--remat", default="full", help="remat policy (matters only with --grad)")
    p.add_argument("--grad", action="store_true", help="also compile d(sum logprobs)/d(params)")
    p.add_argument("--tpu_topology", default="v5e:2x2", help="'' to skip the TPU AOT compile")
    p.add_argument("--mesh", default="1,4,1", help="data,fsdp,tensor sizes for the TPU compile")
    p.add_argument("--hbm_gib", type=float, default=16.0, help="HBM per chip, for the fit check (v5e: 16)")
    p.add_argument("--libtpu_dir", default="", help="directory holding an unpacked `libtpu` package")
    return p.parse_args()


ARGS = parse_args()
setup_libtpu(ARGS.libtpu_dir)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402

from kardia_jax import sharding  # noqa: E402
from kardia_jax.models import Decoder, loading, positions_from_mask, preset  # noqa: E402

GIB = 1 << 30


def model_config(num_layers: int):
    return preset(ARGS.preset, num_layers=num_layers, param_dtype="bfloat16", dtype="bfloat16", remat=ARGS.remat)


def step_fn(graphdef, grad: bool):
    """(params state, tokens [B, T], mask [B, T]) -> logprobs [B, T] float32 (or grads)."""

    def logprobs(state, tokens, mask):
        model = nnx.merge(graphdef, state)
        targets = jnp.roll(tokens, -1, axis=1)
        return model.target_logprobs(tokens, positions_from_mask(mask), mask, targets, chunk_size=ARGS.chunk)

    if not grad:
        return logprobs
    return jax.grad(lambda state, tokens, mask: jnp.sum(logprobs(state, tokens, mask) * mask))


def timed_compile(fn, *args, **jit_kwargs):
    """Trace, lower and compile `jax.jit(fn, **jit_kwargs)` on abstract args; returns (times in s, compiled)."""
    t0 = time.perf_counter()
    traced = jax.jit(fn, **jit_kwargs).trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    return (t1 - t0, t2 - t1, t3 - t2), compiled


def token_specs(sharding_=None):
    shape = (ARGS.batch, ARGS.length)
    return (jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding_), jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding_))


def describe_memory(compiled, label: str, hbm_bytes: float | None = None):
    mem = compiled.memory_analysis()
    if mem is None:
        print(f"  {label}: no memory analysis from this backend")
        return
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    values = {f: getattr(mem, f, 0) or 0 for f in fields}
    peak = values["argument_size_in_bytes"] + values["output_size_in_bytes"] - values["alias_size_in_bytes"] + values["temp_size_in_bytes"]
    parts = ", ".join(f"{f.replace('_size_in_bytes', '')} {values[f] / GIB:.3f} GiB" for f in fields)
    print(f"  {label} per device: {parts}")
    line = f"  {label} per device: args + outputs + temps = {peak / GIB:.2f} GiB"
    if hbm_bytes:
        line += f" of {hbm_bytes / GIB:.0f} GiB HBM -> {'fits' if peak <= hbm_bytes else 'DOES NOT FIT'}"
    print(line)


def cpu_part():
    print(f"== CPU ({jax.devices()[0].device_kind}, {os.cpu_count()} cores): {ARGS.preset}, bf16, "
          f"batch {ARGS.batch} x {ARGS.length} tokens, target_logprobs chunk {ARGS.chunk}")
    for kind in ("forward",) + (("grad",) if ARGS.grad else ()):
        for layers in [int(x) for x in ARGS.layers.split(",")]:
            config = model_config(layers)
            graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
            (trace, lower, comp), compiled = timed_compile(step_fn(graphdef, kind == "grad"), state, *token_specs())
            print(f"  {kind:7s} {layers:3d} layers ({config.num_params() / 1e9:5.2f} B params): "
                  f"trace {trace:6.2f} s  lower {lower:6.2f} s  compile {comp:6.2f} s")
            if layers == max(int(x) for x in ARGS.layers.split(",")):
                # XLA:CPU has no bf16 matmuls and upcasts the weights to f32: temps are not what a TPU needs.
                describe_memory(compiled, f"{kind} CPU")


def tpu_part():
    if not ARGS.tpu_topology:
        print("== TPU: skipped (--tpu_topology '')")
        return
    try:
        import libtpu  # noqa: F401
        from jax.experimental import topologies

        topology = topologies.get_topology_desc(topology_name=ARGS.tpu_topology, platform="tpu")
    except Exception as e:  # noqa: BLE001 - report why and go on: the CPU part is the main result
        print(f"== TPU: skipped, no TPU compiler available ({type(e).__name__}: {str(e)[:200]}). "
              "Install libtpu (pip install 'jax[tpu]==0.10.2') or pass --libtpu_dir.")
        return
    devices = topology.devices
    sizes = [int(x) for x in ARGS.mesh.split(",")]
    if np.prod(sizes) != len(devices):
        raise SystemExit(f"--mesh {ARGS.mesh} needs {np.prod(sizes)} devices; topology {ARGS.tpu_topology} has {len(devices)}.")
    mesh = Mesh(np.asarray(devices).reshape(sizes), sharding.MESH_AXES)
    layers = max(int(x) for x in ARGS.layers.split(","))
    print(f"== TPU AOT: topology {ARGS.tpu_topology} ({len(devices)} x {devices[0].device_kind}), mesh "
          f"{dict(mesh.shape)}, {ARGS.preset} {layers} layers, bf16, batch {ARGS.batch} x {ARGS.length}, remat {ARGS.remat}")
    rules = sharding.DEFAULT_RULES
    config = model_config(layers)
    graphdef, state = loading.abstract_model(config, mesh, rules)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    batch_spec = sharding.logical_to_spec(("activation_batch", "activation_length"), (ARGS.batch, ARGS.length), rules, dict(mesh.shape))
    tokens = token_specs(NamedSharding(mesh, batch_spec))
    for kind in ("forward",) + (("grad",) if ARGS.grad else ()):
        try:
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # turns on the activation constraints
                # Gradients come out sharded like the parameters (as a trainer asks); left to XLA they
                # may come out replicated over fsdp.
                out = {"out_shardings": shardings} if kind == "grad" else {}
                (trace, lower, comp), compiled = timed_compile(step_fn(graphdef, kind == "grad"), state, *tokens, **out)
        except jax.errors.JaxRuntimeError as e:  # e.g. RESOURCE_EXHAUSTED: the compiler's own fit check
            print(f"  {kind}: compile failed: {str(e).splitlines()[0][:300]}")
            continue
        print(f"  {kind}: trace {trace:.2f} s  lower {lower:.2f} s  compile {comp:.2f} s")
        describe_memory(compiled, f"{kind} TPU", ARGS.hbm_gib * GIB)


if __name__ == "__main__":
    print(f"jax {jax.__version__}")
    cpu_part()
    tpu_part()
