"""Kardia-R1 with Gemma-7B (Qwen3-8B judge, re-tokenized on the host: different vocabulary) on a v5e-32 slice.

    python -m kardia_jax.sft --config=configs/gemma7b_tpu.py
    python -m kardia_jax.train --config=configs/gemma7b_tpu.py

The workdir is shared storage on GCS: set your bucket, --config.workdir=gs://BUCKET/kardia/gemma7b_tpu
"""

from kardia_jax.config import paper_tpu_config


def get_config():
    return paper_tpu_config(policy="google/gemma-7b-it", topology="v5e:4x8", tensor=4, workdir="gs://your-bucket/kardia/gemma7b_tpu")
