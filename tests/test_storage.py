"""kardia_jax.storage and everything that reads or writes a path through it, locally and on gs:// (the
session's GCS emulator, tests/conftest.py), and Hugging Face hub ids from a tiny seeded offline cache:
files and listings, atomic JSON, clear errors, tokenizers, data sources, metrics, the SFT export, GRPO's
start from it, Orbax checkpoints; and the emulator itself (it dies with its parent)."""

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import gcsfs
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from huggingface_hub.file_download import repo_folder_name
from jax.sharding import NamedSharding, PartitionSpec

from kardia_jax.models import loading
from kardia_jax import metrics, scaffold, storage
from kardia_jax.checkpoints import Checkpointer
from kardia_jax.config import base_config
from kardia_jax.data import sources
from kardia_jax.models import Decoder, from_pretrained, preset
from kardia_jax.models.tokenizer import load_tokenizer, tokenizer_path
from kardia_jax.sharding import make_mesh

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE_ROWS = (pathlib.Path(sources.sample_path()) / "train.jsonl").read_text().splitlines()[:3]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """gs:// copies go to a cache under tmp_path; the working directory is tmp_path, so a path mistaken
    for a local one (e.g. a directory named 'gs:') shows up there."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(params=["local", "gcs"])
def base(request, tmp_path):
    """A directory to work in: local, or a fresh gs:// prefix on the emulator."""
    return str(tmp_path / "base") if request.param == "local" else request.getfixturevalue("gcs_dir")


