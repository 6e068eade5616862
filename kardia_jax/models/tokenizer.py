"""One tokenizer interface over Hugging Face tokenizers and SentencePiece models, with the span markers.

`load_tokenizer(path)` picks the backend from the files in `path` (a local directory, a `gs://` prefix
or a Hugging Face hub id, fetched to a local directory by `kardia_jax.storage.fetch_hf` first):

  * `tokenizer.json` / `tokenizer_config.json` -> `HFTokenizer` (transformers.AutoTokenizer: Qwen2.5,
    Qwen3, Gemma on the hub, the shipped tokenizer). Chats are rendered with the tokenizer's own chat
    template; a template that rejects the system role (Gemma's) gets the system message folded into the
    first user turn; a tokenizer without a template but with `<|im_start|>` gets ChatML.
  * only `tokenizer.model` (or a path to a `.model` file) -> `SentencePieceTokenizer`, Gemma's chat
    format: `<bos><start_of_turn>user\\n…<end_of_turn>\\n<start_of_turn>model\\n…`, system folded into
    the first user turn.

The eight span markers (`MARKER_TOKENS`) must each be one token. Those the vocabulary lacks are added as
special tokens at the end of the vocabulary; `num_added_tokens` says how many ids were added beyond the
checkpoint's vocabulary, so the model can grow its embedding table to `vocab_size`.

`tokenizer_path()` is the small byte-level BPE shipped with the package (ChatML, trained on the shipped
sample by `scripts/train_tokenizer.py`), for the tiny CPU configs.
"""

from __future__ import annotations

import abc
import importlib.resources
import os
import re
from typing import Sequence

from kardia_jax import storage
from kardia_jax.spans import MARKER_TOKENS

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# End-of-turn tokens, in order of preference, for HF tokenizers: the token that ends a reply.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>")
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"  # Gemma


def tokenizer_path() -> str:
    """The directory of the shipped byte-level BPE tokenizer (ChatML, span markers included)."""
    return str(importlib.resources.files("kardia_jax").joinpath("assets", "tokenizer"))


