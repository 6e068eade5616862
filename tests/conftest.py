"""Test set-up: 8 fake CPU devices (for the sharding tests) and float32 everywhere.

XLA_FLAGS must be set before JAX is imported anywhere, which is why it lives here.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# gcsfs reads this at import: its default filesystem asks a Storage Control gRPC API, which the GCS
# emulator lacks, about each bucket (see kardia_jax/rehearsal/gcs.py). Set before anything imports gcsfs.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import itertools  # noqa: E402

import pytest  # noqa: E402

GCS_BUCKET = "kardia-test"
_gcs_dirs = itertools.count()


@pytest.fixture(scope="session")
def gcs_emulator():
    """A GCS emulator for the whole session (bucket `kardia-test`); gs:// reaches it while it runs."""
    from kardia_jax.rehearsal import gcs  # pylint: disable=import-outside-toplevel

    with gcs.emulator(buckets=(GCS_BUCKET,)) as emulator:
        yield emulator


@pytest.fixture
def gcs_dir(gcs_emulator, request):
    """A fresh `gs://kardia-test/<n>-<test name>` prefix on the session's emulator (nothing under it yet)."""
    del gcs_emulator
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]
    return f"gs://{GCS_BUCKET}/{next(_gcs_dirs)}-{name}"


@pytest.fixture(scope="session")
def tokenizer():
    """The shipped tokenizer (kardia_jax/assets/tokenizer), loaded once per session."""
    from kardia_jax.models.tokenizer import load_tokenizer, tokenizer_path  # pylint: disable=import-outside-toplevel

    return load_tokenizer(tokenizer_path())


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """name -> (torch model, checkpoint dir) of the tiny HF models in helpers_models.MODELS, each built
    lazily once per session (seeded by its place in MODELS, whichever test asks first). Tests read
    them and never write to the checkpoint dirs."""
    from helpers_hf import make_hf_model  # pylint: disable=import-outside-toplevel
    from helpers_models import MODELS  # pylint: disable=import-outside-toplevel

    root = tmp_path_factory.mktemp("hf_models")
    cache = {}

    def get(name):
        if name not in cache:
            family, overrides = MODELS[name]
            cache[name] = make_hf_model(family, root, seed=list(MODELS).index(name), **overrides)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def padded_batch():
    """(tokens, mask) [3, 12] of vocabulary 256, left-padded to helpers_models.LENGTHS."""
    from helpers_hf import left_padded_batch  # pylint: disable=import-outside-toplevel
    from helpers_models import LENGTHS, T  # pylint: disable=import-outside-toplevel

    tokens, mask = left_padded_batch(256, LENGTHS, T, seed=1)
    return tokens, mask