def _seed_hub_cache(cache: pathlib.Path, repo_id: str, files: dict[str, bytes], repo_type: str = "model") -> str:
    """A Hugging Face cache entry as snapshot_download leaves it: refs/main -> commit, the files under
    snapshots/<commit>/. Returns the snapshot directory."""
    folder = cache / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    return str(snapshot)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty HF hub cache that snapshot_download reads (HF_HUB_OFFLINE=1 comes from conftest)."""
    from huggingface_hub import constants  # pylint: disable=import-outside-toplevel

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _shipped_tokenizer_files() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in pathlib.Path(tokenizer_path()).iterdir()}


# -- files and directories ------------------------------------------------------------------------------


def test_files_and_directories(base, tmp_path):
    nested = os.path.join(base, "a", "b.txt")
    assert not storage.exists(nested) and not storage.isdir(base)
    storage.write_text(nested, "héllo")
    storage.write_bytes(os.path.join(base, "c.bin"), b"\x00\xff")
    assert storage.read_text(nested) == "héllo"
    assert storage.read_bytes(os.path.join(base, "c.bin")) == b"\x00\xff"
    assert storage.exists(nested) and storage.isfile(nested) and not storage.isdir(nested)
    assert storage.isdir(os.path.join(base, "a")) and not storage.isfile(os.path.join(base, "a"))
    assert storage.listdir(base) == ["a", "c.bin"]

    scaffold.write_json(os.path.join(base, "run", "results.json"), {"b": [1, 2], "a": None})
    assert scaffold.read_json(os.path.join(base, "run", "results.json")) == {"a": None, "b": [1, 2]}
    assert scaffold.read_json(os.path.join(base, "run", "absent.json")) is None
    assert storage.listdir(os.path.join(base, "run")) == ["results.json"]  # no temporary file left behind

    storage.remove_tree(os.path.join(base, "a"))
    storage.remove_tree(os.path.join(base, "never-there"))
    assert storage.listdir(base) == ["c.bin", "run"]
    assert not os.path.exists(tmp_path / "gs:")  # gs:// never became a local directory


def test_local_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    scaffold.write_json(str(path), {"step": 1})

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        scaffold.write_json(str(path), {"step": 2})
    assert json.loads(path.read_text()) == {"step": 1}  # the old file, whole
    assert os.listdir(tmp_path) == ["results.json"]  # and no temporary file


def test_listings_see_objects_other_hosts_wrote(gcs_dir, gcs_emulator):
    storage.write_text(f"{gcs_dir}/a.txt", "a")
    assert storage.listdir(gcs_dir) == ["a.txt"] and not storage.isdir(f"{gcs_dir}/hf")
    other_host = gcsfs.GCSFileSystem(token="anon", endpoint_url=gcs_emulator.url, skip_instance_cache=True)
    other_host.pipe(f"{gcs_dir}/hf/config.json", b"{}")
    assert storage.listdir(gcs_dir) == ["a.txt", "hf"]
    assert storage.isdir(f"{gcs_dir}/hf")


def test_missing_bucket_and_path_errors(gcs_emulator):
    for action in (lambda p: storage.read_text(p, key="workdir"), lambda p: storage.write_text(p, "x", key="workdir"),
                   lambda p: storage.listdir(p, key="workdir")):
        with pytest.raises(FileNotFoundError, match=r"config key workdir.*bucket gs://no-such-bucket-kardia does "
                                                    r"not exist.*Create it .*or fix the path"):
            action("gs://no-such-bucket-kardia/run/x.json")
    with pytest.raises(FileNotFoundError, match=r"gs://kardia-test/nothing/here\.json \(config key data\.source\) "
                                                r"does not exist\. Check the path") as error:
        storage.read_bytes("gs://kardia-test/nothing/here.json", key="data.source")
    assert "bucket" not in str(error.value)


def test_local_copy_follows_changes_in_the_bucket(gcs_dir):
    storage.write_text(f"{gcs_dir}/config.json", "{}")
    storage.write_text(f"{gcs_dir}/model-00001-of-00002.safetensors", "old shard")
    storage.write_text(f"{gcs_dir}/notes.md", "not asked for")
    local = storage.local_copy(gcs_dir, ["*.json", "*.safetensors"])
    assert sorted(os.listdir(local)) == ["config.json", "model-00001-of-00002.safetensors"]

    storage.remove_tree(f"{gcs_dir}/model-00001-of-00002.safetensors")
    storage.write_text(f"{gcs_dir}/model.safetensors", "new")
    storage.write_text(f"{gcs_dir}/config.json", '{"changed": true}')
    assert storage.local_copy(gcs_dir, ["*.json", "*.safetensors"]) == local
    assert sorted(os.listdir(local)) == ["config.json", "model.safetensors"]  # the stale shard is gone
    assert pathlib.Path(local, "config.json").read_text() == '{"changed": true}'
    with pytest.raises(FileNotFoundError, match=r"holds no files matching \['\*\.model'\]"):
        storage.local_copy(gcs_dir, ["*.model"], key="tokenizer.path")


# -- hub ids ------------------------------------------------------------------------------------------


def test_hub_ids_are_read_from_the_offline_cache_in_a_fresh_process(tmp_path):
    """HF_HUB_OFFLINE and HF_HOME are read when huggingface_hub is imported: a fresh process sees them."""
    snapshot = _seed_hub_cache(tmp_path / "home" / "hub", "kardia-test/tiny", {"config.json": b"{}"})
    script = textwrap.dedent("""
        from kardia_jax import storage
        print(storage.fetch_hf("kardia-test/tiny", ["*.json"], key="model.hf_path"))
        try:
            storage.fetch_hf("Qwen/Qwen2.5-7B-Instruct", ["*.json"], key="tokenizer.path")
        except FileNotFoundError as error:
            print(error)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True,
                         timeout=120).stdout.splitlines()
    assert out[0] == snapshot
    assert "Qwen/Qwen2.5-7B-Instruct (config key tokenizer.path) is not in the local Hugging Face cache" in out[1]
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in out[1] and "hf download Qwen/Qwen2.5-7B-Instruct" in out[1]


def test_tokenizer_from_hub_id_gcs_and_local(hub_cache, gcs_dir):
    shipped = load_tokenizer(tokenizer_path())
    _seed_hub_cache(hub_cache, "kardia-test/tokenizer", _shipped_tokenizer_files())
    storage.copy_dir_to(tokenizer_path(), f"{gcs_dir}/tok")
    for path in ("kardia-test/tokenizer", f"{gcs_dir}/tok"):
        tokenizer = load_tokenizer(path, key="tokenizer.path")
        assert tokenizer.vocab_size == shipped.vocab_size
        assert tokenizer.encode("<|emotion_begin|>sad") == shipped.encode("<|emotion_begin|>sad")
    with pytest.raises(FileNotFoundError, match=r"kardia-test/absent \(config key judge.tokenizer_path\) is not in"):
        load_tokenizer("kardia-test/absent", key="judge.tokenizer_path")


# -- data sources -------------------------------------------------------------------------------------


