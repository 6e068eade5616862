"""Sampler vs trainer log-probabilities: how far the sampler's per-token logprobs (taken as GRPO's old
ones when `grpo.recompute_old_logprobs` is False) are from the trainer's teacher-forced forward.

For model.dtype float32 and bfloat16 (float32 parameters, random init, seed 0), it samples completions of
random prompts (temperature 1, no stop token) and prints, over the completion tokens, the mean and max of
|logp_sampler - logp_trainer| and the spread (std, min, max) of the ratio exp(logp_trainer - logp_sampler)
that the GRPO loss clips at 1 ± 0.2 on its first iteration.

    python -m kardia_jax.benchmarks.logprob_drift [--preset=bench-tiny]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from kardia_jax import models, sampling
from kardia_jax.benchmarks.common import BENCH_PRESET, random_prompts
from kardia_jax.grpo.steps import completion_logprobs



def drift(preset: str, dtype: str, *, num_prompts: int = 4, prompt_len: int = 64, num_samples: int = 4,
          new_tokens: int = 64, seed: int = 0) -> dict[str, float]:
    """Statistics of logp_sampler - logp_trainer over the sampled completion tokens (float32 results)."""
    config = dataclasses.replace(models.preset(preset), dtype=dtype)
    model = models.Decoder(config, rngs=nnx.Rngs(seed))
    prompts = jnp.asarray(random_prompts(num_prompts, prompt_len, config.vocab_size, seed))  # [B, P] int32
    prompt_mask = jnp.ones_like(prompts)
    sample_config = sampling.SamplingConfig(num_samples=num_samples, max_new_tokens=new_tokens, temperature=1.0)
    out = sampling.generate(model, prompts, prompt_mask, jax.random.key(seed), sample_config)
    graphdef, state = nnx.split(model)
    trainer = jax.jit(lambda state, *a: completion_logprobs(nnx.merge(graphdef, state), *a, 1.0))(
        state, prompts, prompt_mask, out.tokens, out.mask)  # [B·G, T] float32
    mask = np.asarray(out.mask, bool)
    delta = (np.asarray(out.logprobs, np.float64) - np.asarray(trainer, np.float64))[mask]
    ratio = np.exp(-delta)
    return {"mean_abs": float(np.abs(delta).mean()), "max_abs": float(np.abs(delta).max()),
            "ratio_std": float(ratio.std()), "ratio_min": float(ratio.min()), "ratio_max": float(ratio.max()),
            "tokens": int(mask.sum())}


def main(_):
    f = flags.FLAGS
    for dtype in ("float32", "bfloat16"):
        d = drift(f.preset, dtype, num_prompts=f.num_prompts, prompt_len=f.prompt_len, num_samples=f.num_samples,
                  new_tokens=f.new_tokens)
        print(f"{f.preset} model.dtype={dtype}: |logp_sampler - logp_trainer| mean {d['mean_abs']:.3g}, max "
              f"{d['max_abs']:.3g} over {d['tokens']} tokens; ratio exp(trainer - sampler) std {d['ratio_std']:.3g}, "
              f"min {d['ratio_min']:.4f}, max {d['ratio_max']:.4f}")


if __name__ == "__main__":
    # Defined here, not at import: kardia_jax.benchmarks.grpo, which tests import too, owns these names.
    flags.DEFINE_string("preset", BENCH_PRESET, "Model preset (random weights).")
    flags.DEFINE_integer("num_prompts", 4, "Prompts.")
    flags.DEFINE_integer("prompt_len", 64, "Prompt length (tokens).")
    flags.DEFINE_integer("num_samples", 4, "Samples per prompt (G).")
    flags.DEFINE_integer("new_tokens", 64, "New tokens per completion.")
    app.run(main)
