"""An offline Hugging Face hub cache, seeded with tiny stand-ins of the models and data a TPU config names.

The TPU configs name their checkpoints and data by hub id (`Qwen/Qwen2.5-7B-Instruct`, `Qwen/Qwen3-8B`,
`google/gemma-2b-it`, `hf://Jhcircle/KardiaBench`). `seed_cache` writes, for each id, what
`huggingface_hub.snapshot_download` leaves in its cache after a download:

    <cache_dir>/models--Qwen--Qwen2.5-7B-Instruct/
        refs/main                    the snapshot's commit id: 40 hex digits, no newline
        blobs/<etag>                 each file's bytes, named as the hub names them: git sha1 of the
                                     file, or sha256 for LFS files (*.safetensors, *.model)
        snapshots/<commit>/<file>    relative symlinks into blobs/
        trees/<commit>.json          the commit's file listing (huggingface_hub 2.x): offline, it is
                                     what tells `snapshot_download` that the snapshot is complete
    <cache_dir>/datasets--Jhcircle--KardiaBench/…   likewise

A process started with `HF_HUB_CACHE=<cache_dir>` and `HF_HUB_OFFLINE=1` (`SeededCache.env()`; both are
read when huggingface_hub is imported) then resolves the ids through the real code paths:
`huggingface_hub.snapshot_download(id)` (`repo_type="dataset"` for data), `transformers.AutoConfig /
AutoTokenizer / AutoModelForCausalLM.from_pretrained(id)`, `kardia_jax.models.from_pretrained(id)`.

What each id's snapshot holds (a tiny random model of the id's architecture with a tokenizer in its
family's format, or the dataset's splits) comes from `kardia_jax.rehearsal.stand_ins`.

Deterministic: the same arguments write the same bytes, hence the same commit ids (a commit id is a hash
of the snapshot's file listing), whichever process writes them. Writes are atomic (temp file + rename),
so seeding a cache that processes are reading, or seeding it twice, is safe. Seeding the paper's five
models and the dataset takes about a second once JAX is warm; the first `Decoder` init of a process
compiles its initialisers first (seconds). Call it before `jax.distributed.initialize`: `save_pretrained`
writes from JAX process 0 only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Mapping

# huggingface_hub is imported on first use: it reads HF_HUB_CACHE and HF_HUB_OFFLINE when it is
# imported, and a launcher importing this module may set them afterwards.
from kardia_jax.data.sources import sample_path, training_texts
from kardia_jax.rehearsal.stand_ins import TinySize, json_bytes, stand_in_dataset_files, stand_in_model_files

# Files the hub stores in git LFS (its default .gitattributes): their etag is the content's sha256.
LFS_SUFFIXES = (".safetensors", ".model")


@dataclasses.dataclass(frozen=True)
class SeededCache:
    """What `seed_cache` wrote: the cache directory and each hub id's snapshot directory."""

    cache_dir: str
    models: dict[str, str]
    datasets: dict[str, str]

    def env(self) -> dict[str, str]:
        """The environment a process needs to read this cache offline, set before huggingface_hub is
        imported (`huggingface_hub.constants` reads it at import)."""
        return {"HF_HUB_CACHE": self.cache_dir, "HF_HUB_OFFLINE": "1"}


# -- the cache layout ---------------------------------------------------------------------------------