def test_gcs_data_source(gcs_dir):
    storage.write_text(f"{gcs_dir}/train.jsonl", "\n".join(SAMPLE_ROWS) + "\n")
    dialogues, stats = sources.load_dialogues(gcs_dir, "train")
    assert len(dialogues) == 3 and stats.source == f"{gcs_dir}/train.jsonl"
    assert len(sources.load_dialogues(f"{gcs_dir}/train.jsonl", "train")[0]) == 3
    with pytest.raises(FileNotFoundError, match=r"No test.jsonl or test.parquet in .*it holds: \['train.jsonl'\]"):
        sources.load_dialogues(gcs_dir, "test")
    with pytest.raises(FileNotFoundError, match=r"config key data.source.*does not exist"):
        sources.load_dialogues(f"{gcs_dir}/elsewhere", "train")


def test_hf_data_source_reads_the_dataset_snapshot(hub_cache):
    rows = SAMPLE_ROWS[:2] + ["{not json"] + SAMPLE_ROWS[2:]
    snapshot = _seed_hub_cache(hub_cache, "kardia-test/bench", {"test.jsonl": "\n".join(rows).encode()},
                               repo_type="dataset")
    dialogues, stats = sources.load_dialogues("hf://kardia-test/bench", "test", on_bad_row="skip")
    assert [d.emotion for d in dialogues] == [json.loads(r)["emotion"] for r in SAMPLE_ROWS]
    assert dialogues[2].dialogue_id == "test-000004"  # row numbers count the bad line
    assert stats.source == os.path.join(snapshot, "test.jsonl") and stats.skipped == {"bad_json": 1}
    with pytest.raises(FileNotFoundError, match="No train.jsonl or train.parquet in 'hf://kardia-test/bench'"):
        sources.load_dialogues("hf://kardia-test/bench", "train")
    with pytest.raises(FileNotFoundError, match=r"hub dataset kardia-test/other \(config key data.source\)"):
        sources.load_dialogues("hf://kardia-test/other", "train")


# -- metrics ------------------------------------------------------------------------------------------


def test_metrics_on_gcs_continue_after_a_resume_and_plot(gcs_dir, gcs_emulator, tmp_path):
    with metrics.MetricsLogger(gcs_dir) as logger:
        logger.log(1, {"reward/total": 0.25})
        logger.log(2, {"reward/total": 0.5})
    with metrics.MetricsLogger(gcs_dir, upload_interval_s=0) as logger:  # resumed: continues the file
        logger.log(3, {"reward/total": jnp.float32(0.75)})
        assert len(metrics.read_jsonl(f"{gcs_dir}/metrics.jsonl")) == 3  # uploaded by log, before close
    rows = metrics.read_jsonl(f"{gcs_dir}/metrics.jsonl")
    assert [(r["step"], r["reward/total"]) for r in rows] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    events = [line for line in gcs_emulator.listing(f"{gcs_dir}/tensorboard") if "events.out.tfevents" in line]
    assert len(events) == 2 and all(int(line.split()[0]) > 0 for line in events)  # one event file per run

    metrics.plot_curves(f"{gcs_dir}/metrics.jsonl", ["reward/total"], f"{gcs_dir}/plots/rewards.png")
    assert storage.read_bytes(f"{gcs_dir}/plots/rewards.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert not os.path.exists(tmp_path / "gs:")


# -- the SFT export and GRPO's start from it -------------------------------------------------------------


def _tiny_model():
    return Decoder(preset("tiny-qwen2", vocab_size=load_tokenizer(tokenizer_path()).vocab_size), rngs=nnx.Rngs(0))


def test_sft_export_to_gcs_is_published_whole_and_loads_back(gcs_dir, gcs_emulator):
    model, tokenizer = _tiny_model(), load_tokenizer(tokenizer_path())
    hf = f"{gcs_dir}/sft/hf"
    storage.write_text(f"{hf}/model-00001-of-00002.safetensors", "a stale shard of an older export")
    graphdef, params = nnx.split(model)
    loading.export_hf(graphdef, params, tokenizer, hf)

    names = storage.listdir(hf)
    assert storage.is_complete(hf) and storage.COMPLETE_MARKER in names
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    assert "model-00001-of-00002.safetensors" not in names
    loaded = from_pretrained(hf)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(loaded)),
                 nnx.to_pure_dict(nnx.state(model)))
    assert load_tokenizer(hf).encode("<|response_end|>") == tokenizer.encode("<|response_end|>")


