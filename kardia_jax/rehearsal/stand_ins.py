"""The files of the rehearsal's stand-ins for the models and data a TPU config names by hub id.

`kardia_jax.rehearsal.hub` writes them into an offline Hugging Face cache, one snapshot per id. The
stand-ins (random weights; nothing here is a real checkpoint):

  * Model: the id names a real architecture, a `kardia_jax.models.PRESETS` entry (`Qwen/Qwen2.5-3B-Instruct`
    -> "qwen2.5-3b", `google/gemma-2b-it` -> "gemma-2b"; see `stand_in_config`). The stand-in keeps its
    family and layout (q/k/v biases, q/k norms, MQA / GQA / MHA, tied embeddings, rope theta, norm eps)
    at `TinySize` sizes, is randomly initialised as a `kardia_jax.models.Decoder` and written with
    `kardia_jax.models.save_pretrained` (config.json + model.safetensors), so no torch is needed.
  * Tokenizer, in the family's format, trained in well under a second on the sample's text
    (`kardia_jax.data.sources.training_texts`):
      - Qwen2.5 / Qwen3: a byte-level BPE `tokenizer.json` with Qwen's pre-tokenizer (taken from
        `transformers.Qwen2Tokenizer`, which rebuilds the tokenizer from it), its special tokens after
        the base vocabulary (`<|endoftext|>` pad, `<|im_start|>`, `<|im_end|>`; Qwen3 adds `<think>`,
        `</think>`), no BOS, a ChatML chat template (Qwen2.5's adds its default system message; Qwen3's
        has the `enable_thinking` switch). Qwen2.5 and Qwen3 share the base vocabulary and the first
        three special ids, as the real ones do. The eos is `<|im_end|>` for instruct models and Qwen3,
        `<|endoftext|>` for base Qwen2.5 models. The embedding has `QWEN_SPARE_ROWS`+ rows past the last
        id (rounded up to a multiple of 64), room for the span markers as in the real checkpoints.
      - Gemma: a SentencePiece BPE `tokenizer.model` (byte fallback, digits split, no dummy prefix,
        no normalisation) with `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3, then `<mask>`,
        `<start_of_turn>`, `<end_of_turn>`; the `tokenizer.json` that transformers converts from it
        (GemmaTokenizer), as the real repos ship both; Gemma's chat template (raises on a system role).
        The embedding has exactly one row per piece (256,000 for the real ones), so the span markers
        grow it, as they do for the real Gemma.
    tokenizer_config.json, generation_config.json and config.json carry the family's bos / eos / pad.
  * Dataset: `train.jsonl` and `test.jsonl` copied from a directory (e.g. the shipped sample,
    `kardia_jax.data.sources.sample_path()`), and a README.md card saying it is a stand-in.

Deterministic: the same arguments give the same bytes (the weights are seeded by `seed` and the id).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import tempfile
import zlib
from collections.abc import Mapping

import sentencepiece
from flax import nnx
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

# transformers is imported on first use: it imports huggingface_hub, which reads HF_HUB_CACHE and
# HF_HUB_OFFLINE when it is imported, and a launcher importing this module may set them afterwards.
from kardia_jax.data.sources import sample_path, training_texts
from kardia_jax.models import Decoder, save_pretrained
from kardia_jax.models.config import PRESETS, ModelConfig
from kardia_jax.models.tokenizer import CHATML_TEMPLATE

# Special tokens, in id order after the base vocabulary (Qwen) or from id 0 (Gemma).
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN3_SPECIAL_TOKENS = QWEN_SPECIAL_TOKENS + ("<think>", "</think>")
GEMMA_CONTROL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0..3
GEMMA_USER_DEFINED_TOKENS = ("<mask>", "<start_of_turn>", "<end_of_turn>")  # ids 4..6

# The real Qwen checkpoints have 271 embedding rows past their last id (151,665 ids, 151,936 rows); the
# stand-ins keep at least this many, enough for the eight span markers, so neither needs a resize.
QWEN_SPARE_ROWS = 16
VOCAB_MULTIPLE = 64

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN25_CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}" + CHATML_TEMPLATE
)
QWEN3_CHAT_TEMPLATE = CHATML_TEMPLATE + (
    "{%- if add_generation_prompt and enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
)
GEMMA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- raise_exception('System role not supported') }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

DATASET_SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class TinySize:
    """The sizes of a stand-in model. `num_kv_heads=None` keeps the real model's attention layout: one KV
    head if it is multi-query (gemma-2b), all heads if multi-head (gemma-7b), else num_heads // 2 (GQA)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    head_dim: int = 16
    intermediate_size: int = 128
    num_kv_heads: int | None = None



