"""Kardia-R1 with Gemma-2B (Qwen3-8B judge, re-tokenized on the host: different vocabulary) on a v5e-8 slice.

    python -m kardia_jax.sft --config=configs/gemma2b_tpu.py
    python -m kardia_jax.train --config=configs/gemma2b_tpu.py

The workdir is shared storage on GCS: set your bucket, --config.workdir=gs://BUCKET/kardia/gemma2b_tpu
"""

from kardia_jax.config import paper_tpu_config


def get_config():
    return paper_tpu_config(policy="google/gemma-2b-it", topology="v5e:2x4", workdir="gs://your-bucket/kardia/gemma2b_tpu")
