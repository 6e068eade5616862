"""The rehearsal's seeded hub cache: the layout huggingface_hub reads offline, transformers and kardia_jax
loading each stand-in by hub id, the families' tokenizers and chat formats, and the dataset.

huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE when it is imported, so the in-process tests patch
`huggingface_hub.constants` (as huggingface_hub's own tests do; transformers reads the same attributes at
call time); `test_env_alone_reads_the_cache_in_a_fresh_process` checks the environment contract itself.
"""

import hashlib
import json
import os
import subprocess
import sys

import huggingface_hub
import jinja2
import numpy as np
import pytest
import transformers
from huggingface_hub import constants
from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError
from huggingface_hub.utils.sha import git_hash

from kardia_jax.data.sources import sample_path
from kardia_jax.spans import MARKER_TOKENS
from kardia_jax.models import from_pretrained, positions_from_mask, to_hf_config
from kardia_jax.data.sources import training_texts
from kardia_jax.models.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from kardia_jax.rehearsal import hub, stand_ins
from kardia_jax.rewards.judge_prompts import same_vocabulary

# hub id -> (family, num_kv_heads of the 4-head stand-in, tie_word_embeddings), from the real models.
MODELS = {
    "Qwen/Qwen2.5-3B-Instruct": ("qwen2", 2, True),
    "Qwen/Qwen2.5-7B-Instruct": ("qwen2", 2, False),
    "Qwen/Qwen3-8B": ("qwen3", 2, False),
    "google/gemma-2b-it": ("gemma", 1, True),  # multi-query
    "google/gemma-7b-it": ("gemma", 4, True),  # multi-head
}
DATASET = "Jhcircle/KardiaBench"
CHAT = [
    {"role": "system", "content": "Profile: INFJ.\nSituation: a move."},
    {"role": "user", "content": "I moved to a new city."},
    {"role": "assistant",
     "content": "<|emotion_begin|>lonely<|emotion_end|><|response_begin|>A big change.<|response_end|>"},
    {"role": "user", "content": "Yes, it is quiet."},
]
CHATML = ("<|im_start|>system\nProfile: INFJ.\nSituation: a move.<|im_end|>\n"
          "<|im_start|>user\nI moved to a new city.<|im_end|>\n"
          f"<|im_start|>assistant\n{CHAT[2]['content']}<|im_end|>\n"
          "<|im_start|>user\nYes, it is quiet.<|im_end|>\n"
          "<|im_start|>assistant\n")
GEMMA = ("<bos><start_of_turn>user\nProfile: INFJ.\nSituation: a move.\n\nI moved to a new city.<end_of_turn>\n"
         f"<start_of_turn>model\n{CHAT[2]['content']}<end_of_turn>\n"
         "<start_of_turn>user\nYes, it is quiet.<end_of_turn>\n"
         "<start_of_turn>model\n")


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    cache_dir = str(tmp_path_factory.mktemp("hf_cache"))
    return hub.seed_cache(cache_dir, {repo_id: stand_ins.TinySize() for repo_id in MODELS}, {DATASET: sample_path()})


@pytest.fixture(autouse=True)
def offline(monkeypatch, seeded):
    """This process reads the seeded cache, offline."""
    for key, value in seeded.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", seeded.cache_dir)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _files(directory):
    return sorted(os.path.relpath(os.path.join(root, n), directory) for root, _, names in os.walk(directory) for n in names)


# -- the cache layout ----------------------------------------------------------------------------------


def test_layout_is_a_valid_hub_cache(seeded):
    info = huggingface_hub.scan_cache_dir(seeded.cache_dir)
    assert info.warnings == []  # scan_cache_dir reports any repo whose layout it does not recognise
    repos = {(r.repo_type, r.repo_id): r for r in info.repos}
    assert set(repos) == {("model", m) for m in MODELS} | {("dataset", DATASET)}
    for (repo_type, repo_id), repo in repos.items():
        (revision,) = repo.revisions
        snapshot = (seeded.models if repo_type == "model" else seeded.datasets)[repo_id]
        assert revision.refs == {"main"} and str(revision.snapshot_path) == snapshot
        ref = os.path.join(repo.repo_path, "refs", "main")
        assert open(ref).read() == revision.commit_hash and len(revision.commit_hash) == 40
        for file in revision.files:
            link = os.path.join(snapshot, file.file_name)
            assert os.path.islink(link) and not os.path.isabs(os.readlink(link))
            data = open(link, "rb").read()
            lfs = file.file_name.endswith((".safetensors", ".model"))
            assert file.blob_path.name == (hashlib.sha256(data).hexdigest() if lfs else git_hash(data))
        # The commit's tree listing, which offline snapshot_download checks the snapshot against.
        tree = huggingface_hub.get_cached_repo_tree(repo_id, repo_type=repo_type)
        assert sorted(f.path for f in tree) == sorted(f.file_name for f in revision.files)