# -- model architecture -------------------------------------------------------------------------------


def _repo_name(repo_id: str) -> str:
    """'Qwen/Qwen2.5-7B-Instruct' -> 'qwen2.5-7b-instruct'."""
    return repo_id.rsplit("/", 1)[-1].lower()


def _is_instruct(repo_id: str) -> bool:
    return _repo_name(repo_id).endswith(("-instruct", "-it"))


def real_config(repo_id: str) -> ModelConfig:
    """The real architecture of a hub id: the preset named by its repo name without '-instruct' / '-it'."""
    name = _repo_name(repo_id)
    for suffix in ("-instruct", "-it"):
        name = name.removesuffix(suffix)
    if name not in PRESETS:
        raise ValueError(
            f"No stand-in for hub id {repo_id!r}: its name gives the preset {name!r}, which kardia_jax.models.PRESETS "
            f"lacks (known: {sorted(PRESETS)}). Use one of Qwen/Qwen2.5-{{0.5B,3B,7B}}[-Instruct], Qwen/Qwen3-8B, "
            "google/gemma-{2b,7b}[-it], or add a preset with the real dimensions."
        )
    return PRESETS[name]


def stand_in_config(repo_id: str, size: TinySize, vocab_size: int) -> ModelConfig:
    """The real architecture of `repo_id` (`real_config`) at `size`, with `vocab_size` embedding rows."""
    real = real_config(repo_id)
    kv_heads = size.num_kv_heads
    if kv_heads is None:
        if real.num_kv_heads == 1:
            kv_heads = 1
        elif real.num_kv_heads == real.num_heads:
            kv_heads = size.num_heads
        else:
            kv_heads = max(1, size.num_heads // 2)
    return real.replace(
        vocab_size=vocab_size,
        hidden_size=size.hidden_size,
        num_layers=size.num_layers,
        num_heads=size.num_heads,
        num_kv_heads=kv_heads,
        head_dim=size.head_dim,
        intermediate_size=size.intermediate_size,
    )


def _round_up(n: int, multiple: int) -> int:
    return multiple * math.ceil(n / multiple)


# -- tokenizers ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _TokenizerFiles:
    """A stand-in's tokenizer files, the token ids its config.json and generation_config.json name, and
    the embedding rows its model needs."""

    files: dict[str, bytes]
    config_ids: dict[str, int]  # bos_token_id / eos_token_id / pad_token_id for config.json
    generation_config: dict
    vocab_rows: int


def json_bytes(value) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()


def _added_tokens_decoder(ids: Mapping[str, int]) -> dict[str, dict]:
    return {
        str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for token, i in ids.items()
    }


def _qwen_tokenizer(repo_id: str, family: str, texts: list[str], base_vocab: int) -> _TokenizerFiles:
    """Byte-level BPE with Qwen's pipeline, the family's special tokens after the base vocabulary."""
    from transformers import Qwen2Tokenizer  # pylint: disable=import-outside-toplevel

    qwen = Qwen2Tokenizer().backend_tokenizer  # the normalizer / pre-tokenizer / decoder AutoTokenizer rebuilds
    bpe = Tokenizer(models.BPE())
    bpe.normalizer, bpe.pre_tokenizer, bpe.decoder = qwen.normalizer, qwen.pre_tokenizer, qwen.decoder
    trainer = trainers.BpeTrainer(vocab_size=base_vocab, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    specials = QWEN3_SPECIAL_TOKENS if family == "qwen3" else QWEN_SPECIAL_TOKENS
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    ids = {t: bpe.token_to_id(t) for t in specials}
    eos = "<|im_end|>" if family == "qwen3" or _is_instruct(repo_id) else "<|endoftext|>"
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_prefix_space": False,
        "added_tokens_decoder": _added_tokens_decoder(ids),
        "additional_special_tokens": [t for t in specials if t != "<|endoftext|>"],
        "bos_token": None,
        "eos_token": eos,
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": QWEN3_CHAT_TEMPLATE if family == "qwen3" else QWEN25_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 131_072,
        "split_special_tokens": False,
    }
    end_of_text = ids["<|endoftext|>"]
    eos_ids = list(dict.fromkeys([ids[eos], end_of_text]))
    return _TokenizerFiles(
        files={"tokenizer.json": (bpe.to_str(pretty=True) + "\n").encode(),
               "tokenizer_config.json": json_bytes(tokenizer_config)},
        config_ids={"bos_token_id": end_of_text, "eos_token_id": ids[eos]},
        generation_config={"bos_token_id": end_of_text, "pad_token_id": end_of_text,
                           "eos_token_id": eos_ids if len(eos_ids) > 1 else eos_ids[0]},
        vocab_rows=_round_up(bpe.get_vocab_size() + QWEN_SPARE_ROWS, VOCAB_MULTIPLE),
    )


def _sentencepiece_model(texts: list[str], vocab_size: int) -> bytes:
    """A Gemma-style SentencePiece BPE model (serialized proto), trained in memory, single-threaded."""
    pad, eos, bos, unk = GEMMA_CONTROL_TOKENS
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece=pad, eos_piece=eos, bos_piece=bos, unk_piece=unk,
            user_defined_symbols=list(GEMMA_USER_DEFINED_TOKENS), byte_fallback=True, split_digits=True,
            add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
            allow_whitespace_only_pieces=True, character_coverage=1.0, max_sentence_length=1 << 20,
            num_threads=1, minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"seed_cache(tokenizer_vocab={vocab_size}): the Gemma stand-in's SentencePiece training "
                         f"failed ({e}). Pass a smaller tokenizer_vocab.") from e
    return model.getvalue()


