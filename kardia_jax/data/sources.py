"""Reading KardiaBench dialogues from local files, Google Cloud Storage or the Hugging Face hub.

`load_dialogues(source, split)` accepts:

  * a local `.jsonl` or `.parquet` file (read as is; `split` only names its dialogue ids),
  * a local directory holding `<split>.jsonl` or `<split>.parquet` (KardiaBench ships `train.jsonl` and
    `test.jsonl`),
  * the same two forms under `gs://bucket/...` (read through `kardia_jax.storage`),
  * `hf://owner/name`, e.g. `hf://Jhcircle/KardiaBench`: the dataset repository's `<split>.jsonl` or
    `<split>.parquet`, fetched with `huggingface_hub.snapshot_download(repo_type="dataset")` into the HF
    cache (with HF_HUB_OFFLINE=1 only the cache is read). KardiaBench is gated: accept its terms on the
    hub and log in first, or pre-download it.

`sample_path()` is the dialogue sample shipped with the package (synthetic, written by
`scripts/make_sample_data.py`): `load_dialogues(sample_path(), "train")`.

Every row goes through `schema.parse_dialogue`. With `on_bad_row="raise"` the first bad row raises its
`DataError`; with `on_bad_row="skip"` bad rows are counted per reason in the returned `LoadStats` and the
counts are logged, so nothing is dropped silently.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.resources
import io
import json
import os
from typing import Any, Iterator

from absl import logging

from kardia_jax import storage
from kardia_jax.spans import MARKER_TOKENS
from kardia_jax.data.schema import BAD_JSON, DataError, Dialogue, parse_dialogue

FILE_FORMATS = (".jsonl", ".parquet")
KEY = "data.source"  # the config key that names a source, for error messages
ON_BAD_ROW = ("raise", "skip")  # what `load_dialogues` does with a row that fails validation


def sample_path() -> str:
    """The directory of the shipped synthetic sample (`train.jsonl`, `test.jsonl`)."""
    return str(importlib.resources.files("kardia_jax").joinpath("assets", "sample"))


@dataclasses.dataclass
class LoadStats:
    """What `load_dialogues` read: rows seen, dialogues kept, rows skipped per `DataError.reason`."""

    source: str
    split: str
    rows_read: int = 0
    dialogues: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())


def load_dialogues(source: str, split: str, on_bad_row: str = "raise") -> tuple[list[Dialogue], LoadStats]:
    """Loads and validates the dialogues of one split.

    Args:
      source: a file, a directory, a `gs://` path to either, or `hf://owner/name` (see module doc).
      split: "train" or "test" (any split name the source has).
      on_bad_row: "raise" to stop at the first bad row, "skip" to count, log and leave bad rows out.

    Returns:
      The dialogues in source order, and the `LoadStats` of the read.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row is '{on_bad_row}'; use one of {ON_BAD_ROW}.")
    location, rows = _open_rows(source, split)
    stats = LoadStats(source=location, split=split)
    skipped = collections.Counter()
    dialogues = []
    for row_number, raw in rows:
        stats.rows_read += 1
        try:
            if isinstance(raw, DataError):
                raise raw
            dialogues.append(parse_dialogue(raw, path=location, row=row_number,
                                            dialogue_id=f"{split}-{row_number:06d}"))
        except DataError as error:
            if on_bad_row == "raise":
                raise
            if not skipped[error.reason]:
                logging.warning("Skipping bad rows of %s; first of kind '%s': %s", location, error.reason, error)
            skipped[error.reason] += 1
    stats.dialogues = len(dialogues)
    stats.skipped = dict(sorted(skipped.items()))
    if skipped:
        logging.warning("%s [%s]: read %d rows, skipped %d (%s), kept %d dialogues.", location, split,
                        stats.rows_read, stats.rows_skipped,
                        ", ".join(f"{reason}: {n}" for reason, n in stats.skipped.items()), stats.dialogues)
    else:
        logging.info("%s [%s]: read %d rows, kept %d dialogues.", location, split, stats.rows_read, stats.dialogues)
    return dialogues, stats


def _open_rows(source: str, split: str) -> tuple[str, Iterator[tuple[int, Any]]]:
    """(the file actually read, an iterator of (1-based row number, raw row or DataError))."""
    if source.startswith("hf://"):
        name = source[len("hf://"):]
        directory = storage.fetch_hf(name, [split + ext for ext in FILE_FORMATS], repo_type="dataset", key=KEY)
        path = _find_split(directory, split, shown_as=source)
    elif storage.isfile(source):
        path = source
    elif storage.isdir(source):
        path = _find_split(source, split, shown_as=source)
    else:
        raise storage.missing_error(source, KEY, "Give a .jsonl or .parquet file, a directory holding "
                                    "<split>.jsonl, a gs:// path to either, or hf://owner/name.")
    return path, _rows_from_bytes(path, storage.read_bytes(path, KEY))


def _find_split(directory: str, split: str, shown_as: str) -> str:
    """`<directory>/<split>.jsonl` or `.parquet`, whichever exists (local or gs://)."""
    for ext in FILE_FORMATS:
        path = os.path.join(directory, split + ext)
        if storage.isfile(path):
            return path
    raise FileNotFoundError(f"No {split}.jsonl or {split}.parquet in '{shown_as}' (config key {KEY}; it holds: "
                            f"{storage.listdir(directory)}). Check the split name or the directory.")


def _rows_from_bytes(path: str, data: bytes) -> Iterator[tuple[int, Any]]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

        for i, row in enumerate(pq.read_table(io.BytesIO(data)).to_pylist()):
            yield i + 1, row
        return
    for line_number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield line_number, json.loads(line)
        except json.JSONDecodeError as e:
            yield line_number, DataError(path, line_number, "<row>", BAD_JSON, f"the line is not valid JSON ({e}).",
                                         "write one JSON object per line.")


def training_texts(source: str, split: str = "train") -> list[str]:
    """The text small tokenizers are trained on (`scripts/train_tokenizer.py`, the rehearsal's hub
    stand-ins): every message of `split` in `source` (system messages hold persona and situation), each
    span marker replaced by a newline so that no merge learns a piece of a marker."""
    dialogues, _ = load_dialogues(source, split)
    texts = []
    for dialogue in dialogues:
        for message in dialogue.messages:
            text = message["content"]
            for marker in MARKER_TOKENS:
                text = text.replace(marker, "\n")
            texts.append(text)
    return texts
