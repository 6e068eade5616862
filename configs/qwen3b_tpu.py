"""Kardia-R1 with Qwen2.5-3B (Qwen3-8B judge) on a v5e-8 slice.

    python -m kardia_jax.sft --config=configs/qwen3b_tpu.py
    python -m kardia_jax.train --config=configs/qwen3b_tpu.py

The workdir is shared storage on GCS: set your bucket, --config.workdir=gs://BUCKET/kardia/qwen3b_tpu
"""

from kardia_jax.config import paper_tpu_config


def get_config():
    return paper_tpu_config(policy="Qwen/Qwen2.5-3B-Instruct", topology="v5e:2x4", workdir="gs://your-bucket/kardia/qwen3b_tpu")
