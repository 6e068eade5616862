"""Kardia-R1 with Qwen2.5-7B-Instruct, the released Kardia-R1 backbone (Qwen3-8B judge), on a v5e-32 slice.

    python -m kardia_jax.sft --config=configs/qwen7b_tpu.py
    python -m kardia_jax.train --config=configs/qwen7b_tpu.py

The workdir is shared storage on GCS: set your bucket, --config.workdir=gs://BUCKET/kardia/qwen7b_tpu
"""

from kardia_jax.config import paper_tpu_config


def get_config():
    return paper_tpu_config(policy="Qwen/Qwen2.5-7B-Instruct", topology="v5e:4x8", tensor=4, workdir="gs://your-bucket/kardia/qwen7b_tpu")