def _gemma_tokenizer(texts: list[str], vocab_size: int) -> _TokenizerFiles:
    """SentencePiece model + the tokenizer.json transformers converts from it, Gemma's special ids."""
    from transformers import GemmaTokenizer  # pylint: disable=import-outside-toplevel

    sp_model = _sentencepiece_model(texts, vocab_size)
    pad, eos, bos, unk = GEMMA_CONTROL_TOKENS
    ids = {t: i for i, t in enumerate(GEMMA_CONTROL_TOKENS + GEMMA_USER_DEFINED_TOKENS)}
    tokenizer_config = {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": _added_tokens_decoder(ids),
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": unk,
        "mask_token": "<mask>",
        "chat_template": GEMMA_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "spaces_between_special_tokens": False,
        "use_default_system_prompt": False,
    }
    files = {"tokenizer.model": sp_model, "tokenizer_config.json": json_bytes(tokenizer_config)}
    with tempfile.TemporaryDirectory(prefix="kardia_gemma_tok_") as directory:
        for name, data in files.items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
        converted = GemmaTokenizer.from_pretrained(directory)  # SentencePiece -> tokenizers, offline
    files["tokenizer.json"] = (converted.backend_tokenizer.to_str(pretty=True) + "\n").encode()
    return _TokenizerFiles(
        files=files,
        config_ids={"bos_token_id": ids[bos], "eos_token_id": ids[eos], "pad_token_id": ids[pad]},
        generation_config={"bos_token_id": ids[bos], "pad_token_id": ids[pad],
                           "eos_token_id": [ids[eos], ids["<end_of_turn>"]]},
        vocab_rows=vocab_size,
    )


