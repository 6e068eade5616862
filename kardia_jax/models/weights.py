"""Hugging Face checkpoints <-> kardia_jax decoders.

`from_pretrained` reads a HF model directory (config.json + *.safetensors, sharded index supported) from a
local path, `gs://` or a hub id (through `kardia_jax.storage.fetch_hf`), and builds every parameter
directly as a sharded `jax.Array`: each device's shard is read from the memory-mapped safetensors file by
slice, so no host ever holds the whole model.
`save_pretrained` writes the HF layout back (config.json + safetensors shards + index), which
`transformers.AutoModelForCausalLM.from_pretrained` loads.

Layout conversion: HF stores Linear weights as [out, in]; kardia_jax stores [in, out] with the head
axes split out (q: [D, H, Dh], o: [H, Dh, D]) and the L layers stacked on a leading axis.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from kardia_jax import sharding, storage
from kardia_jax.models.config import DTYPES, ModelConfig, from_hf_config, to_hf_config
from kardia_jax.models.decoder import Decoder


@dataclass(frozen=True)
class _TensorMap:
    """How one kardia_jax parameter (per layer, if stacked) comes from one HF tensor.

    The HF tensor, of shape `hf_shape`, is reshaped to `split` (merged axes split out, e.g.
    [H*Dh, D] -> [H, Dh, D]) and transposed by `perm` to the kardia_jax layout.
    """

    hf_name: str  # may contain "{i}" for the layer index
    hf_shape: tuple[int, ...]
    split: tuple[int, ...]
    perm: tuple[int, ...]


def _tensor_maps(c: ModelConfig) -> dict[str, _TensorMap]:
    d, h, k, dh, f, v = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size
    layer = "model.layers.{i}."
    attn = layer + "self_attn."

    def vector(name, n):
        return _TensorMap(name, (n,), (n,), (0,))

    def linear(name, out, inp):  # HF [out, in] -> ours [in, out]
        return _TensorMap(name, (out, inp), (out, inp), (1, 0))

    maps = {
        "embed": _TensorMap("model.embed_tokens.weight", (v, d), (v, d), (0, 1)),
        "final_norm": vector("model.norm.weight", d),
        "attn_norm": vector(layer + "input_layernorm.weight", d),
        "mlp_norm": vector(layer + "post_attention_layernorm.weight", d),
        "q": _TensorMap(attn + "q_proj.weight", (h * dh, d), (h, dh, d), (2, 0, 1)),
        "k": _TensorMap(attn + "k_proj.weight", (k * dh, d), (k, dh, d), (2, 0, 1)),
        "v": _TensorMap(attn + "v_proj.weight", (k * dh, d), (k, dh, d), (2, 0, 1)),
        "o": _TensorMap(attn + "o_proj.weight", (d, h * dh), (d, h, dh), (1, 2, 0)),
        "gate": linear(layer + "mlp.gate_proj.weight", f, d),
        "up": linear(layer + "mlp.up_proj.weight", f, d),
        "down": linear(layer + "mlp.down_proj.weight", d, f),
    }
    if not c.tie_embeddings:
        maps["lm_head"] = linear("lm_head.weight", v, d)
    if c.qkv_bias:
        maps |= {
            "q_bias": _TensorMap(attn + "q_proj.bias", (h * dh,), (h, dh), (0, 1)),
            "k_bias": _TensorMap(attn + "k_proj.bias", (k * dh,), (k, dh), (0, 1)),
            "v_bias": _TensorMap(attn + "v_proj.bias", (k * dh,), (k, dh), (0, 1)),
        }
    if c.qk_norm:
        maps |= {"q_norm": vector(attn + "q_norm.weight", dh), "k_norm": vector(attn + "k_norm.weight", dh)}
    return maps


# -- reading -------------------------------------------------------------------------------------


# The files of a checkpoint directory that loading needs: config, weights, and the tokenizer's files.
CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")


class _SafetensorsReader:
    """Slice reads from the (possibly sharded) safetensors files of one checkpoint directory."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        else:
            files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"{directory}: no *.safetensors files (and no model.safetensors.index.json).")
            weight_map = {}
            for name in files:
                with safe_open(os.path.join(directory, name), framework="numpy") as f:
                    weight_map |= {key: name for key in f.keys()}
        self.weight_map = weight_map
        self._handles = {}

    def _handle(self, tensor: str):
        if tensor not in self.weight_map:
            raise KeyError(tensor)
        file = self.weight_map[tensor]
        if file not in self._handles:
            self._handles[file] = safe_open(os.path.join(self.directory, file), framework="numpy")
        return self._handles[file]

    def shape(self, tensor: str) -> tuple[int, ...]:
        return tuple(self._handle(tensor).get_slice(tensor).get_shape())

    def read(self, tensor: str, index: tuple[slice, ...]) -> np.ndarray:
        return self._handle(tensor).get_slice(tensor)[index]


