"""Kardia-R1 with Qwen2.5-3B (Qwen3-8B judge) on a v5e-8 slice.

    python -m kardia_jax.sft --config=configs/qwen3b_tpu.py
    python -m kardia_jax.train --config=configs/qwen3b_tpu.py

The workdir is shared storage on GCS: set your bucket, --config.workdir=gs://BUCKET/kardia/qwen3b_tpu

Fitted to 16 GiB per chip with `python -m kardia_jax.aot --config=configs/qwen3b_tpu.py` (figures in the
README's TPU section): fsdp 4 x tensor 2 (Qwen2.5-3B has 2 KV heads), so the sampler gathers half of a
layer's weights; the judge scores 64 completions at a time (all 256 at once need 11.5 GiB of temporaries);
SFT in 16 microbatches of 8 sequences; the GRPO update in 16 minibatches of 2 prompts with AdamW's first
moment in bfloat16 (its float32 moments alone are 2.9 GiB per chip beside the 1.4 GiB of float32
parameters, and the update peaks there).
"""

from kardia_jax.config import paper_tpu_config


def get_config():
    c = paper_tpu_config(policy="Qwen/Qwen2.5-3B-Instruct", topology="v5e:2x4", tensor=2,
                         workdir="gs://your-bucket/kardia/qwen3b_tpu")
    c.judge.rows_per_chunk = 64
    c.sft.grad_accum_steps = 16
    c.grpo.num_minibatches = 16
    c.grpo.mu_dtype = "bfloat16"
    return c
