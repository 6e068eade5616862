"""One way to read and write a path, used everywhere: a local path or `gs://bucket/...`, and (read-only)
a Hugging Face hub id.

Everything goes through `etils.epath`, the path library Orbax uses: local paths through `os`, `gs://`
through fsspec's `gcsfs` (epath picks `tf.io.gfile` instead when TensorFlow is installed; both work).

    storage.write_text("gs://bucket/run/sft/results.json", text)   # atomic: no reader sees half of it
    storage.read_text(path, key="data.source")                      # errors name the config key
    storage.listdir(path) / exists / isdir / isfile / read_bytes / write_bytes / remove_tree
    storage.local_copy("gs://bucket/ckpt", ["*.json"])            # a local directory, for libraries
                                                                    # that need one (safetensors, ...)
    storage.fetch_hf("Qwen/Qwen2.5-7B-Instruct", ["*.json"], key="tokenizer.path")   # hub id, gs://, dir
    storage.copy_dir_to(local_dir, "gs://bucket/out")               # upload a directory
    storage.publish_dir(staged_dir, "gs://bucket/run/sft/hf")       # ... so that no reader sees half of it

Object stores in brief: an object upload is atomic (it appears whole or not at all), but objects cannot
be appended to or renamed, and a "directory" is only a name prefix: it exists while an object lies
under it. `publish_dir` therefore marks a completed directory with a `_COMPLETE` object on `gs://`
(`is_complete` checks it); locally it renames a staged sibling into place.

`gs://` copies for local libraries are cached under `$XDG_CACHE_HOME/kardia_jax/gcs/<bucket>/<path>`
(default `~/.cache`); a file is downloaded again when its size or modification time differs, and
cached files no longer in the bucket are removed. Each file is downloaded to a temporary name and
renamed, so processes on one host may share the cache.

gcsfs caches directory listings for ever by default, so a host would not see objects that another host
wrote after its first listing (Orbax's step directories, `sft/hf`). Importing this module turns that
cache off for the process (fsspec's `gcs` config), which matches `tf.io.gfile`. Import it before
anything lists `gs://` (kardia_jax.checkpoints does).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import fsspec.config
from etils import epath

COMPLETE_MARKER = "_COMPLETE"  # the last object `publish_dir` writes into a gs:// directory
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name

fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


# -- what a path is ------------------------------------------------------------------------------


def is_gcs(path: str | os.PathLike) -> bool:
    return os.fspath(path).startswith("gs://")


def is_hub_id(path: str) -> bool:
    """Whether `path` names a Hugging Face hub repository (`org/name`) rather than a local path."""
    return bool(_HUB_ID.match(path)) and not os.path.exists(path)


def absolute(path: str | os.PathLike) -> str:
    """`gs://...` as is; a local path made absolute."""
    path = os.fspath(path)
    return path if is_gcs(path) else os.path.abspath(path)


def _where(key: str) -> str:
    return f" (config key {key})" if key else ""


def _bucket(path: str) -> str:
    return path[len("gs://"):].split("/", 1)[0]


def missing_error(path: str, key: str = "", hint: str = "Check the path.") -> FileNotFoundError:
    """The error for a path that does not exist: on gs:// it says whether the bucket itself is missing."""
    path = os.fspath(path)
    if is_gcs(path) and not epath.Path(f"gs://{_bucket(path)}").exists():
        return FileNotFoundError(
            f"{path}{_where(key)}: the bucket gs://{_bucket(path)} does not exist, or these credentials cannot "
            f"see it. Create it (gcloud storage buckets create gs://{_bucket(path)}) or fix the path."
        )
    return FileNotFoundError(f"{path}{_where(key)} does not exist. {hint}")


# -- files and directories -----------------------------------------------------------------------


def exists(path: str | os.PathLike) -> bool:
    return epath.Path(path).exists()


