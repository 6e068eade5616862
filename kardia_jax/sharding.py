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


def mesh_sizes(mesh_config, num_devices: int) -> dict[str, int]:
    """The (data, fsdp, tensor) sizes of an ml_collections/dict mesh block for `num_devices` devices.
    One size may be -1: the devices left. Errors name the `mesh.*` keys and say how to fix them."""
    sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"config mesh {sizes}: at most one of mesh.data / mesh.fsdp / mesh.tensor may be -1.")
    known = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % known:
            raise ValueError(f"config mesh {sizes}: the {num_devices} devices are not divisible by {known}; set "
                             f"mesh.* so that their product divides {num_devices}.")
        sizes[free[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"config mesh {sizes} needs {math.prod(sizes.values())} devices but {num_devices} are "
                         "available; change mesh.* or set one of them to -1 to use the rest.")
    return sizes


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all). One size may be -1: the rest."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = list(mesh_sizes({"data": data, "fsdp": fsdp, "tensor": tensor}, len(devices)).values())
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
