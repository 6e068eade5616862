"""What the trainer tests share: exact tree comparison and reading a checkpoint item as saved."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def assert_same_bits(actual, expected):
    """Same tree structure and, leaf by leaf, the same dtype, shape and bytes (-0.0 != +0.0, NaN == NaN)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for path, a, e in zip((p for p, _ in jax.tree_util.tree_leaves_with_path(expected)), jax.tree.leaves(actual),
                          jax.tree.leaves(expected)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype and a.shape == e.shape, (jax.tree_util.keystr(path), a.dtype, e.dtype)
        assert a.tobytes() == e.tobytes(), f"{jax.tree_util.keystr(path)} differs"


def checkpoint_item(directory, step: int, item: str):
    """An item ("params", "opt_state") of the checkpoint `directory`/`step`, read without a target: nested
    dicts and lists of arrays (a NamedTuple's fields by name)."""
    return ocp.StandardCheckpointer().restore(os.path.join(directory, str(step), item))
