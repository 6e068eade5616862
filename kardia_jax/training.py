"""What the SFT and GRPO trainers share: loading the policy onto the mesh, the optimizer, putting host
batches on the mesh, resuming from a checkpoint, and saving the result for the next stage.

    mesh = sharding.mesh_from_config(config.mesh)
    with jax.set_mesh(mesh):
        model, tokenizer = load_policy(config, mesh)           # sharded Decoder + its tokenizer
        graphdef, params = nnx.split(model)
        optimizer = make_optimizer(lr, warmup_steps, total_steps, weight_decay, grad_clip)
        opt_state = init_optimizer(optimizer, params)         # moments sharded like the params
        batch = shard_batch(host_batch, mesh)                  # [B, ...] numpy -> batch over (data, fsdp)

Gradient accumulation is the trainer's job, not the optimizer's: each trainer runs its microbatches
in a `lax.scan` inside its jitted step and divides the summed gradient by a normalizer of the *whole*
global batch (e.g. its masked-token count), so k microbatches give exactly the one-big-batch update.
`optax.MultiSteps` would average per-microbatch means instead (wrong when microbatches hold different
numbers of tokens) and costs a jitted call per microbatch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kardia_jax import checkpoints, sharding, storage
from kardia_jax.models import Decoder, ModelConfig, from_pretrained, preset, resize_vocab, save_pretrained
from kardia_jax.models.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer, tokenizer_path

BATCH_AXES = ("data", "fsdp")  # mesh axes the batch dimension of every batch is split over
VOCAB_MULTIPLE = 64  # a preset grown to fit a tokenizer is padded to a multiple of this


# -- the policy ----------------------------------------------------------------------------------


def model_overrides(model_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The ModelConfig fields a config's `model.*` section sets on top of a preset or checkpoint."""
    keys = ("param_dtype", "dtype", "remat", "scan_layers")
    return {key: model_config[key] for key in keys}


def init_model(model_config: ModelConfig, mesh: Mesh, rules: sharding.Rules, seed: int = 0) -> Decoder:
    """A randomly initialized Decoder whose parameters are created already sharded over `mesh`.

    The init function is traced abstractly first (`nnx.eval_shape`) to read each parameter's logical
    axes, then jitted with those shardings as `out_shardings`: every device computes only its shard,
    and no device ever holds the whole model.
    """
    rules = tuple(rules)

    def create() -> Decoder:
        return Decoder(model_config, rngs=nnx.Rngs(seed), rules=rules)

    graphdef, abstract_state = nnx.split(nnx.eval_shape(create))
    shardings = sharding.state_shardings(abstract_state, rules, mesh)
    state = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def load_policy(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[Decoder, Tokenizer]:
    """The policy named by `config.model` (HF checkpoint or random preset) sharded over `mesh` with
    `config.rules`, and the tokenizer of `config.tokenizer.path` (empty: the shipped one).

    If the tokenizer has ids the model's embedding lacks, the embedding grows to fit: for a checkpoint
    only when the extra ids are the span markers the tokenizer added (their rows start at the mean
    embedding); a tokenizer whose own vocabulary is larger than the checkpoint's belongs to another
    model and is an error.
    """
    tokenizer = load_tokenizer(config.tokenizer.path or tokenizer_path(), key="tokenizer.path")
    rules = sharding.rules_from_config(config.rules)
    overrides = model_overrides(config.model)
    hf_path, preset_name = config.model.hf_path, config.model.preset
    if bool(hf_path) == bool(preset_name):
        raise ValueError(
            f"config.model: set exactly one of model.preset (random init; one of the presets in "
            f"kardia_jax/models/config.py) and model.hf_path (a Hugging Face checkpoint directory); got "
            f"preset={preset_name!r}, hf_path={hf_path!r}."
        )

    if preset_name:
        model_config = preset(preset_name, **overrides)
        if tokenizer.vocab_size > model_config.vocab_size:
            grown = _round_up(tokenizer.vocab_size, VOCAB_MULTIPLE)
            logging.warning("Preset %r has vocab %d < the tokenizer's %d ids: initializing it with vocab %d.",
                            preset_name, model_config.vocab_size, tokenizer.vocab_size, grown)
            model_config = model_config.replace(vocab_size=grown)
        model = init_model(model_config, mesh, rules, seed=config.seed)
        logging.info("Policy: preset %r, %.2fM parameters, random init (seed %d).", preset_name,
                     model_config.num_params() / 1e6, config.seed)
        return model, tokenizer

    model = from_pretrained(hf_path, mesh=mesh, rules=rules, **overrides)
    base_vocab = tokenizer.vocab_size - tokenizer.num_added_tokens  # ids the tokenizer came with
    if base_vocab > model.config.vocab_size:
        raise ValueError(
            f"{hf_path}: the model's vocabulary has {model.config.vocab_size} ids but the tokenizer at "
            f"{config.tokenizer.path or tokenizer_path()!r} already has {base_vocab} before adding the span "
            "markers, so it is not this model's tokenizer. Set tokenizer.path to the checkpoint's own "
            "tokenizer (often the same directory as model.hf_path)."
        )
    if tokenizer.num_added_tokens:
        added = list(range(base_vocab, tokenizer.vocab_size))
        new_size = max(model.config.vocab_size, tokenizer.vocab_size)
        logging.info("The tokenizer added %d span markers (ids %d..%d): embedding rows set to the mean "
                     "embedding, vocab %d -> %d.", len(added), added[0], added[-1], model.config.vocab_size,
                     new_size)
        resize_vocab(model, new_size, new_token_ids=added)
    logging.info("Policy: %s, %.2fM parameters.", hf_path, model.config.num_params() / 1e6)
    return model, tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: str) -> None:
    """Writes the tokenizer's files (span markers included) into the directory `path` (local or gs://),
    so that `load_tokenizer(path)` and `transformers.AutoTokenizer.from_pretrained(path)` read it back.
    Process 0 only."""
    if jax.process_index() != 0:
        return
    if isinstance(tokenizer, HFTokenizer):
        if storage.is_gcs(path):  # transformers writes only to a local directory
            with tempfile.TemporaryDirectory(prefix="kardia_tokenizer_") as local:
                tokenizer.hf.save_pretrained(local)
                storage.copy_dir_to(local, path)
        else:
            tokenizer.hf.save_pretrained(path)
    elif isinstance(tokenizer, SentencePieceTokenizer):
        storage.write_bytes(os.path.join(path, "tokenizer.model"), tokenizer.sp.serialized_model_proto())
    else:
        raise TypeError(f"save_tokenizer: don't know how to save a {type(tokenizer).__name__}.")