def fold_system_message(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Moves a leading system message into the first user message (for chat formats without a system
    role, e.g. Gemma): "<system>\\n\\n<user>"."""
    if not messages or messages[0]["role"] != "system":
        return list(messages)
    system, rest = messages[0], list(messages[1:])
    if rest and rest[0]["role"] == "user":
        rest[0] = {"role": "user", "content": f"{system['content']}\n\n{rest[0]['content']}"}
        return rest
    return [{"role": "user", "content": system["content"]}, *rest]


class Tokenizer(abc.ABC):
    """What kardia_jax needs from a tokenizer.

    Attributes:
      vocab_size: number of ids, added tokens included (the model's embedding needs at least this).
      pad_id: id used for padding (never predicted: masks cover it).
      eos_id: the end-of-turn id that ends a generated reply (<|im_end|> for ChatML, <end_of_turn> for Gemma).
      stop_ids: every id that stops generation, `eos_id` first.
      marker_ids: span marker string -> its single id.
      num_added_tokens: ids added beyond the loaded vocabulary (the span markers it lacked).
    """

    vocab_size: int
    pad_id: int
    eos_id: int
    stop_ids: tuple[int, ...]
    marker_ids: dict[str, int]
    num_added_tokens: int

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it map to their ids, no BOS/EOS is added."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; with `skip_special_tokens`, special tokens (markers included) are left out."""

    @abc.abstractmethod
    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        """The chat as text in the model's chat format; with `add_generation_prompt` it ends with the
        header of an assistant turn (e.g. "<|im_start|>assistant\\n")."""

    def encode_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text (backends may do it in parallel)."""
        return [self.encode(text) for text in texts]


class HFTokenizer(Tokenizer):
    """A `transformers` tokenizer (fast, tokenizer.json) with the span markers as special tokens."""

    def __init__(self, hf_tokenizer):
        from tokenizers import AddedToken  # pylint: disable=import-outside-toplevel

        self.hf = hf_tokenizer
        size_before = len(hf_tokenizer)
        unsplit = [m for m in MARKER_TOKENS if len(hf_tokenizer.encode(m, add_special_tokens=False)) != 1]
        if unsplit:
            hf_tokenizer.add_tokens([AddedToken(m, special=True, normalized=False) for m in unsplit],
                                    special_tokens=True)
        self.num_added_tokens = len(hf_tokenizer) - size_before
        self.vocab_size = len(hf_tokenizer)
        vocab = hf_tokenizer.get_vocab()
        self.marker_ids = {m: vocab[m] for m in MARKER_TOKENS}

        end_of_turn = next((t for t in END_OF_TURN_TOKENS if t in vocab), None)
        if end_of_turn is None and hf_tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer has no end-of-turn token (<|im_end|>, <end_of_turn>) and no eos_token. "
                             "Set eos_token in its tokenizer_config.json.")
        self.eos_id = vocab[end_of_turn] if end_of_turn else hf_tokenizer.eos_token_id
        stops = [self.eos_id, hf_tokenizer.eos_token_id, vocab.get("<|endoftext|>")]
        self.stop_ids = tuple(dict.fromkeys(i for i in stops if i is not None))
        if hf_tokenizer.pad_token_id is not None:
            self.pad_id = hf_tokenizer.pad_token_id
        else:
            self.pad_id = vocab.get("<|endoftext|>", self.eos_id)

        template = hf_tokenizer.chat_template
        if template is None:
            if "<|im_start|>" not in vocab:
                raise ValueError("The tokenizer has no chat_template and no <|im_start|> token for ChatML. Add a "
                                 "chat_template to its tokenizer_config.json.")
            template = CHATML_TEMPLATE
        self._template = template
        self._fold_system = not _accepts_system_role(hf_tokenizer, template)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.hf(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False)

    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        messages = fold_system_message(list(messages)) if self._fold_system else list(messages)
        return self.hf.apply_chat_template(messages, chat_template=self._template, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)


def _accepts_system_role(hf_tokenizer, template: str) -> bool:
    """Whether `template` renders a system message (Gemma's templates raise an error on one instead)."""
    import jinja2  # pylint: disable=import-outside-toplevel

    probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    try:
        hf_tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False)
    except jinja2.TemplateError:
        return False
    return True


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (Gemma style) with Gemma's chat format and the span markers.

    Special strings (BOS, <start_of_turn>, <end_of_turn>, the markers) are cut out of the text before
    SentencePiece sees it and map to one id each: their piece id when the model has the piece, otherwise
    an added id after the model's last piece.
    """

    def __init__(self, model_file: str):
        import sentencepiece  # pylint: disable=import-outside-toplevel

        self.sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        base_size = self.sp.get_piece_size()
        self._bos = self.sp.id_to_piece(self.sp.bos_id()) if self.sp.bos_id() >= 0 else ""
        specials = {self._bos: self.sp.bos_id()} if self._bos else {}
        next_id = base_size
        for token in (START_OF_TURN, END_OF_TURN, *MARKER_TOKENS):
            piece_id = self.sp.piece_to_id(token)
            if piece_id == self.sp.unk_id():
                piece_id, next_id = next_id, next_id + 1
            specials[token] = piece_id
        self._special_ids = specials
        self._special_strings = {i: s for s, i in specials.items()}
        self._splitter = re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")

        self.num_added_tokens = next_id - base_size
        self.vocab_size = next_id
        self.marker_ids = {m: specials[m] for m in MARKER_TOKENS}
        self.eos_id = specials[END_OF_TURN]
        self.stop_ids = tuple(dict.fromkeys(i for i in (self.eos_id, self.sp.eos_id()) if i >= 0))
        self.pad_id = next(i for i in (self.sp.pad_id(), self.sp.eos_id(), 0) if i >= 0)

    def encode(self, text: str) -> list[int]:
        ids = []
        for part in self._splitter.split(text):
            if part in self._special_ids:
                ids.append(self._special_ids[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        pieces, run = [], []
        for i in (int(i) for i in ids):
            if i in self._special_strings:
                pieces.append(self.sp.decode(run))
                run = []
                if not skip_special_tokens:
                    pieces.append(self._special_strings[i])
            else:
                run.append(i)
        pieces.append(self.sp.decode(run))
        return "".join(pieces)

    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        turns = [self._bos]
        for message in fold_system_message(list(messages)):
            role = "model" if message["role"] == "assistant" else "user"
            turns.append(f"{START_OF_TURN}{role}\n{message['content']}{END_OF_TURN}\n")
        if add_generation_prompt:
            turns.append(f"{START_OF_TURN}model\n")
        return "".join(turns)


# Files a tokenizer may need (no weights): tokenizer.json/_config.json, special_tokens_map.json,
# config.json (AutoTokenizer reads the model type there), vocab/merges, SentencePiece models, templates.
TOKENIZER_FILES = ("*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken")


def load_tokenizer(path: str, key: str = "") -> Tokenizer:
    """Loads the tokenizer in `path`, span markers included.

    `path`: a local directory or `.model` file, a `gs://` directory or `.model` file, or a Hugging Face
    hub id (`org/name`; read from the HF cache with HF_HUB_OFFLINE=1). `key` names the config key that
    gave `path`, for error messages.
    """
    if path.endswith(".model") and not storage.is_hub_id(path):
        if storage.is_gcs(path):
            directory, name = path.rsplit("/", 1)
            path = os.path.join(storage.local_copy(directory, [name], key), name)
        if not os.path.isfile(path):
            raise storage.missing_error(path, key, "Give a SentencePiece .model file or a tokenizer directory.")
        return SentencePieceTokenizer(path)
    directory = storage.fetch_hf(path, TOKENIZER_FILES, key=key)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"Tokenizer path '{path}'{f' (config key {key})' if key else ''} is not a "
                                "directory or a .model file.")
    files = set(os.listdir(directory))
    if "tokenizer.json" in files:
        # The fast tokenizer exactly as tokenizer.json defines it: AutoTokenizer would rebuild it from
        # the model type of a config.json in the same directory (e.g. as a Qwen2Tokenizer, which
        # pre-tokenizes digits differently from the shipped tokenizer).
        from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel

        return HFTokenizer(PreTrainedTokenizerFast.from_pretrained(directory))
    if "tokenizer_config.json" in files:
        from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel

        return HFTokenizer(AutoTokenizer.from_pretrained(directory))
    if "tokenizer.model" in files:
        return SentencePieceTokenizer(os.path.join(directory, "tokenizer.model"))
    raise FileNotFoundError(f"No tokenizer.json, tokenizer_config.json or tokenizer.model in '{path}'"
                            f"{f' (config key {key})' if key else ''}; it holds {sorted(files)}.")