# -- repository contents ------------------------------------------------------------------------------


def _card(title: str, body: str) -> bytes:
    return f"# {title}\n\n{body}\n".encode()


def stand_in_model_files(repo_id: str, size: TinySize = TinySize(), *, seed: int = 0,
                         texts: list[str] | None = None, tokenizer_vocab: int = 1024) -> dict[str, bytes]:
    """The files of `repo_id`'s stand-in: config.json, model.safetensors, generation_config.json, the
    tokenizer files and a README.md (see the module docstring). `texts`: the tokenizer's training text
    (default: the shipped sample's); `tokenizer_vocab`: the base BPE (Qwen) / SentencePiece (Gemma)
    vocabulary, a multiple of 64. Weights: `Decoder` random init, seeded by `seed` and `repo_id`."""
    if tokenizer_vocab % VOCAB_MULTIPLE:
        raise ValueError(f"seed_cache: tokenizer_vocab={tokenizer_vocab} is not a multiple of {VOCAB_MULTIPLE}.")
    family = real_config(repo_id).family
    texts = training_texts(sample_path()) if texts is None else texts
    if family == "gemma":
        tokenizer = _gemma_tokenizer(texts, tokenizer_vocab)
    else:
        tokenizer = _qwen_tokenizer(repo_id, family, texts, tokenizer_vocab)
    config = stand_in_config(repo_id, size, tokenizer.vocab_rows)
    model = Decoder(config, rngs=nnx.Rngs(zlib.crc32(f"{seed}:{repo_id}".encode())))
    with tempfile.TemporaryDirectory(prefix="kardia_stand_in_") as directory:
        save_pretrained(model, directory, hf_config_extra=tokenizer.config_ids)
        files = {}
        for name in sorted(os.listdir(directory)):
            with open(os.path.join(directory, name), "rb") as f:
                files[name] = f.read()
    files["generation_config.json"] = json_bytes(tokenizer.generation_config)
    files |= tokenizer.files
    files["README.md"] = _card(
        f"{repo_id} (rehearsal stand-in)",
        f"Not {repo_id}: a {config.num_params():,}-parameter {family} model with random weights and a tokenizer "
        "trained on kardia_jax's synthetic sample, written by `kardia_jax.rehearsal.hub` for the offline pod "
        "rehearsal.",
    )
    return files


def stand_in_dataset_files(repo_id: str, data_dir: str) -> dict[str, bytes]:
    """`train.jsonl` and `test.jsonl` from `data_dir`, and a README.md card with their splits."""
    files = {}
    for split in DATASET_SPLITS:
        path = os.path.join(data_dir, f"{split}.jsonl")
        if not os.path.isfile(path):
            held = sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else "nothing: not a directory"
            raise FileNotFoundError(
                f"seed_cache: dataset {repo_id!r}: no {split}.jsonl in {data_dir!r} (it holds {held}). Give a "
                "directory with train.jsonl and test.jsonl, e.g. kardia_jax.data.sources.sample_path()."
            )
        with open(path, "rb") as f:
            files[f"{split}.jsonl"] = f.read()
    splits = "".join(f"  - split: {s}\n    path: {s}.jsonl\n" for s in DATASET_SPLITS)
    header = f"---\nconfigs:\n- config_name: default\n  data_files:\n{splits}---\n"
    files["README.md"] = header.encode() + _card(
        f"{repo_id} (rehearsal stand-in)",
        f"Not {repo_id}: a copy of {os.path.basename(os.path.normpath(data_dir))!r}'s train.jsonl and test.jsonl "
        "(kardia_jax's synthetic sample for the offline pod rehearsal), in the real dataset's layout and schema.",
    )
    return files

