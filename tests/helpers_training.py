"""What the trainer tests share: one tiny-model config builder, exact tree comparison and reading a
checkpoint item as saved."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from kardia_jax.config import base_config


def tiny_config(workdir="unused", **sections):
    """`base_config()` for runs of the tiny-qwen2 preset in `workdir`, with `sections` overrides, one
    dict per config section (nested dicts for nested sections): e.g.
    `tiny_config(tmp_path, mesh={"data": 2, "fsdp": 2, "tensor": 2}, grpo={"max_steps": 2})`."""
    c = base_config()
    c.workdir = str(workdir)
    c.model.preset = "tiny-qwen2"

    def apply(section, changes):
        for key, value in changes.items():
            if isinstance(value, dict):
                apply(section[key], value)
            else:
                setattr(section, key, value)

    apply(c, sections)
    return c


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


# The GRPO runs and steps of these tests: all 8 fake devices, sharded like a pod's (batch over data x fsdp,
# heads over tensor); 4 prompts x 4 samples of 8 new tokens; the judge is the policy itself.
GRPO_RUN = {"mesh": {"data": 2, "fsdp": 2, "tensor": 2}, "data": {"max_length": 256},
            "judge": {"from_policy": True, "max_context_tokens": 32, "max_response_tokens": 8}}
GRPO = {"subset": "all", "prompts_per_step": 4, "num_samples": 4, "max_new_tokens": 8, "learning_rate": 1e-3,
        "save_every": 1, "print_samples_every": 1}


def grpo_config(workdir, **grpo):
    return tiny_config(workdir, **GRPO_RUN, grpo=GRPO | grpo)
