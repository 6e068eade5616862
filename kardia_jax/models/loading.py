"""Loading a model onto the mesh and saving it for the next stage.

`load_model` builds the Decoder of a model section, a Hugging Face checkpoint or a random preset created
already sharded: the policy's (`config.model`, by `load_policy`, with its tokenizer and the embedding grown
to fit the span markers) and the rubric judge's (`config.judge`, by `rewards.judge.load_judge`, frozen,
with its own sharding rules; `frozen_copy` makes a judge of the policy's weights). `abstract_model` is the
same layout as sharded abstract values, for ahead-of-time compiles. `export_hf` writes the Hugging Face
export (safetensors, config, generation config, tokenizer) published whole, locally or on gs://.

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
import jax.numpy as jnp
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


def model_overrides(section: ml_collections.ConfigDict) -> dict[str, Any]:
    """The ModelConfig fields a model section sets on top of a preset or checkpoint: its dtypes, and
    `remat` and `scan_layers` where it has them (`config.model`). A section without `remat` (`config.judge`:
    frozen, never differentiated) gets remat "none"."""
    # `in`, not `.get`: a read of a key the section lacks would be an undeclared read (test_config).
    overrides = {"param_dtype": section.param_dtype, "dtype": section.dtype,
                 "remat": section.remat if "remat" in section else "none"}
    if "scan_layers" in section:
        overrides["scan_layers"] = section.scan_layers
    return overrides


def abstract_model(model_config: ModelConfig, mesh: Mesh, rules: sharding.Rules) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state): a Decoder's graph and its parameters as `jax.ShapeDtypeStruct`s that carry their
    NamedSharding over `mesh` (from each parameter's logical axes and `rules`). Traced abstractly
    (`nnx.eval_shape`): nothing is materialized. The layout `init_model` and `frozen_copy` create into,
    and the parameters an ahead-of-time compile takes."""
    rules = tuple(rules)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0), rules=rules)))
    shardings = sharding.state_shardings(state, rules, mesh)
    state = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=s)),
        state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return graphdef, state


def _shardings(abstract_state: nnx.State):
    return jax.tree.map(lambda x: x.sharding, abstract_state)


def init_model(model_config: ModelConfig, mesh: Mesh, rules: sharding.Rules, seed: int = 0) -> Decoder:
    """A randomly initialized Decoder whose parameters are created already sharded over `mesh`.

    The init function is jitted with `abstract_model`'s shardings as `out_shardings`: every device
    computes only its shard, and no device ever holds the whole model.
    """
    rules = tuple(rules)
    graphdef, abstract = abstract_model(model_config, mesh, rules)
    create = lambda: nnx.split(Decoder(model_config, rngs=nnx.Rngs(seed), rules=rules))[1]
    return nnx.merge(graphdef, jax.jit(create, out_shardings=_shardings(abstract))())


