"""Smoke tests of the benchmarks at tiny sizes: the GRPO benchmark's kardia_jax half (and its judge
add-on), and the matmul-rate benchmark; a missing optional framework names the `bench` extra.

The TRL half needs the `bench` extra (torch, trl) and minutes of CPU; run the benchmark itself for it.
"""

import sys

import numpy as np
import pytest
from flax import nnx

from kardia_jax import models
from kardia_jax.benchmarks import common
from kardia_jax.benchmarks import gemm as gemm_bench
from kardia_jax.benchmarks import grpo as grpo_bench
from kardia_jax.benchmarks import grpo_trl
from kardia_jax.models.decoder import Decoder


def test_grpo_benchmark_kardia_half_runs_without_recompiling():
    model = Decoder(models.preset("tiny-qwen2"), rngs=nnx.Rngs(0))
    prompts = np.random.RandomState(0).randint(10, model.config.vocab_size, size=(2, 8)).astype(np.int32)
    result = grpo_bench.kardia_grpo(model, prompts, num_samples=2, new_tokens=4, repeats=2, warmup=1, judge=True,
                                    judge_context_tokens=16, judge_response_tokens=4)
    # kardia_grpo itself raises if a timed step recompiled, a completion stopped early or the loss is not finite.
    times = result.times
    assert set(times) == {"step", *grpo_bench.PHASES}
    assert all(v >= 0 for v in times.values())
    assert sum(times[p] for p in grpo_bench.PHASES) <= times["step"] + 1e-3
    judge = result.judge
    assert judge["rows"] == 4 and judge["shared_vocab"]
    assert judge["reward_with_judge"] > 0 and 0.0 <= judge["rubric_mean"] <= 1.0


def test_even_fraction_matches_the_trl_reward_function():
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 100, size=(5, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 4:] = 0  # a shorter completion: padding is not counted
    ours = np.asarray(grpo_bench._even_fraction(ids, mask))  # pylint: disable=protected-access
    theirs = grpo_trl.even_fraction_reward([row[m > 0].tolist() for row, m in zip(ids, mask)])
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_gemm_benchmark_times_the_same_product_in_both_frameworks():
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 1e-2)):
        rates = gemm_bench.measure(16, 32, 48, dtype, repeats=2)
        assert rates["xla"] > 0 and rates["torch"] > 0
        assert rates["rel_diff"] < tol, (dtype, rates)


@pytest.mark.parametrize("module", common.BENCH_EXTRA_MODULES)
def test_missing_reference_framework_names_the_bench_extra(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    with pytest.raises(ModuleNotFoundError, match=rf'{module}.*pip install -e "\.\[bench\]"'):
        with common.bench_extra():
            __import__(module)
    # Any other missing module is not blamed on the extra.
    monkeypatch.setitem(sys.modules, "some_other_module", None)
    with pytest.raises(ModuleNotFoundError) as info:
        with common.bench_extra():
            import some_other_module  # noqa: F401  pylint: disable=import-error,unused-import
    assert "pip install" not in str(info.value)


@pytest.mark.parametrize("module, call", [
    ("torch", common.set_torch_threads),
    ("torch", common.bench_models),
    ("torch", lambda: gemm_bench.measure(4, 4, 4, "float32", 1)),
    ("trl", lambda: grpo_trl.trl_grpo(None, np.zeros((1, 1), np.int32), num_samples=1, new_tokens=1)),
], ids=["set_torch_threads", "bench_models", "gemm", "trl_grpo"])
def test_benchmarks_import_their_reference_framework_through_the_guard(monkeypatch, module, call):
    """Where the benchmarks first import torch / trl, a missing one raises the error that names the extra."""
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ModuleNotFoundError, match=r'\[bench\]'):
        call()


def test_logprob_drift_is_zero_in_float32_and_measured_in_bfloat16():
    from kardia_jax.benchmarks import logprob_drift  # pylint: disable=import-outside-toplevel

    kwargs = dict(num_prompts=2, prompt_len=8, num_samples=2, new_tokens=8)
    f32 = logprob_drift.drift("tiny-qwen2", "float32", **kwargs)
    # float32 accumulation, two programs (decode step vs teacher-forced forward) over 32 tokens: logprobs
    # of magnitude ~8 (vocab 4096) agree to ~1e-6.
    np.testing.assert_allclose([f32["max_abs"], f32["ratio_max"], f32["ratio_min"]], [0.0, 1.0, 1.0],
                               rtol=1e-5, atol=1e-5)
    assert f32["tokens"] == 2 * 2 * 8
    bf16 = logprob_drift.drift("tiny-qwen2", "bfloat16", **kwargs)
    assert bf16["max_abs"] > 10 * f32["max_abs"]