def test_write_snapshot_commits_by_content_and_offline_reads_check_completeness(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    files = {"config.json": b"{}", "sub/weights.safetensors": b"\x00" * 8}
    first = hub.write_snapshot(str(tmp_path), "org/repo", files)
    assert hub.write_snapshot(str(tmp_path), "org/repo", files) == first  # same files: same commit, idempotent
    assert huggingface_hub.snapshot_download("org/repo") == first
    assert open(huggingface_hub.hf_hub_download("org/repo", "sub/weights.safetensors"), "rb").read() == b"\x00" * 8

    second = hub.write_snapshot(str(tmp_path), "org/repo", files | {"config.json": b'{"a": 1}'})
    assert second != first and huggingface_hub.snapshot_download("org/repo") == second  # refs/main moved
    assert huggingface_hub.snapshot_download("org/repo", revision=os.path.basename(first)) == first

    os.remove(os.path.join(second, "sub", "weights.safetensors"))
    with pytest.raises(IncompleteSnapshotError, match="weights.safetensors"):
        huggingface_hub.snapshot_download("org/repo")
    assert huggingface_hub.snapshot_download("org/repo", allow_patterns=["*.json"]) == second


def test_same_arguments_write_the_same_commits(seeded, tmp_path):
    tiny = stand_ins.TinySize()
    again = hub.seed_cache(str(tmp_path), {"google/gemma-2b-it": tiny, "Qwen/Qwen3-8B": tiny}, {DATASET: sample_path()})
    for repo_id, snapshot in again.models.items():
        assert os.path.basename(snapshot) == os.path.basename(seeded.models[repo_id])
    assert os.path.basename(again.datasets[DATASET]) == os.path.basename(seeded.datasets[DATASET])
    other = hub.seed_cache(str(tmp_path), {"Qwen/Qwen3-8B": stand_ins.TinySize()}, seed=1)
    assert os.path.basename(other.models["Qwen/Qwen3-8B"]) != os.path.basename(seeded.models["Qwen/Qwen3-8B"])


# -- resolving by hub id, offline ----------------------------------------------------------------------


@pytest.mark.parametrize("repo_id", list(MODELS))
def test_snapshot_download_returns_the_seeded_model(seeded, repo_id):
    snapshot = huggingface_hub.snapshot_download(repo_id)
    assert snapshot == seeded.models[repo_id]
    expected = ["README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json"]
    if MODELS[repo_id][0] == "gemma":
        expected.append("tokenizer.model")
    assert _files(snapshot) == sorted(expected)


def test_snapshot_download_returns_the_seeded_dataset(seeded):
    snapshot = huggingface_hub.snapshot_download(DATASET, repo_type="dataset")
    assert snapshot == seeded.datasets[DATASET]
    assert _files(snapshot) == ["README.md", "test.jsonl", "train.jsonl"]
    for split in ("train", "test"):
        with open(os.path.join(snapshot, f"{split}.jsonl"), "rb") as copy:
            with open(os.path.join(sample_path(), f"{split}.jsonl"), "rb") as original:
                assert copy.read() == original.read()
    card = open(os.path.join(snapshot, "README.md")).read()
    assert "stand-in" in card and "path: train.jsonl" in card


def test_an_id_not_seeded_fails_with_huggingface_hubs_error():
    with pytest.raises(LocalEntryNotFoundError):
        huggingface_hub.snapshot_download("Qwen/Qwen2.5-0.5B-Instruct")
    with pytest.raises(LocalEntryNotFoundError):
        huggingface_hub.snapshot_download("Jhcircle/KadiaBench", repo_type="dataset")
    with pytest.raises(FileNotFoundError, match=r"Qwen/Qwen2\.5-0\.5B-Instruct .*HF_HUB_OFFLINE=1"):
        from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")  # kardia_jax's hub-id path: its error names the id
    with pytest.raises(OSError, match="couldn't find them in the cached files"):  # it does not name the id
        transformers.AutoConfig.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")


@pytest.mark.parametrize("repo_id", list(MODELS))
def test_transformers_loads_the_stand_in_and_its_logits_equal_kardia_jaxs(seeded, repo_id):
    import torch  # pylint: disable=import-outside-toplevel

    family, kv_heads, tied = MODELS[repo_id]
    config = transformers.AutoConfig.from_pretrained(repo_id)
    assert (config.model_type, config.num_key_value_heads, config.tie_word_embeddings) == (family, kv_heads, tied)
    tokenizer = transformers.AutoTokenizer.from_pretrained(repo_id)
    assert type(tokenizer).__name__ == ("GemmaTokenizer" if family == "gemma" else "Qwen2Tokenizer")
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(repo_id, dtype=torch.float32,
                                                                    attn_implementation="eager").eval()
    model = from_pretrained(seeded.models[repo_id])
    written = json.load(open(os.path.join(seeded.models[repo_id], "config.json")))
    assert to_hf_config(model.config) == {k: v for k, v in written.items() if not k.endswith("_token_id")}
    assert from_pretrained(repo_id).config == model.config  # kardia_jax's own hub-id path
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tokenizer)

    chats = [CHAT[1:2], CHAT[1:]] if family == "gemma" else [CHAT[:2], CHAT]  # Gemma has no system role
    rows = [tokenizer.apply_chat_template(c, tokenize=True, add_generation_prompt=True, return_dict=False) for c in chats]
    width = max(map(len, rows))
    tokens = np.zeros((len(rows), width), np.int64)  # [B, T], left padded
    mask = np.zeros((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        tokens[i, width - len(row):], mask[i, width - len(row):] = row, 1
    positions = np.array(positions_from_mask(mask))  # a writable copy for torch
    with torch.no_grad():
        expected = torch_model(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask),
                               position_ids=torch.from_numpy(positions)).logits.numpy()  # [B, T, V] float32
    actual, _ = model(tokens.astype(np.int32), positions.astype(np.int32), mask.astype(np.int32))
    valid = mask.astype(bool)
    assert np.abs(expected[valid]).std() > 0.05  # random init, not all ~0
    # Both accumulate in float32 over hidden size 64.
    np.testing.assert_allclose(np.asarray(actual)[valid], expected[valid], rtol=1e-4, atol=1e-5)


def test_base_qwen_model_ends_text_with_endoftext(tmp_path):
    base = hub.seed_cache(str(tmp_path), {"Qwen/Qwen2.5-3B": stand_ins.TinySize(num_layers=1)}).models["Qwen/Qwen2.5-3B"]
    hf = transformers.AutoTokenizer.from_pretrained(base)
    end_of_text = hf.convert_tokens_to_ids("<|endoftext|>")
    assert hf.eos_token == "<|endoftext|>" and "<|im_end|>" in hf.get_vocab()
    assert json.load(open(os.path.join(base, "generation_config.json")))["eos_token_id"] == end_of_text
    assert json.load(open(os.path.join(base, "config.json")))["num_hidden_layers"] == 1


# -- tokenizers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("repo_id", list(MODELS))
def test_kardia_jax_tokenizer_reads_the_family_format(seeded, repo_id):
    family = MODELS[repo_id][0]
    snapshot = seeded.models[repo_id]
    tok = load_tokenizer(snapshot)
    assert isinstance(tok, HFTokenizer)
    hf = transformers.AutoTokenizer.from_pretrained(repo_id)
    ids = hf.get_vocab()
    # The span markers are not in the families' vocabularies: kardia_jax adds them, as for the real ones.
    assert tok.num_added_tokens == len(MARKER_TOKENS)
    generation = json.load(open(os.path.join(snapshot, "generation_config.json")))
    rows = json.load(open(os.path.join(snapshot, "config.json")))["vocab_size"]
    if family == "gemma":
        specials = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
        assert [ids[t] for t in specials] == [0, 1, 2, 3, 5, 6]
        assert tok.stop_ids == (ids["<end_of_turn>"], ids["<eos>"]) and tok.pad_id == 0
        assert tok.render_chat(CHAT, add_generation_prompt=True) == GEMMA  # system folded into the first user turn
        with pytest.raises(jinja2.TemplateError, match="System role"):
            hf.apply_chat_template(CHAT, tokenize=False)
        assert generation["eos_token_id"] == [1, ids["<end_of_turn>"]] and generation["bos_token_id"] == 2
        assert rows == len(hf) < tok.vocab_size  # one row per piece: the markers grow the embedding
    else:
        end_of_text, im_end = ids["<|endoftext|>"], ids["<|im_end|>"]
        assert [ids["<|im_start|>"], im_end] == [end_of_text + 1, end_of_text + 2]  # after the base vocabulary
        assert hf.bos_token is None and hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
        assert tok.stop_ids == (im_end, end_of_text) and tok.pad_id == end_of_text
        assert tok.render_chat(CHAT, add_generation_prompt=True) == CHATML
        assert generation["eos_token_id"] == [im_end, end_of_text] and generation["pad_token_id"] == end_of_text
        assert len(hf) < tok.vocab_size <= rows  # spare rows hold the markers, as in the real checkpoints
    chat_ids = tok.encode_chat(CHAT, add_generation_prompt=True)
    assert tok.decode(chat_ids) == tok.render_chat(CHAT, add_generation_prompt=True)
    texts = training_texts(sample_path(), "test")
    assert tok.encode_batch(texts) == [hf.encode(t, add_special_tokens=False) for t in texts]  # same pipeline


def test_qwen_defaults_system_message_and_qwen3_thinking_switch():
    user = [{"role": "user", "content": "Hi"}]
    qwen25 = transformers.AutoTokenizer.from_pretrained("Qwen/Qwen2.5-7B-Instruct")
    assert qwen25.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == (
        f"<|im_start|>system\n{stand_ins.QWEN_DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    qwen3 = transformers.AutoTokenizer.from_pretrained("Qwen/Qwen3-8B")
    plain = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert qwen3.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == plain
    assert qwen3.apply_chat_template(user, tokenize=False, add_generation_prompt=True,
                                     enable_thinking=False) == plain + "<think>\n\n</think>\n\n"


def test_qwen25_and_qwen3_share_the_base_vocabulary(seeded):
    policy = load_tokenizer(seeded.models["Qwen/Qwen2.5-7B-Instruct"])
    judge = load_tokenizer(seeded.models["Qwen/Qwen3-8B"])
    assert same_vocabulary(policy, judge)  # the judge's ids can be assembled on device
    assert judge.hf.convert_tokens_to_ids(["<think>", "</think>"]) == [judge.pad_id + 3, judge.pad_id + 4]
    gemma = load_tokenizer(seeded.models["google/gemma-2b-it"])
    assert not same_vocabulary(gemma, judge)


def test_gemma_sentencepiece_model_and_converted_tokenizer_json_agree(seeded):
    snapshot = seeded.models["google/gemma-2b-it"]
    sp = load_tokenizer(os.path.join(snapshot, "tokenizer.model"))
    hf = load_tokenizer(snapshot)
    assert isinstance(sp, SentencePieceTokenizer)
    assert sp.sp.get_piece_size() == hf.vocab_size - hf.num_added_tokens == 1024
    assert sp.vocab_size == hf.vocab_size and sp.marker_ids == hf.marker_ids
    assert (sp.stop_ids, sp.pad_id, sp.eos_id) == (hf.stop_ids, hf.pad_id, hf.eos_id)
    assert sp.render_chat(CHAT, add_generation_prompt=True) == GEMMA
    assert sp.encode_chat(CHAT, add_generation_prompt=True) == hf.encode_chat(CHAT, add_generation_prompt=True)
    texts = training_texts(sample_path(), "test")
    assert [sp.sp.encode(t) for t in texts] == [hf.encode(t) for t in texts]


# -- arguments ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("repo_id", list(MODELS))
def test_stand_in_config_keeps_the_real_layout_at_tiny_sizes(repo_id):
    family, kv_heads, tied = MODELS[repo_id]
    config = stand_ins.stand_in_config(repo_id, stand_ins.TinySize(), vocab_size=1088)
    real = stand_ins.real_config(repo_id)
    assert (config.family, config.num_kv_heads, config.tie_embeddings) == (family, kv_heads, tied)
    assert (config.rope_theta, config.rms_norm_eps) == (real.rope_theta, real.rms_norm_eps)
    assert (config.hidden_size, config.num_layers, config.num_heads, config.head_dim) == (64, 2, 4, 16)
    smaller = stand_ins.stand_in_config(
        repo_id, stand_ins.TinySize(hidden_size=32, num_layers=1, num_heads=2, head_dim=8, intermediate_size=64),
        vocab_size=1088)
    assert smaller.num_params() < config.num_params()


def test_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="'meta-llama/Llama-3-8B'.*PRESETS"):
        stand_ins.real_config("meta-llama/Llama-3-8B")
    with pytest.raises(ValueError, match="tokenizer_vocab=1000"):
        hub.seed_cache(str(tmp_path), {"Qwen/Qwen3-8B": stand_ins.TinySize()}, tokenizer_vocab=1000)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="no test.jsonl in .*data.*train.jsonl"):
        hub.seed_cache(str(tmp_path), {}, {DATASET: str(tmp_path / "data")})


def test_env_alone_reads_the_cache_in_a_fresh_process(seeded):
    """The contract for the rehearsal's processes: HF_HUB_CACHE + HF_HUB_OFFLINE=1, nothing patched."""
    script = (
        "import json, huggingface_hub, transformers\n"
        "print(json.dumps([huggingface_hub.snapshot_download('Qwen/Qwen3-8B'),\n"
        "                  huggingface_hub.snapshot_download('Jhcircle/KardiaBench', repo_type='dataset'),\n"
        "                  transformers.AutoTokenizer.from_pretrained('google/gemma-2b-it').eos_token]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))} | seeded.env()
    env["HF_HOME"] = os.path.join(seeded.cache_dir, "no-such-home")  # only HF_HUB_CACHE points at the cache
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True, timeout=300)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [
        seeded.models["Qwen/Qwen3-8B"], seeded.datasets[DATASET], "<eos>"]