def isdir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory (on gs://: whether any object lies under the prefix)."""
    return epath.Path(path).is_dir()


def isfile(path: str | os.PathLike) -> bool:
    return epath.Path(path).is_file()


def listdir(path: str | os.PathLike, key: str = "") -> list[str]:
    """The names directly inside the directory `path`, sorted."""
    try:
        return sorted(p.name for p in epath.Path(path).iterdir())
    except (FileNotFoundError, NotADirectoryError) as error:
        raise missing_error(os.fspath(path), key, "Give a directory.") from error


def read_bytes(path: str | os.PathLike, key: str = "") -> bytes:
    try:
        return epath.Path(path).read_bytes()
    except FileNotFoundError as error:
        raise missing_error(os.fspath(path), key) from error


def read_text(path: str | os.PathLike, key: str = "") -> str:
    return read_bytes(path, key).decode("utf-8")


def write_bytes(path: str | os.PathLike, data: bytes, key: str = "") -> None:
    """Writes `data` to `path` atomically: a reader sees the old contents or the new, never a part.

    Locally: a temporary file in the same directory (created if missing), then a rename. On gs://: one
    object upload, which is atomic by itself.
    """
    path = os.fspath(path)
    if is_gcs(path):
        try:
            epath.Path(path).write_bytes(data)
        except FileNotFoundError as error:
            raise missing_error(path, key) from error
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str, key: str = "") -> None:
    """`write_bytes` of `text` in UTF-8."""
    write_bytes(path, text.encode("utf-8"), key)


def remove_tree(path: str | os.PathLike) -> None:
    """Deletes the file or directory `path` and everything under it; nothing if it does not exist."""
    target = epath.Path(path)
    if target.is_dir():
        target.rmtree()
    elif target.exists():
        target.unlink()


def _files_under(root: epath.Path, prefix: str = "") -> Iterator[tuple[str, epath.Path]]:
    """(path relative to `root` with '/', path) of every file under the directory `root`, recursively."""
    for child in root.iterdir():
        relative = f"{prefix}{child.name}"
        if child.is_dir():
            yield from _files_under(child, relative + "/")
        else:
            yield relative, child


def _matches(relative: str, patterns: Sequence[str] | None) -> bool:
    """fnmatch on the relative path, as Hugging Face's allow_patterns (`*` also matches '/')."""
    return patterns is None or any(fnmatch.fnmatch(relative, p) for p in patterns)


def copy_dir_to(local_dir: str, uri: str) -> None:
    """Copies every file under the local directory `local_dir` to the same relative path under `uri`
    (local or gs://), overwriting files there; files only at `uri` are left alone."""
    local_root = epath.Path(local_dir)
    for relative, source in _files_under(local_root):
        target = epath.Path(uri) / relative
        if not is_gcs(uri):
            target.parent.mkdir(parents=True, exist_ok=True)
        try:
            source.copy(target, overwrite=True)
        except FileNotFoundError as error:
            raise missing_error(uri) from error


def _cache_root() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kardia_jax", "gcs")


def local_copy(uri: str, patterns: Sequence[str] | None = None, key: str = "") -> str:
    """A local directory holding the files of the directory `uri` whose relative paths match `patterns`
    (fnmatch; None: all). A local directory is returned as is; a gs:// one is synced into the cache
    (see the module docstring). Raises FileNotFoundError naming `key` if there is nothing to copy."""
    if not is_gcs(uri):
        if not os.path.isdir(uri):
            raise missing_error(uri, key, "Give a directory.")
        return uri
    if not isdir(uri):
        raise missing_error(uri, key, "Give a directory.")
    found = dict(_files_under(epath.Path(uri)))
    remote = {rel: p for rel, p in found.items() if _matches(rel, patterns)}
    if not remote:
        raise FileNotFoundError(f"{uri}{_where(key)} holds no files matching {list(patterns)} (it holds "
                                f"{sorted(found)}). Check the path.")
    local = os.path.join(_cache_root(), uri[len("gs://"):].rstrip("/"))
    for relative, source in remote.items():
        target = os.path.join(local, relative)
        stat = source.stat()
        if os.path.isfile(target) and os.path.getsize(target) == stat.length and int(os.path.getmtime(target)) == stat.mtime:
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}.", suffix=".tmp")
        os.close(fd)
        source.copy(tmp, overwrite=True)
        os.utime(tmp, (stat.mtime, stat.mtime))
        os.replace(tmp, target)
    for root, _, names in os.walk(local):  # cached files the bucket no longer has (e.g. old shards)
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), local).replace(os.sep, "/")
            if relative not in remote and _matches(relative, patterns) and not name.endswith(".tmp"):
                os.remove(os.path.join(root, name))
    return local


