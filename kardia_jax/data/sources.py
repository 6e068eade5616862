"""Reading KardiaBench dialogues from local files, Google Cloud Storage or the Hugging Face hub.

`load_dialogues(source, split)` accepts:

  * a local `.jsonl` or `.parquet` file (read as is; `split` only names its dialogue ids),
  * a local directory holding `<split>.jsonl` or `<split>.parquet` (KardiaBench ships `train.jsonl` and
    `test.jsonl`),
  * the same two forms under `gs://bucket/...` (read with google-cloud-storage, imported on first use),
  * `hf://owner/name`, e.g. `hf://Jhcircle/KardiaBench`: `datasets.load_dataset(name, split=split)`
    (the dataset is gated: accept its terms on the hub and log in first).

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

from kardia_jax.data.schema import BAD_JSON, DataError, Dialogue, parse_dialogue

FILE_FORMATS = (".jsonl", ".parquet")
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
    """(the file or dataset actually read, an iterator of (1-based row number, raw row or DataError))."""
    if source.startswith("hf://"):
        return source, _hf_rows(source[len("hf://"):], split)
    if source.startswith("gs://"):
        path = source if source.endswith(FILE_FORMATS) else _find_gcs_split(source, split)
        return path, _rows_from_bytes(path, read_gcs_bytes(path))
    path = source if os.path.isfile(source) else _find_local_split(source, split)
    with open(path, "rb") as f:
        data = f.read()
    return path, _rows_from_bytes(path, data)


def _find_local_split(directory: str, split: str) -> str:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"Data source '{directory}' is neither a file nor a directory. Give a .jsonl or "
                                ".parquet file, a directory holding <split>.jsonl, a gs:// path or hf://owner/name.")
    for ext in FILE_FORMATS:
        path = os.path.join(directory, split + ext)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"No {split}.jsonl or {split}.parquet in '{directory}' (it holds: "
                            f"{sorted(os.listdir(directory))}). Check the split name or the directory.")


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


def _hf_rows(name: str, split: str) -> Iterator[tuple[int, Any]]:
    import datasets  # pylint: disable=import-outside-toplevel

    for i, row in enumerate(datasets.load_dataset(name, split=split)):
        yield i + 1, row


# Google Cloud Storage. `_gcs_client` is the single place that touches the network (tests replace it).


def _gcs_client():
    from google.cloud import storage  # pylint: disable=import-outside-toplevel

    return storage.Client()


def _split_gcs(uri: str) -> tuple[str, str]:
    bucket, _, name = uri[len("gs://"):].partition("/")
    return bucket, name.strip("/")


def read_gcs_bytes(uri: str) -> bytes:
    """The contents of the object `gs://bucket/name`."""
    bucket, name = _split_gcs(uri)
    blob = _gcs_client().bucket(bucket).blob(name)
    if not blob.exists():
        raise FileNotFoundError(f"'{uri}' does not exist. Check the path and your access to the bucket.")
    return blob.download_as_bytes()


def _find_gcs_split(prefix: str, split: str) -> str:
    bucket, name = _split_gcs(prefix)
    client = _gcs_client()
    for ext in FILE_FORMATS:
        if client.bucket(bucket).blob(f"{name}/{split}{ext}").exists():
            return f"gs://{bucket}/{name}/{split}{ext}"
    raise FileNotFoundError(f"No {split}.jsonl or {split}.parquet under '{prefix}'. Check the split name or path.")


def download_gcs_dir(uri: str, local_dir: str) -> None:
    """Copies every object directly under the prefix `uri` (not deeper) into `local_dir`."""
    bucket, name = _split_gcs(uri)
    prefix = f"{name}/" if name else ""
    found = 0
    for blob in _gcs_client().list_blobs(bucket, prefix=prefix, delimiter="/"):
        filename = blob.name[len(prefix):]
        if filename:
            blob.download_to_filename(os.path.join(local_dir, filename))
            found += 1
    if not found:
        raise FileNotFoundError(f"No files under '{uri}'. Check the path and your access to the bucket.")
