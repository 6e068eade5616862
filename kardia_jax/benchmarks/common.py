"""Shared pieces of the benchmarks: the bench-tiny model in both frameworks, a median timer, the guard that
names the `bench` extra when an optional framework (torch, trl) is missing, and what both sides of the GRPO
step benchmark share (the objective's constants, per-phase medians)."""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time

import numpy as np

BENCH_PRESET = "bench-tiny"  # Qwen2, 4 layers, hidden 256, 4 heads, 2 KV heads, mlp 1024, vocab 8192
# The reference frameworks that the default install leaves out (pyproject.toml's `bench` extra).
BENCH_EXTRA_MODULES = ("torch", "trl")

# The GRPO step benchmark's objective, the same on both sides (kardia_jax: grpo.py, TRL: grpo_trl.py).
BETA = 0.04
LEARNING_RATE = 1e-6
GRAD_CLIP = 1.0  # TRL's max_grad_norm default and kardia_jax's grpo.grad_clip default


@contextlib.contextmanager
def bench_extra():
    """Wraps the (lazy) imports of torch and trl: a missing one raises an error that says how to install it."""
    try:
        yield
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in BENCH_EXTRA_MODULES:
            raise
        raise ModuleNotFoundError(
            f"The benchmarks compare against {e.name}, an optional dependency that the default install leaves out. "
            'Install it with the `bench` extra: pip install -e ".[bench]" (from the repository root).',
            name=e.name) from e


def bench_models(seed: int = 0):
    """(torch HF model, kardia_jax Decoder) with the same random float32 weights (seed `seed`)."""
    import transformers

    with bench_extra():
        import torch

    from kardia_jax import models

    config = models.preset(BENCH_PRESET)
    torch.manual_seed(seed)
    hf_config = transformers.Qwen2Config(**{k: v for k, v in models.to_hf_config(config).items() if k != "architectures"})
    hf = transformers.Qwen2ForCausalLM(hf_config).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        # Layers unrolled, not scanned: the faster program for a 4-layer model on CPU (`ModelConfig.scan_layers`).
        # Remat keeps only the layers' projection outputs for the backward and recomputes the rest (attention
        # scores, activations): the GRPO update's temporaries go 1.72 -> 1.58 GB, and with glibc's default
        # allocator, which hands them back to the kernel after each call, the update went 2.35 -> 1.95 s.
        ours = models.from_pretrained(d, scan_layers=False, remat="dots_no_batch")
    return hf, ours


def median_time(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time (s) of `fn()` over `repeats` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def medians(records: list[dict[str, float]]) -> dict[str, float]:
    keys = records[0].keys()
    return {k: statistics.median(r[k] for r in records) for k in keys}


def set_torch_threads() -> int:
    with bench_extra():
        import torch

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    return cores


def random_prompts(num_prompts: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(10, vocab, size=(num_prompts, length)).astype(np.int32)