def publish_dir(staged_dir: str, uri: str) -> None:
    """Makes the finished local directory `staged_dir` the directory `uri`, replacing what was there, so
    that a reader checking `is_complete(uri)` never sees a half-written one.

    Local `uri`: the old directory is deleted and `staged_dir` renamed to `uri` (stage it on the same
    filesystem, e.g. as the sibling `<uri>.tmp`). gs:// `uri`: the `_COMPLETE` marker is deleted first,
    then the old objects, the files are uploaded, and the marker is written last; `staged_dir` is deleted.
    """
    if not is_gcs(uri):
        if os.path.exists(uri):
            shutil.rmtree(uri)
        os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
        os.replace(staged_dir, uri)
        return
    marker = epath.Path(uri) / COMPLETE_MARKER
    if marker.exists():
        marker.unlink()
    remove_tree(uri)
    copy_dir_to(staged_dir, uri)
    write_text(marker, "")
    shutil.rmtree(staged_dir)


def is_complete(uri: str) -> bool:
    """Whether `publish_dir` finished writing `uri` (locally: the directory exists, since it appears by
    a rename; on gs://: its `_COMPLETE` marker exists)."""
    if is_gcs(uri):
        return exists(epath.Path(uri) / COMPLETE_MARKER)
    return os.path.isdir(uri)


# -- Hugging Face hub ids ------------------------------------------------------------------------


def fetch_hf(path_or_id: str, patterns: Sequence[str] | None = None, repo_type: str = "model", key: str = "") -> str:
    """A local directory with the files of `path_or_id` that match `patterns` (fnmatch; None: all):

      * a local path: returned as is;
      * `gs://bucket/dir`: `local_copy` (cached);
      * a hub id `org/name`: `huggingface_hub.snapshot_download(repo_type=...)` into the HF cache; with
        HF_HUB_OFFLINE=1 it reads only that cache.

    Errors name `key` (the config key that gave the path) and say how to fix it.
    """
    if is_gcs(path_or_id):
        return local_copy(path_or_id, patterns, key)
    if os.path.exists(path_or_id):
        return path_or_id
    if not is_hub_id(path_or_id):
        raise FileNotFoundError(
            f"{path_or_id!r}{_where(key)} is neither a local path, a gs:// path nor a Hugging Face hub id "
            "(org/name). Check the path.")
    import huggingface_hub  # pylint: disable=import-outside-toplevel
    from huggingface_hub import constants, errors  # pylint: disable=import-outside-toplevel

    kind = "dataset" if repo_type == "dataset" else "model"
    try:
        return huggingface_hub.snapshot_download(path_or_id, repo_type=repo_type,
                                                 allow_patterns=list(patterns) if patterns else None)
    except errors.GatedRepoError as error:
        raise PermissionError(
            f"The hub {kind} {path_or_id}{_where(key)} is gated: accept its terms on "
            f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{path_or_id}, then log in "
            "(`hf auth login` or HF_TOKEN).") from error
    except errors.RepositoryNotFoundError as error:
        raise FileNotFoundError(
            f"The hub {kind} {path_or_id}{_where(key)} does not exist, or is private and this machine is not "
            "logged in (nor is there a local directory of that name). Check the id, or log in (`hf auth login` "
            "or HF_TOKEN).") from error
    except errors.LocalEntryNotFoundError as error:
        offline = constants.is_offline_mode()
        raise FileNotFoundError(
            f"The hub {kind} {path_or_id}{_where(key)} is not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and "
            + ("HF_HUB_OFFLINE=1 forbids downloading it. Pre-download it on a machine with access "
               f"(`hf download {'--repo-type dataset ' if kind == 'dataset' else ''}{path_or_id}`, into the "
               "same HF_HOME), or unset HF_HUB_OFFLINE." if offline else
               "the hub could not be reached. Check the network or pre-download it into the HF cache "
               "and set HF_HUB_OFFLINE=1.")
            + f" (A local directory of that name does not exist either.) [{error}]") from error
