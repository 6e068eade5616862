"""How each part of a checkpoint is stored: what trainers hold, converted to what Orbax writes, and back.

`kardia_jax.checkpoints.Checkpointer` passes every item through these before a save and after a restore:

    params, opt_state   nnx.State -> pure dict (`to_storable_tree`); typed PRNG keys are refused, the key
                        is saved on its own; a restore target must say where each array goes (a sharding
                        on every leaf, `check_target_shardings`)
    rng                 typed key or raw uint32 key data <-> JSON (key data + PRNG implementation name)
    metadata            a dict or ConfigDict -> a JSON-safe deep copy, made at save time

`kardia_jax.checkpoints` holds the checkpoint's layout and the save / restore lifecycle; this module only the
conversions.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def to_storable_tree(tree: Any, what: str) -> Any:
    """nnx.State -> pure dict; other pytrees pass through. Rejects typed PRNG keys (pass them as `rng`)."""
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            raise TypeError(
                f"{what} contains a PRNG key at {jax.tree_util.keystr(path)}. Checkpoint only the "
                "parameters (e.g. `nnx.state(model, nnx.Param)`) and pass the key as `rng=`."
            )
    return tree


def check_target_shardings(abstract_tree: Any, what: str) -> None:
    """Every target leaf needs a sharding: that is where the restored array will live."""
    missing = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_tree)
        if getattr(leaf, "sharding", None) is None
    ]
    if missing:
        raise ValueError(
            f"{what}: {len(missing)} leaves have no sharding (first: {missing[:3]}). Pass "
            "jax.ShapeDtypeStruct(shape, dtype, sharding=...) leaves (e.g. from jax.eval_shape of the "
            "sharded init function) or the freshly initialized, sharded arrays themselves."
        )


def rng_to_json(rng: jax.Array | None) -> dict[str, Any] | None:
    if rng is None:
        return None
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return {
            "impl": str(jax.random.key_impl(rng)),
            "data": np.asarray(jax.device_get(jax.random.key_data(rng))).tolist(),
        }
    if rng.dtype != jnp.uint32:
        raise TypeError(
            f"rng must be a typed key (jax.random.key) or raw uint32 key data (jax.random.PRNGKey); "
            f"got dtype {rng.dtype}."
        )
    return {"impl": None, "data": np.asarray(jax.device_get(rng)).tolist()}


def rng_from_json(saved: dict[str, Any] | None) -> jax.Array | None:
    if saved is None:
        return None
    data = jnp.asarray(np.asarray(saved["data"], dtype=np.uint32))
    if saved["impl"] is None:
        return data
    return jax.random.wrap_key_data(data, impl=saved["impl"])


def metadata_to_json(metadata: Any) -> dict[str, Any]:
    """Validates and deep-copies the metadata now, so a later edit by the caller cannot race the save."""
    if metadata is None:
        return {}
    if hasattr(metadata, "to_dict"):  # ml_collections.ConfigDict
        metadata = metadata.to_dict()
    try:
        return json.loads(json.dumps(metadata))
    except TypeError as error:
        raise TypeError(
            f"checkpoint metadata must be JSON-serializable (str/int/float/bool/None, lists, dicts): "
            f"{error}. Convert such values to strings before saving."
        ) from error
