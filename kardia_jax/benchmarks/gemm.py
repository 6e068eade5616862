"""Matmul throughput of XLA:CPU (jitted `jnp.dot`) against torch on the GRPO benchmark's shapes.

The GRPO step's ratio against TRL is bounded by how fast each framework multiplies the same matrices. The
shapes are bench-tiny's (hidden 256, mlp 1024, vocab 8192): a decode step's 64 rows, and the teacher-forced
passes' 9216 rows (8 prompts x 128 tokens once + 64 completions x 128) and 8192 completion rows through the
lm head. Each is timed in float32 and bfloat16 (accumulating in float32 for XLA), in the same process;
GFLOP/s = 2·m·k·n / median time of `--calls` calls after a warm-up.

    python -m kardia_jax.benchmarks.gemm
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from kardia_jax.benchmarks.common import bench_extra, median_time, set_torch_threads

flags.DEFINE_integer("calls", 20, "Timed calls per shape and dtype (the median is reported).")
FLAGS = flags.FLAGS

# (rows m, contraction k, columns n, what it is in the GRPO step)
SHAPES = (
    (64, 256, 1024, "decode: gate / up projection"),
    (64, 256, 8192, "decode: lm head"),
    (9216, 256, 1024, "teacher-forced: gate / up projection"),
    (8192, 256, 8192, "teacher-forced: lm head on completions"),
)


def measure(m: int, k: int, n: int, dtype: str, repeats: int) -> dict[str, float]:
    """GFLOP/s of XLA and torch multiplying the same random [m, k] x [k, n] matrices in `dtype`
    ("float32" or "bfloat16"), and the largest relative difference of their products (the same work is timed)."""
    with bench_extra():
        import torch

    rng = np.random.RandomState(0)
    a, b = rng.randn(m, k).astype(np.float32), rng.randn(k, n).astype(np.float32)
    ja, jb = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    ta, tb = torch.from_numpy(a).to(getattr(torch, dtype)), torch.from_numpy(b).to(getattr(torch, dtype))
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    t_xla = median_time(lambda: dot(ja, jb).block_until_ready(), repeats)
    t_torch = median_time(lambda: ta @ tb, repeats)
    ours, theirs = np.asarray(dot(ja, jb)), (ta @ tb).float().numpy()
    flop = 2 * m * k * n
    return {"xla": flop / t_xla / 1e9, "torch": flop / t_torch / 1e9,
            "rel_diff": float(np.abs(ours - theirs).max() / np.abs(theirs).max())}


def main(_):
    cores = set_torch_threads()
    print(f"device: {jax.devices()[0].platform} x{jax.device_count()}, torch threads: {cores}")
    for m, k, n, what in SHAPES:
        for dtype in ("float32", "bfloat16"):
            r = measure(m, k, n, dtype, FLAGS.calls)
            print(f"{m}x{k}x{n} {dtype:8s} ({what}): XLA {r['xla']:6.0f} GFLOP/s, torch {r['torch']:6.0f} GFLOP/s, "
                  f"XLA/torch {r['xla'] / r['torch']:.2f}")


if __name__ == "__main__":
    app.run(main)