def with_checkpoint(config: ml_collections.ConfigDict, hf_dir: str) -> ml_collections.ConfigDict:
    """A copy of `config` whose policy is the Hugging Face directory `hf_dir` (local or gs://): model.hf_path
    set, model.preset cleared, and, when `hf_dir` holds tokenizer files, tokenizer.path = `hf_dir`. A
    trainer's export carries the tokenizer it was trained with (the span markers it added), which a
    tokenizer.path naming the base model's tokenizer (a hub id in the TPU configs) would lack."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.hf_path, config.model.preset = hf_dir, ""
    if not storage.is_hub_id(hf_dir) and storage.isdir(hf_dir) and any(
            name.startswith("tokenizer") for name in storage.listdir(hf_dir)):
        if config.tokenizer.path and config.tokenizer.path != hf_dir:
            logging.info("Using the tokenizer saved with %s instead of tokenizer.path=%r.", hf_dir,
                         config.tokenizer.path)
        config.tokenizer.path = hf_dir
    return config


def export_hf(graphdef, params, tokenizer, directory: str) -> None:
    """The model (HF safetensors + config.json) and tokenizer files in `directory` (local or gs://), so
    that a reader never sees a half-written model: they are staged (locally: in the sibling
    `<directory>.tmp`; for gs://: in a local temp dir) and published by `storage.publish_dir`, which
    renames the sibling into place, or uploads the files and writes the `_COMPLETE` marker last
    (`storage.is_complete` is what readers check)."""
    is_writer, remote = jax.process_index() == 0, storage.is_gcs(directory)
    stage = tempfile.mkdtemp(prefix="kardia_hf_") if remote else directory + ".tmp"
    if is_writer and not remote and os.path.exists(stage):
        shutil.rmtree(stage)
    save_pretrained(nnx.merge(graphdef, params), stage)  # every process: it gathers; process 0 writes
    save_tokenizer(tokenizer, stage)
    if is_writer:
        storage.publish_dir(stage, directory)
    elif remote:
        os.rmdir(stage)  # this process wrote nothing into it


# -- the optimizer -------------------------------------------------------------------------------


def make_schedule(learning_rate: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `learning_rate` over `warmup_steps` updates, then cosine decay to 0 at
    `total_steps`. Evaluated at the number of updates done before the current one."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=0.0,
    )


def learning_rate_at(learning_rate: float, warmup_steps: int, total_steps: int, step: int) -> float:
    """The learning rate that update number `step` (0-based) uses."""
    return float(make_schedule(learning_rate, warmup_steps, total_steps)(step))


def _decays(path, leaf) -> bool:
    """Weight decay applies to matrices (embeddings, projections), not to norm scales and biases."""
    del leaf
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return not any(n.endswith("norm") or n.endswith("bias") for n in names)


def make_optimizer(learning_rate: float, warmup_steps: int, total_steps: int, weight_decay: float,
                   grad_clip: float) -> optax.GradientTransformation:
    """AdamW on the warm-up + cosine schedule, after clipping the gradient's global norm to
    `grad_clip` (0: no clipping). Works on any parameter pytree (pure dicts or nnx.State)."""
    schedule = make_schedule(learning_rate, warmup_steps, total_steps)
    mask = lambda params: jax.tree_util.tree_map_with_path(_decays, params)
    adamw = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, mask=mask)
    if grad_clip and grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(grad_clip), adamw)
    return adamw


def optimizer_shardings(optimizer: optax.GradientTransformation, params):
    """Shardings of `optimizer.init(params)`'s state: every params-shaped tree (Adam's moments) like the
    params, everything else (step counts) replicated over the params' mesh. `params` holds jax.Arrays
    or ShapeDtypeStructs with shardings."""
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    mesh = jax.tree.leaves(param_shardings)[0].mesh
    return optax.tree_map_params(
        optimizer,
        lambda _, sharding_: sharding_,
        jax.eval_shape(optimizer.init, params),
        param_shardings,
        transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()),
    )


def init_optimizer(optimizer: optax.GradientTransformation, params):
    """The optimizer state, laid out by `optimizer_shardings`. (A plain `jax.jit(optimizer.init)` puts
    state that does not depend on the params' values on one device: a 7B model's Adam moments on one chip.)"""
    return jax.jit(optimizer.init, out_shardings=optimizer_shardings(optimizer, params))(params)


# -- batches -------------------------------------------------------------------------------------


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, Any]:
    """Puts this process's rows of a batch on the mesh: every array [B_local, ...] becomes a global
    [B_local * process_count, ...] jax.Array split over ('data', 'fsdp') on its leading axis (nested
    dicts are walked; 0-d values are replicated). The global batch must divide over data x fsdp."""
    devices = mesh.shape["data"] * mesh.shape["fsdp"]

    def put(path, x):
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec()), x)
        global_rows = x.shape[0] * jax.process_count()
        if global_rows % devices:
            raise ValueError(
                f"shard_batch: {jax.tree_util.keystr(path)} has a global batch of {global_rows} rows, not "
                f"divisible by the {devices} devices of the mesh's data x fsdp axes; make the batch size a "
                "multiple of data x fsdp."
            )
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x,
                                                      (global_rows, *x.shape[1:]))

    return jax.tree_util.tree_map_with_path(put, dict(batch))


def replicate(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """The same host array (identical on every process) as a replicated jax.Array on the mesh."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec()), np.asarray(x))


# -- checkpoints and config ----------------------------------------------------------------------


def restore_or_init(ckpt: checkpoints.Checkpointer, params, opt_state, rng: jax.Array, iterator=None):
    """Resumes from the newest checkpoint in `ckpt`, if there is one.

    `params`/`opt_state` are the freshly initialized, sharded trees: they are the restore targets
    (structure, shapes, shardings) and what is returned when there is nothing to resume. The data
    iterator, if given, is moved to the saved position in place.

    Returns (step, params, opt_state, rng): step 0 and the inputs for a fresh run.
    """
    restored = ckpt.restore_latest(params, opt_state, restore_data_iterator=iterator is not None)
    if restored is None:
        return 0, params, opt_state, rng
    if iterator is not None:
        if restored.data_iterator_state is None:
            raise ValueError(f"{ckpt.directory}/{restored.step}: the checkpoint has no data-iterator state, so "
                             "the run cannot continue with the batch that comes next.")
        iterator.set_state(restored.data_iterator_state)
    logging.info("Resumed from %s at step %d.", ckpt.directory, restored.step)
    return restored.step, restored.params, restored.opt_state, restored.rng if restored.rng is not None else rng


def data_source(data_config: ml_collections.ConfigDict) -> str:
    """Where `config.data` says the dialogues are; empty means the sample shipped with the package."""
    from kardia_jax.data.sources import sample_path  # pylint: disable=import-outside-toplevel

    return data_config.source or sample_path()


def config_snapshot(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON data (tuples become lists), for checkpoint metadata and config.json."""
    return json.loads(json.dumps(config.to_dict(), default=str))


def write_json(path: str, data: Any) -> None:
    """Writes `data` as JSON to `path` (local or gs://; process 0 only), atomically: a reader never sees
    half a file."""
    if jax.process_index() != 0:
        return
    storage.write_text(path, json.dumps(data, indent=2, sort_keys=True))


def read_json(path: str) -> Any | None:
    """The JSON document at `path` (local or gs://), or None if there is none."""
    if not storage.exists(path):
        return None
    return json.loads(storage.read_text(path))


def num_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
