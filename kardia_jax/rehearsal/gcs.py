"""A local Google Cloud Storage for the pod rehearsal and the tests: `gcp-storage-emulator` on loopback.

    with gcs.emulator(buckets=("kardia",)) as emu:
        ...  # gs://kardia/... now reaches the emulator, in this process and in children given emu.env
        print("\\n".join(emu.listing("gs://kardia")))

`emulator()` starts the emulator as a child process on 127.0.0.1 and a free port (in memory, nothing
on disk), waits until it answers, creates the buckets, puts `env` into `os.environ` for the duration
(and restores it after), and stops the server on exit. The child also stops by itself when this
process dies: it serves until its stdin, a pipe held only by this process, reaches end of file.

What each client needs to reach it (all in `Emulator.env`; pass it to child processes):

    STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT   google-cloud-storage (Orbax asks it whether a bucket
                                                  has a hierarchical namespace) and gcsfs (etils.epath's
                                                  gs:// backend: kardia_jax.storage, Orbax's JSON items)
    FSSPEC_GCS_TOKEN=anon                         gcsfs: no credentials (else it tries the machine's
                                                  Google credentials and the GCE metadata server first)
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false       gcsfs 2026.x asks the Storage Control gRPC API for each
                                                  bucket's layout on every open(); the emulator has no
                                                  gRPC API, so each open would wait 60 s for a timeout
    TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT  tensorstore (Orbax's arrays): the endpoint, scheme
                                                  included; read once per process, at its first gs:// use
    GOOGLE_AUTH_TOKEN_FOR_TESTING=emulator        tensorstore: a fixed bearer token instead of looking
                                                  for Google credentials (the emulator checks none)

One fix to the emulator itself (`_add_generation_headers`): its media downloads lacked the
`x-goog-generation` header that real GCS sends, which broke tensorstore's conditional writes (Orbax's
array saves). It still ignores `ifGenerationMatch` preconditions, so it never reports a write conflict:
tensorstore's optimistic concurrency is not exercised (Orbax gives each process its own OCDBT files).

Environment variables read at import or first use (fsspec's FSSPEC_*, tensorstore's) only take effect
in this process if `emulator()` is entered before anything touches `gs://`; `FSSPEC_GCS_TOKEN` is also
applied to fsspec's live config. Child processes started with `env` get everything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence

HOST = "127.0.0.1"
_READY = "kardia-gcs-emulator-port "  # the child's first stdout line: this prefix and the port


@dataclasses.dataclass(frozen=True)
class Emulator:
    """A running emulator: its URL and the environment that points every client at it."""

    url: str  # http://127.0.0.1:PORT
    env: dict[str, str]

    def listing(self, uri: str) -> list[str]:
        """Every object under `uri` (gs://bucket[/prefix]), as `<size>  gs://bucket/name` lines, sorted:
        what `gsutil ls -lr` shows, for the rehearsal's report."""
        import gcsfs  # pylint: disable=import-outside-toplevel

        fs = gcsfs.GCSFileSystem(token="anon", endpoint_url=self.url, use_listings_cache=False)
        found = fs.find(uri, detail=True)
        return [f"{info['size']:>12}  gs://{name}" for name, info in sorted(found.items())]


def client_env(url: str) -> dict[str, str]:
    """The environment variables that point google-cloud-storage, gcsfs and tensorstore at `url`."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "FSSPEC_GCS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    }


@contextlib.contextmanager
def emulator(buckets: Sequence[str] = ("kardia",), *, timeout_s: float = 30.0) -> Iterator[Emulator]:
    """Runs gcp-storage-emulator (in memory) with `buckets` created; see the module docstring."""
    process = subprocess.Popen(
        [sys.executable, "-m", "kardia_jax.rehearsal.gcs"],
        # stderr: the emulator's tracebacks when a client hangs up early (harmless BrokenPipeErrors).
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        port = _wait_for_port(process, timeout_s)
        url = f"http://{HOST}:{port}"
        _wait_until_answering(url, timeout_s)
        for bucket in buckets:
            create_bucket(url, bucket)
        env = client_env(url)
        with _patched_environ(env):
            yield Emulator(url=url, env=env)
    finally:
        process.stdin.close()  # the child's signal to stop
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def create_bucket(url: str, bucket: str) -> None:
    """Creates `bucket` on the emulator at `url` (JSON API `buckets.insert`)."""
    request = urllib.request.Request(f"{url}/storage/v1/b?project=kardia-rehearsal", method="POST",
                                     data=json.dumps({"name": bucket}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def _wait_for_port(process: subprocess.Popen, timeout_s: float) -> int:
    line = process.stdout.readline()  # the child prints its port once bound, or exits
    if not line.startswith(_READY):
        process.wait(timeout=timeout_s)
        raise RuntimeError(f"gcp-storage-emulator did not start (exit code {process.returncode}, said "
                           f"{line!r}); is it installed? pip install -e \".[rehearse]\"")
    return int(line[len(_READY):])


def _wait_until_answering(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # the emulator's health check
                response.read()
            return
        except (urllib.error.URLError, ConnectionError) as error:
            if time.monotonic() > deadline:
                raise RuntimeError(f"gcp-storage-emulator at {url} did not answer within {timeout_s} s.") from error
            time.sleep(0.1)


@contextlib.contextmanager
def _patched_environ(env: dict[str, str]) -> Iterator[None]:
    """`env` in os.environ (and FSSPEC_GCS_TOKEN in fsspec's live config) until exit, then the old values."""
    import fsspec.config  # pylint: disable=import-outside-toplevel

    saved_env = {key: os.environ.get(key) for key in env}
    gcs_conf = fsspec.config.conf.setdefault("gcs", {})
    saved_token = gcs_conf.get("token")
    os.environ.update(env)
    gcs_conf["token"] = env["FSSPEC_GCS_TOKEN"]
    try:
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if saved_token is None:
            gcs_conf.pop("token", None)
        else:
            gcs_conf["token"] = saved_token


def _add_generation_headers() -> None:
    """Makes the emulator's media downloads carry `x-goog-generation` / `x-goog-metageneration`, as real
    GCS's do. Without them tensorstore reads every object as generation 0 and refuses its next
    conditional write ("Malformed StorageGeneration"), e.g. OCDBT's manifest update in an Orbax save.
    Must run before `gcp_storage_emulator.server` is imported: its route table holds `objects.download`."""
    from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=import-outside-toplevel
    from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel

    plain_download = objects.download

    def download(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj["metageneration"]
        except NotFound:
            pass  # plain_download answers 404
        plain_download(request, response, storage, *args, **kwargs)

    objects.download = download  # also what objects.get calls for ?alt=media


def _serve() -> None:
    """The child: serves on 127.0.0.1 and a free port until stdin closes (the parent exited or died)."""
    import logging  # pylint: disable=import-outside-toplevel

    _add_generation_headers()
    from gcp_storage_emulator.server import create_server  # pylint: disable=import-outside-toplevel

    logging.getLogger().setLevel(logging.CRITICAL)  # the emulator logs every request at DEBUG
    server = create_server(HOST, 0, in_memory=True)  # port 0: the OS picks a free one
    server.start()
    port = server._api._httpd.server_address[1]  # pylint: disable=protected-access  # (no public getter)
    print(f"{_READY}{port}", flush=True)
    try:
        sys.stdin.read()  # blocks until the parent closes the pipe or dies
    finally:
        server.stop()


if __name__ == "__main__":
    _serve()