def _write_atomic(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _symlink_atomic(target: str, link: str) -> None:
    if os.path.islink(link) and os.readlink(link) == target:
        return
    os.makedirs(os.path.dirname(link), exist_ok=True)
    tmp = os.path.join(os.path.dirname(link), f".tmp-{uuid.uuid4().hex}")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _tree_entry(path: str, data: bytes) -> tuple[str, dict]:
    """(etag, tree-listing entry) of one file, as the hub reports them."""
    from huggingface_hub.utils.sha import git_hash  # pylint: disable=import-outside-toplevel

    if not path.endswith(LFS_SUFFIXES):
        blob_id = git_hash(data)
        return blob_id, {"size": len(data), "blob_id": blob_id}
    sha256 = hashlib.sha256(data).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
    entry = {"size": len(data), "blob_id": git_hash(pointer), "lfs_sha256": sha256, "lfs_size": len(data)}
    return sha256, entry


def write_snapshot(cache_dir: str, repo_id: str, files: Mapping[str, bytes], *, repo_type: str = "model",
                   revision: str = "main") -> str:
    """Writes `files` (path in the repo -> bytes) as the `revision` snapshot of `repo_id` in the hub cache
    layout (see the module docstring) and returns the snapshot directory. The commit id is the sha1 of
    the file listing, so the same files give the same commit."""
    from huggingface_hub import constants  # pylint: disable=import-outside-toplevel
    from huggingface_hub.file_download import repo_folder_name  # pylint: disable=import-outside-toplevel
    from huggingface_hub.utils import validate_repo_id  # pylint: disable=import-outside-toplevel

    validate_repo_id(repo_id)
    repo_types = (constants.REPO_TYPE_MODEL, constants.REPO_TYPE_DATASET, constants.REPO_TYPE_SPACE)
    if repo_type not in repo_types:
        raise ValueError(f"write_snapshot: repo_type={repo_type!r}; expected one of {repo_types}.")
    storage = os.path.join(os.path.abspath(cache_dir), repo_folder_name(repo_id=repo_id, repo_type=repo_type))
    entries = {path: _tree_entry(path, files[path]) for path in sorted(files)}
    listing = {path: entry for path, (_, entry) in entries.items()}
    commit = hashlib.sha1(json.dumps(listing, sort_keys=True).encode()).hexdigest()
    snapshot = os.path.join(storage, "snapshots", commit)
    for path, (etag, _) in entries.items():
        blob = os.path.join(storage, "blobs", etag)
        if not os.path.isfile(blob):
            _write_atomic(blob, files[path])
        link = os.path.join(snapshot, path)
        _symlink_atomic(os.path.relpath(blob, os.path.dirname(link)), link)
    tree = {"format_version": 1, "files": listing}  # huggingface_hub._tree_cache's format
    _write_atomic(os.path.join(storage, "trees", f"{commit}.json"), json_bytes(tree))
    _write_atomic(os.path.join(storage, "refs", revision), commit.encode())
    return snapshot


def seed_cache(cache_dir: str, models: Mapping[str, TinySize], datasets: Mapping[str, str] | None = None, *,
               seed: int = 0, text_source: str | None = None, tokenizer_vocab: int = 1024) -> SeededCache:
    """Seeds the hub cache `cache_dir` with a stand-in for each model id and dataset id.

    Args:
      cache_dir: the hub cache directory (what HF_HUB_CACHE names; HF_HOME/hub). Created if needed.
      models: hub model id -> its stand-in's sizes, e.g. {"Qwen/Qwen2.5-7B-Instruct": TinySize()}.
      datasets: hub dataset id -> a directory with train.jsonl and test.jsonl to copy,
        e.g. {"Jhcircle/KardiaBench": kardia_jax.data.sources.sample_path()}.
      seed: the random weights' seed (each id also folds in its own name).
      text_source: the dialogues the tokenizers are trained on (`load_dialogues` source; default: the
        shipped sample); its train split is read.
      tokenizer_vocab: base vocabulary of the tokenizers (Qwen BPE without special tokens; Gemma
        SentencePiece pieces), a multiple of 64.

    Returns the snapshot directory of every id; `.env()` is the environment that reads the cache offline.
    """
    texts = training_texts(text_source or sample_path())
    written = {}
    for repo_id, size in models.items():
        files = stand_in_model_files(repo_id, size, seed=seed, texts=texts, tokenizer_vocab=tokenizer_vocab)
        written[repo_id] = write_snapshot(cache_dir, repo_id, files)
    data = {repo_id: write_snapshot(cache_dir, repo_id, stand_in_dataset_files(repo_id, data_dir), repo_type="dataset")
            for repo_id, data_dir in (datasets or {}).items()}
    return SeededCache(cache_dir=os.path.abspath(cache_dir), models=written, datasets=data)
