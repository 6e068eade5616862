"""What the ahead-of-time TPU scripts share: making libtpu importable as a compile target on a machine
with no TPU, and a model's parameters as sharded abstract values (nothing is materialised).

Call `setup_libtpu` before JAX is imported."""

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


def abstract_params(model_config, rules, mesh):
    """(graphdef, nnx.State of ShapeDtypeStructs sharded over `mesh` by `rules`) of a Decoder."""
    import jax
    from flax import nnx

    from kardia_jax import sharding
    from kardia_jax.models import Decoder

    model = nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0), rules=rules))
    graphdef, state = nnx.split(model)
    shardings = sharding.state_shardings(state, rules, mesh)
    state = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=s)),
        state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return graphdef, state
