"""What the ahead-of-time TPU scripts (`aot_compile.py`, `compile_7b.py`) share: making libtpu importable
as a compile target on a machine with no TPU. Call `setup_libtpu` before JAX is imported. (A model's
parameters as sharded abstract values: `kardia_jax.models.loading.abstract_model`.)"""

from __future__ import annotations

import os
import sys


def setup_libtpu(libtpu_dir: str = "") -> None:
    """`libtpu_dir`: a directory holding an unpacked `libtpu` package (empty: the installed one)."""
    if libtpu_dir:
        sys.path.insert(0, libtpu_dir)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU is only a compile target here
    # libtpu looks for TPU VM metadata at start-up; these keep it from complaining on a non-TPU host.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