def _groups(tmap: _TensorMap) -> list[list[int]]:
    """Which split axes make up each HF axis, e.g. [H*Dh, D] from [H, Dh, D] -> [[0, 1], [2]]."""
    groups, axis = [], 0
    for dim in tmap.hf_shape:
        group = [axis]
        axis += 1
        while math.prod(tmap.split[a] for a in group) < dim:
            group.append(axis)
            axis += 1
        groups.append(group)
    return groups


def _read_block(reader: _SafetensorsReader, tmap: _TensorMap, name: str, index: tuple[slice, ...], dtype) -> np.ndarray:
    """The block `index` (kardia_jax layout, without the layers axis) of one HF tensor, converted.

    Reads only the needed rows of the HF tensor where the slice maps to a contiguous range (always the
    case for the shardings kardia_jax uses: head_dim is never split); otherwise reads the whole tensor.
    """
    split_index = [None] * len(tmap.split)
    for ours, theirs in enumerate(tmap.perm):
        split_index[theirs] = index[ours]
    hf_index, block_split, rest = [], [], []
    for group in _groups(tmap):
        head, tail = group[0], group[1:]
        inner = math.prod(tmap.split[a] for a in tail)
        if all(split_index[a] == slice(0, tmap.split[a]) for a in tail):
            s = split_index[head]
            hf_index.append(slice(s.start * inner, s.stop * inner))
            block_split += [s.stop - s.start] + [tmap.split[a] for a in tail]
            rest += [slice(None)] * len(group)
        else:
            hf_index.append(slice(0, math.prod(tmap.split[a] for a in group)))
            block_split += [tmap.split[a] for a in group]
            rest += [split_index[a] for a in group]
    block = np.asarray(reader.read(name, tuple(hf_index))).reshape(block_split)[tuple(rest)]
    return np.transpose(block, tmap.perm).astype(dtype)


def _normalize_index(index, shape) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(dim)[:2]) for s, dim in zip(index, shape))


def _layer_names(tmap: _TensorMap, num_layers: int) -> list[str]:
    return [tmap.hf_name.format(i=i) for i in range(num_layers)] if "{i}" in tmap.hf_name else [tmap.hf_name]


def _check_checkpoint(path: str, config: ModelConfig, reader: _SafetensorsReader, maps: dict[str, _TensorMap]):
    """Every tensor the config needs is present with the right shape; raises ValueError naming it."""
    missing = [n for m in maps.values() for n in _layer_names(m, config.num_layers) if n not in reader.weight_map]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(
            f"{path}: missing tensors {missing[:5]}{more} needed by a {config.family} model with "
            f"{config.num_layers} layers; the checkpoint is incomplete or config.json does not match it."
        )
    for m in maps.values():
        for name in _layer_names(m, config.num_layers):
            if reader.shape(name) != m.hf_shape:
                raise ValueError(
                    f"{path}: tensor {name!r} has shape {list(reader.shape(name))}, expected "
                    f"{list(m.hf_shape)} from config.json."
                )


def _default_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)