def _grpo_config(workdir):
    c = base_config()
    c.workdir = workdir
    c.model.preset = "tiny-qwen2"
    c.tokenizer.path = "Qwen/Qwen2.5-7B-Instruct"  # as in the TPU configs: the base model's hub tokenizer
    return c


def test_grpo_starts_from_the_complete_sft_export_on_gcs_with_its_tokenizer(gcs_dir, tmp_path):
    config = _grpo_config(gcs_dir)
    hf = f"{gcs_dir}/sft/hf"
    storage.write_text(f"{hf}/config.json", "{}")  # an export still being written: no marker yet
    assert loading.grpo_start_config(config).model.preset == "tiny-qwen2"

    stage = tmp_path / "stage"
    stage.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (stage / name).write_text("{}")
    storage.publish_dir(str(stage), hf)
    started = loading.grpo_start_config(config)
    assert (started.model.hf_path, started.model.preset, started.tokenizer.path) == (hf, "", hf)
    assert config.tokenizer.path == "Qwen/Qwen2.5-7B-Instruct"  # the caller's config is left alone


def test_grpo_init_from_a_hub_id_keeps_the_configured_tokenizer(tmp_path):
    config = _grpo_config(str(tmp_path / "run"))
    config.grpo.init_from = "kardia-test/policy"
    started = loading.grpo_start_config(config)
    assert (started.model.hf_path, started.tokenizer.path) == ("kardia-test/policy", "Qwen/Qwen2.5-7B-Instruct")


# -- Orbax checkpoints --------------------------------------------------------------------------------


def test_checkpointer_saves_and_restores_on_gcs(gcs_dir):
    mesh = make_mesh(fsdp=4, tensor=2)
    kernel = jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8)
    params = {"kernel": jax.device_put(kernel, NamedSharding(mesh, PartitionSpec("fsdp", "tensor"))),
              "bias": jax.device_put(jnp.linspace(-1, 1, 8), NamedSharding(mesh, PartitionSpec()))}
    opt_state = optax.adamw(1e-2).init(params)
    abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

    with Checkpointer(f"{gcs_dir}/sft", max_to_keep=2) as ckpt:
        iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
        for step in (1, 2, 3):
            next(iterator)
            ckpt.save(step, params, opt_state, data_iterator=iterator, rng=jax.random.key(step),
                      metadata={"model": "tiny"}, force=True)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [2, 3]
    assert storage.listdir(f"{gcs_dir}/sft") == ["2", "3"]

    with Checkpointer(f"{gcs_dir}/sft") as ckpt:  # a new process's view: what is on the bucket
        resumed = iter(grain.MapDataset.range(10).to_iter_dataset())
        restored = ckpt.restore_latest(abstract(params), abstract(opt_state), data_iterator=resumed)
    assert restored.step == 3 and next(resumed) == 3  # the iterator continues after the 3 items read
    assert restored.metadata == {"model": "tiny"}
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(jax.random.key(3)))
    jax.tree.map(np.testing.assert_array_equal, restored.params, params)
    jax.tree.map(np.testing.assert_array_equal, restored.opt_state, opt_state)
    assert restored.params["kernel"].sharding == params["kernel"].sharding


# -- the emulator ---------------------------------------------------------------------------------------


def test_emulator_lists_objects_and_dies_with_its_parent(gcs_dir, gcs_emulator, tmp_path):
    storage.write_text(f"{gcs_dir}/x/y.json", "{}")
    assert gcs_emulator.listing(gcs_dir) == [f"{2:>12}  {gcs_dir}/x/y.json"]

    parent = subprocess.Popen(
        [sys.executable, "-c", "from kardia_jax.rehearsal import gcs\nimport sys, time\n"
         "with gcs.emulator(('kardia-orphan',)) as e:\n    print(e.url, flush=True)\n    time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    url = parent.stdout.readline().strip()
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.read() == b"OK"
    parent.send_signal(signal.SIGKILL)  # no clean exit: the emulator must notice by itself
    parent.wait()
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1).close()
        except (urllib.error.URLError, ConnectionError):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the emulator at {url} still answers after its parent died")