def frozen_copy(model: Decoder, mesh: Mesh, rules: sharding.Rules, **overrides) -> Decoder:
    """A copy of `model` in new buffers, its config changed by `overrides` (e.g. a frozen judge's dtypes),
    its parameters cast to that param_dtype and sharded over `mesh` by `rules`. Updates of `model` that
    donate its buffers leave the copy intact."""
    model_config = model.config.replace(**overrides)
    graphdef, abstract = abstract_model(model_config, mesh, rules)
    dtype = jnp.dtype(model_config.param_dtype)
    copied = jax.tree.map(lambda x: jnp.array(x, dtype=dtype, copy=True), nnx.split(model)[1])
    return nnx.merge(graphdef, jax.device_put(copied, _shardings(abstract)))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def load_model(section: ml_collections.ConfigDict, tokenizer: Tokenizer, mesh: Mesh, rules: sharding.Rules,
               seed: int = 0, *, name: str = "model", grow_vocab: bool = True) -> Decoder:
    """The Decoder a model section (`config.model`, `config.judge`; `name` is its key, for messages)
    names: `section.hf_path`, a Hugging Face checkpoint (local, gs:// or hub id), else `section.preset`,
    random init created sharded (`seed`); with the section's `model_overrides`, sharded over `mesh` by
    `rules`. The caller checks that exactly one of the two is set.

    The tokenizer's ids must fit the embedding. grow_vocab=True (the policy): a preset is initialized
    with a vocabulary grown to fit (to a multiple of VOCAB_MULTIPLE); a checkpoint's embedding grows by
    the span markers the tokenizer added (their rows start at the mean embedding), and a tokenizer whose
    own vocabulary is larger than the checkpoint's belongs to another model: an error. grow_vocab=False
    (a frozen judge, which never reads the span markers): a preset too small is an error; a checkpoint is
    loaded as it is.
    """
    overrides = model_overrides(section)
    if not section.hf_path:
        model_config = preset(section.preset, **overrides)
        if tokenizer.vocab_size > model_config.vocab_size:
            if not grow_vocab:
                raise ValueError(f"config.{name}.preset={section.preset!r} has vocab {model_config.vocab_size} < "
                                 f"the tokenizer's {tokenizer.vocab_size} ids; pick a larger preset.")
            grown = _round_up(tokenizer.vocab_size, VOCAB_MULTIPLE)
            logging.warning("Preset %r has vocab %d < the tokenizer's %d ids: initializing it with vocab %d.",
                            section.preset, model_config.vocab_size, tokenizer.vocab_size, grown)
            model_config = model_config.replace(vocab_size=grown)
        model = init_model(model_config, mesh, rules, seed=seed)
        logging.info("config.%s: preset %r, %.2fM parameters, random init (seed %d).", name, section.preset,
                     model_config.num_params() / 1e6, seed)
        return model

    model = from_pretrained(section.hf_path, mesh=mesh, rules=rules, key=f"{name}.hf_path", **overrides)
    logging.info("config.%s: %s, %.2fM parameters.", name, section.hf_path, model.config.num_params() / 1e6)
    if not grow_vocab:
        return model
    base_vocab = tokenizer.vocab_size - tokenizer.num_added_tokens  # ids the tokenizer came with
    if base_vocab > model.config.vocab_size:
        raise ValueError(
            f"{section.hf_path}: the model's vocabulary has {model.config.vocab_size} ids but the tokenizer of "
            f"config.{name} already has {base_vocab} before adding the span markers, so it is not this model's "
            f"tokenizer. Set its tokenizer path to the checkpoint's own tokenizer (often the same directory as "
            f"{name}.hf_path)."
        )
    if tokenizer.num_added_tokens:
        added = list(range(base_vocab, tokenizer.vocab_size))
        new_size = max(model.config.vocab_size, tokenizer.vocab_size)
        logging.info("The tokenizer added %d span markers (ids %d..%d): embedding rows set to the mean "
                     "embedding, vocab %d -> %d.", len(added), added[0], added[-1], model.config.vocab_size,
                     new_size)
        resize_vocab(model, new_size, new_token_ids=added)
    return model


def load_policy(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[Decoder, Tokenizer]:
    """The policy named by `config.model` (HF checkpoint or random preset, `load_model`) sharded over
    `mesh` with `config.rules`, and the tokenizer of `config.tokenizer.path` (empty: the shipped one),
    the embedding grown to fit it."""
    hf_path, preset_name = config.model.hf_path, config.model.preset
    if bool(hf_path) == bool(preset_name):
        raise ValueError(
            f"config.model: set exactly one of model.preset (random init; one of the presets in "
            f"kardia_jax/models/config.py) and model.hf_path (a Hugging Face checkpoint directory); got "
            f"preset={preset_name!r}, hf_path={hf_path!r}."
        )
    tokenizer = load_tokenizer(config.tokenizer.path or tokenizer_path(), key="tokenizer.path")
    model = load_model(config.model, tokenizer, mesh, sharding.rules_from_config(config.rules), config.seed)
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


def grpo_start_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config whose `model.*` and `tokenizer.*` `load_policy` reads for GRPO's starting policy:
    grpo.init_from if set, else the SFT export `<workdir>/sft/hf` once it is complete (local or gs://),
    with the tokenizer saved there (it carries the span markers SFT trained), else the config's own
    model. Also the policy a `judge.from_policy` judge copies, in training and in evaluation."""
    sft_hf = os.path.join(config.workdir, "sft", "hf")
    start = config.grpo.init_from or (sft_hf if storage.is_complete(sft_hf) else "")
    logging.info("GRPO's starting policy: %s", start or f"model preset {config.model.preset!r}")
    return with_checkpoint(config, start) if start else ml_collections.ConfigDict(config.to_dict())


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
