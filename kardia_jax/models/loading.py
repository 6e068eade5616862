"""Loading a model onto the mesh and saving it for the next stage: the policy (a Hugging Face checkpoint
or a random preset, with its tokenizer, the embedding grown to fit the span markers), a randomly
initialized model created already sharded, and the Hugging Face export (safetensors, config, generation
config, tokenizer) published whole, locally or on gs://.

    with jax.set_mesh(mesh):
        model, tokenizer = load_policy(config, mesh)           # sharded Decoder + its tokenizer
        ...
        export_hf(graphdef, params, tokenizer, f"{workdir}/sft/hf")
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import jax
import ml_collections
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from kardia_jax import sharding, storage
from kardia_jax.models.config import ModelConfig, preset
from kardia_jax.models.decoder import Decoder
from kardia_jax.models.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer, tokenizer_path
from kardia_jax.models.weights import from_pretrained, resize_vocab, save_pretrained

VOCAB_MULTIPLE = 64  # a preset grown to fit a tokenizer is padded to a multiple of this


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


def generation_ids(tokenizer: Tokenizer) -> dict:
    """bos/eos/pad token ids for an exported model's config.json and generation_config.json: eos is
    every stop id (end of turn first), so that `transformers` `generate` stops where our sampler does."""
    stops = list(tokenizer.stop_ids)
    ids = {"eos_token_id": stops if len(stops) > 1 else stops[0], "pad_token_id": tokenizer.pad_id}
    bos = tokenizer.hf.bos_token_id if isinstance(tokenizer, HFTokenizer) else tokenizer.sp.bos_id()
    if bos is not None and bos >= 0:
        ids["bos_token_id"] = bos
    return ids


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
    ids = generation_ids(tokenizer)
    # config.json names one eos (the end-of-turn token); generate stops at any of generation_config's.
    save_pretrained(nnx.merge(graphdef, params), stage, hf_config_extra=ids | {"eos_token_id": tokenizer.eos_id},
                    generation_config=ids)  # every process: it gathers; process 0 writes
    save_tokenizer(tokenizer, stage)
    if is_writer:
        storage.publish_dir(stage, directory)
    elif remote:
        os.rmdir(stage)  # this process wrote nothing into it


def abstract_params(model_config: ModelConfig, mesh: Mesh, rules: sharding.Rules):
    """(graphdef, nnx.State of ShapeDtypeStructs sharded over `mesh` by `rules`) of a Decoder: its
    shapes and layout without any memory (ahead-of-time compiles, `kardia_jax.aot`)."""
    rules = tuple(rules)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0), rules=rules)))
    shardings = sharding.state_shardings(state, rules, mesh)
    state = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=s)),
        state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return graphdef, state
