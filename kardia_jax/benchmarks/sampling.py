"""Sampler benchmark: kardia_jax's jitted sampler against transformers `generate` (PyTorch CPU).

Workload (fixed): bench-tiny (Qwen2, 4 layers, hidden 256, 4 heads / 2 KV heads, mlp 1024, vocab 8192,
float32, random weights, seed 0); 8 prompts x 128 tokens, G = 8 samples each (64 sequences), exactly
128 new tokens (no stop token), temperature 1, no top-k / top-p. Prints generated tokens/s for each
(median of 3 timed runs after a warm-up) and, last, the ratio.

    python -m kardia_jax.benchmarks.sampling
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from kardia_jax.benchmarks.common import bench_extra, bench_models, median_time, random_prompts, set_torch_threads
from kardia_jax.sampling import SamplingConfig, make_sampler

flags.DEFINE_integer("num_prompts", 8, "Distinct prompts.")
flags.DEFINE_integer("prompt_len", 128, "Prompt length.")
flags.DEFINE_integer("num_samples", 8, "Samples per prompt (G).")
flags.DEFINE_integer("new_tokens", 128, "New tokens per sample.")
flags.DEFINE_integer("repeats", 3, "Timed runs (median is reported).")
flags.DEFINE_integer("decode_segments", SamplingConfig.decode_segments, "kardia_jax's SamplingConfig.decode_segments.")
FLAGS = flags.FLAGS


def main(_):
    with bench_extra():
        import torch

    cores = set_torch_threads()
    hf, ours = bench_models()
    prompts = random_prompts(FLAGS.num_prompts, FLAGS.prompt_len, ours.config.vocab_size)
    generated = FLAGS.num_prompts * FLAGS.num_samples * FLAGS.new_tokens

    config = SamplingConfig(num_samples=FLAGS.num_samples, max_new_tokens=FLAGS.new_tokens, temperature=1.0,
                            decode_segments=FLAGS.decode_segments)
    graphdef, params = nnx.split(ours)
    sampler = make_sampler(graphdef, config)
    tokens, mask = jnp.asarray(prompts), jnp.ones(prompts.shape, jnp.int32)
    keys = iter(jax.random.split(jax.random.key(0), 100))

    def run_ours():
        out = sampler(params, tokens, mask, next(keys))
        jax.block_until_ready(out)
        assert int(out.lengths.min()) == FLAGS.new_tokens

    t_ours = median_time(run_ours, FLAGS.repeats)

    torch_prompts = torch.tensor(prompts, dtype=torch.long)

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(
                input_ids=torch_prompts,
                attention_mask=torch.ones_like(torch_prompts),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                num_return_sequences=FLAGS.num_samples,
                max_new_tokens=FLAGS.new_tokens,
                min_new_tokens=FLAGS.new_tokens,
                pad_token_id=0,
            )
        assert out.shape == (FLAGS.num_prompts * FLAGS.num_samples, FLAGS.prompt_len + FLAGS.new_tokens)

    t_hf = median_time(run_hf, FLAGS.repeats)
    print(f"device: {jax.devices()[0].platform} x{jax.device_count()}, torch threads: {cores}")
    print(f"workload: {FLAGS.num_prompts} prompts x {FLAGS.prompt_len} tokens, G={FLAGS.num_samples}, {FLAGS.new_tokens} new tokens; "
          f"decode segments {FLAGS.decode_segments}")
    print(f"kardia_jax sampler:      {t_ours:.3f} s  {generated / t_ours:,.0f} generated tokens/s")
    print(f"transformers.generate:   {t_hf:.3f} s  {generated / t_hf:,.0f} generated tokens/s")
    print(f"sampling speedup vs transformers: {t_hf / t_ours:.2f}")


if __name__ == "__main__":
    app.run(main)