def from_pretrained(
    path: str,
    *,
    mesh: Mesh | None = None,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
    key: str = "model.hf_path",
    **config_overrides,
) -> Decoder:
    """Loads a HF checkpoint into a `Decoder`, sharded over `mesh`.

    `path`: a local directory, `gs://bucket/dir` (copied to the local cache of `kardia_jax.storage`), or a
    hub id `org/name` (fetched into the HF cache; config, safetensors and tokenizer files only). `key`
    names the config key that gave `path`, for error messages. `config_overrides` set ModelConfig fields
    such as param_dtype, dtype, remat. Without a mesh the model lives on the first device. Raises
    ValueError naming the file or tensor on any mismatch.
    """
    directory = storage.fetch_hf(path, CHECKPOINT_FILES, key=key)
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{path}: no config.json; expected a Hugging Face model directory.")
    with open(config_path) as f:
        config = from_hf_config(json.load(f), where=config_path, **config_overrides)
    reader = _SafetensorsReader(directory)
    maps = _tensor_maps(config)
    _check_checkpoint(path, config, reader, maps)

    mesh = mesh or _default_mesh()
    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), rules=rules))
    graphdef, state = nnx.split(abstract)
    dtype = DTYPES[config.param_dtype]

    def load(path_keys, var):
        tmap = maps[str(path_keys[-1])]
        shape = var.get_value().shape
        stacked = str(path_keys[0]) == "layers"
        named = sharding.named_sharding(var.get_metadata()["logical_axes"], shape, rules, mesh)

        def callback(index):  # one device's shard, read straight from the files
            index = _normalize_index(index, shape)
            if not stacked:
                return _read_block(reader, tmap, tmap.hf_name, index, dtype)
            return np.stack(
                [_read_block(reader, tmap, tmap.hf_name.format(i=i), index[1:], dtype) for i in range(index[0].start, index[0].stop)]
            )

        return var.replace(jax.make_array_from_callback(shape, named, callback))

    flat = [(keys, load(keys, var)) for keys, var in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# -- writing -------------------------------------------------------------------------------------


def _hf_tensors(model: Decoder) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, HF-layout array) for every parameter, one parameter (all its layers) at a time."""
    config = model.config
    maps = _tensor_maps(config)
    inverse = lambda perm: tuple(np.argsort(perm))
    for keys, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        tmap = maps[str(keys[-1])]
        value = sharding.to_host(var.get_value())
        blocks = value if str(keys[0]) == "layers" else value[None]
        for name, block in zip(_layer_names(tmap, config.num_layers), blocks):
            yield name, np.ascontiguousarray(np.transpose(block, inverse(tmap.perm)).reshape(tmap.hf_shape))


def save_pretrained(model: Decoder, path: str, *, max_shard_bytes: int = 4 << 30, hf_config_extra=None,
                    generation_config: dict | None = None) -> None:
    """Writes config.json + safetensors shards (+ index) in the HF layout, and generation_config.json
    when `generation_config` is given (e.g. {"eos_token_id": [...], "pad_token_id": ...}: what
    `transformers` `generate` stops at and pads with).

    Shards are written as they fill, so the host holds at most one shard plus one parameter. Every
    process must call this (gathering sharded parameters is collective); only process 0 writes.
    A `gs://` path is written to a local temp dir, uploaded (`storage.copy_dir_to`) and the temp dir
    deleted; stale shards of an earlier save there are deleted first. (`sft` publishes its export with
    `storage.publish_dir` instead, so that no reader sees half of it.)
    """
    is_writer = jax.process_index() == 0
    local = tempfile.mkdtemp(prefix="kardia_save_") if is_writer and storage.is_gcs(path) else path
    if is_writer:
        os.makedirs(local, exist_ok=True)
        # An earlier save with another shard count would leave weights that loaders prefer over ours.
        for name in storage.listdir(path) if storage.isdir(path) else []:
            if name.startswith("model") and name.endswith((".safetensors", ".safetensors.index.json")):
                storage.remove_tree(os.path.join(path, name))
    files, weight_map, total = [], {}, 0
    current: dict[str, np.ndarray] = {}

    def flush():
        file = f"model-{len(files) + 1:05d}.safetensors"
        if is_writer:
            save_file(current, os.path.join(local, file), metadata={"format": "pt"})
        files.append(file)
        weight_map.update({name: file for name in current})
        current.clear()

    for name, array in _hf_tensors(model):
        if current and sum(a.nbytes for a in current.values()) + array.nbytes > max_shard_bytes:
            flush()
        current[name] = array
        total += array.nbytes
    flush()
    if not is_writer:
        return
    # Final names: a single model.safetensors, or model-0000i-of-0000n.safetensors with an index.
    n = len(files)
    final = {f: "model.safetensors" if n == 1 else f"{f[:-len('.safetensors')]}-of-{n:05d}.safetensors" for f in files}
    for f in files:
        os.replace(os.path.join(local, f), os.path.join(local, final[f]))
    if n > 1:
        with open(os.path.join(local, "model.safetensors.index.json"), "w") as f:
            index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
            json.dump(index, f, indent=2)
    with open(os.path.join(local, "config.json"), "w") as f:
        json.dump(to_hf_config(model.config, **(hf_config_extra or {})), f, indent=2)
    if generation_config is not None:
        with open(os.path.join(local, "generation_config.json"), "w") as f:
            json.dump(generation_config, f, indent=2)
    if local != path:
        storage.copy_dir_to(local, path)
        shutil.rmtree(local)


def resize_vocab(model: Decoder, vocab_size: int, new_token_ids=()) -> None:
    """Grows the (un)embedding to `vocab_size` rows, in place, for tokens added to the tokenizer.

    Rows of `new_token_ids` and every row beyond the old size are set to the mean of the other old
    rows, the usual start for added special tokens. Sharding is kept.
    """
    old = model.config.vocab_size
    if vocab_size < old:
        raise ValueError(f"resize_vocab: vocab_size {vocab_size} is smaller than the model's {old}.")
    keep = np.ones(old, bool)
    keep[[i for i in new_token_ids if i < old]] = False

    def grow(var, axis):
        # On device, into the target sharding: no process ever needs the whole (un)embedding.
        value = var.get_value()
        shape = list(value.shape)
        shape[axis] = vocab_size
        old_sharding = value.sharding
        if isinstance(old_sharding, NamedSharding):
            axes = var.get_metadata()["logical_axes"]
            target = sharding.named_sharding(axes, shape, model.rules or sharding.DEFAULT_RULES, old_sharding.mesh)
        else:
            target = old_sharding

        def resized(value):
            rows = jnp.moveaxis(value, axis, 0).astype(jnp.float32)  # [old, ...]
            kept = jnp.asarray(keep).reshape((old,) + (1,) * (rows.ndim - 1))
            mean = jnp.sum(rows * kept, axis=0) / keep.sum()
            rows = jnp.where(kept, rows, mean)
            rows = jnp.concatenate([rows, jnp.broadcast_to(mean, (vocab_size - old,) + mean.shape)])
            return jnp.moveaxis(rows, 0, axis).astype(value.dtype)

        var.set_value(jax.jit(resized, out_shardings=target)(value))

    grow(model.embed, 0)
    if not model.config.tie_embeddings:
        grow(model.lm_head, 1)
    model.config = model.config.replace(vocab_size=vocab_size)
