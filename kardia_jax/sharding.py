"""Device mesh and logical-axis sharding.

Every parameter and key activation is annotated with *logical* axis names (`vocab`, `embed`, `mlp`,
`heads`, `kv_heads`, `head_dim`, `layers`, and `activation_*` for activations). A rule table, part of
the config, maps each logical name to zero or more mesh axes of the mesh (`data`, `fsdp`, `tensor`).
The policy, the reference and the judge may use different rule tables on the same mesh.

A mesh axis that does not divide a dimension is dropped for that array (e.g. the single KV head of
multi-query attention is replicated rather than split over `tensor`), so one rule table serves every
model size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Parameters: FSDP over `embed`, tensor parallelism over heads/mlp/vocab.
# Activations: batch over data+fsdp, heads/mlp/vocab over tensor.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)

Rules = Sequence[tuple[str, str | Sequence[str] | None]]


def mesh_sizes(data: int, fsdp: int, tensor: int, device_count: int) -> dict[str, int]:
    """{axis: size} of a (data, fsdp, tensor) mesh over `device_count` devices, the one size that may
    be -1 resolved to the rest. Raises ValueError if the sizes do not fit the devices."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s < 1 and s != -1 for s in sizes):
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: mesh.data, mesh.fsdp and mesh.tensor are positive, "
                         "and at most one of them may be -1 (the devices left).")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if device_count % known:
            raise ValueError(
                f"mesh sizes {dict(zip(MESH_AXES, sizes))}: {device_count} devices are not divisible by {known}; set "
                f"mesh.* so that the sizes other than -1 multiply to a divisor of {device_count}."
            )
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) != device_count:
        raise ValueError(
            f"mesh sizes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices but {device_count} "
            "are available; change mesh.* or set one of them to -1 to use the rest."
        )
    return dict(zip(MESH_AXES, sizes))


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all). One size may be -1: the rest."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = list(mesh_sizes(data, fsdp, tensor, len(devices)).values())
    try:  # Physical-topology-aware device order on TPU; plain order elsewhere.
        grid = mesh_utils.create_device_mesh(sizes, devices)
    except Exception:  # noqa: BLE001 - CPU/virtual devices have no topology to honour.
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def mesh_from_config(mesh_config) -> Mesh:
    """Mesh from an ml_collections block with `data`, `fsdp`, `tensor` sizes."""
    return make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.tensor)


def rules_from_config(rules) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
    """Normalizes a rule table given as pairs or as a {logical: mesh axes} mapping."""
    items = rules.items() if hasattr(rules, "items") else rules
    out = []
    for logical, axes in items:
        if axes is not None and not isinstance(axes, str):
            axes = tuple(axes)
            for a in axes:
                if a not in MESH_AXES:
                    raise ValueError(f"sharding rule {logical!r} -> {axes!r}: unknown mesh axis {a!r} (use {MESH_AXES}).")
        elif isinstance(axes, str) and axes not in MESH_AXES:
            raise ValueError(f"sharding rule {logical!r} -> {axes!r}: unknown mesh axis (use {MESH_AXES}).")
        out.append((logical, axes))
    return tuple(out)


def logical_to_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh_shape: dict[str, int]
) -> PartitionSpec:
    """PartitionSpec for an array with the given logical axes and shape.

    Mesh axes that do not divide the dimension, or that an earlier dimension already uses, are dropped.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape, strict=True):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = []
        for a in axes:
            size = mesh_shape.get(a, 1)
            if a in used or size == 1 or dim % (size * math.prod(mesh_shape[k] for k in kept)):
                continue
            kept.append(a)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def named_sharding(logical_axes, shape, rules: Rules, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, rules, dict(mesh.shape)))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: Rules | None) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op without rules or outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, x.shape, rules, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


def state_shardings(state, rules: Rules, mesh: Mesh):
    """NamedSharding for every Variable of an `nnx.State`, from its `logical_axes` metadata."""
    from flax import nnx

    def one(var):
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            return NamedSharding(mesh, PartitionSpec())
        return named_sharding(axes, var.get_value().shape, rules, mesh)

    return jax.tree.map(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def to_host(tree):
    """The full value of every array of `tree` as NumPy, on every process.

    An array split over several processes' devices is first gathered onto every device (a collective,
    so every process must make the same call); a replicated or process-local one is read locally.
    """
    def fetch(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            x = multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)

    return jax.tree.map(fetch, tree)


def initialize_distributed(enabled: bool) -> None:
    """Joins JAX's multi-controller runtime (one process per TPU VM host) when `enabled`.

    On Cloud TPU the coordinator, process count and index are discovered by JAX. Elsewhere (GPU
    clusters, the CPU rehearsal of `kardia_jax.rehearse`) set JAX_COORDINATOR_ADDRESS (host:port of
    process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process. Must run before any other JAX
    call. Every process then runs the same program, and `jax.devices()` spans all of them.
    """
    if not enabled or jax.distributed.is_initialized():
        return
    count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    if (count is None) != (index is None):
        raise ValueError("Set both JAX_NUM_PROCESSES and JAX_PROCESS_ID (with JAX_COORDINATOR_ADDRESS), or "
                         "neither to let JAX discover the TPU slice.")
    if count is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(num_processes=int(count), process_id=int(index))
