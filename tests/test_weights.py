"""kardia_jax.models.weights and loading.export_hf against transformers (torch CPU), on tiny random models.

Covers: bf16 checkpoints; save_pretrained -> transformers, single and sharded safetensors, saving over
an earlier save; errors for bad checkpoints; gs:// paths; resize_vocab (values and sharding); attention
biases in Qwen3/Gemma configs; the exported model's generation config.
"""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from helpers_hf import hf_logits, left_padded_batch, make_hf_model
from helpers_models import SAME_SUMS, T, VS_OTHER_ORDER, forward
from kardia_jax import storage
from kardia_jax.models import PRESETS, Decoder, from_hf_config, from_pretrained, loading, resize_vocab, save_pretrained
from kardia_jax.sharding import make_mesh


def _load_torch(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32
    ).eval()


def test_bfloat16_checkpoint_loads_in_float32(zoo, padded_batch, tmp_path):
    """Released checkpoints are stored in bf16: loading one upcasts exactly (compare with transformers
    loading the same bf16 file in float32)."""
    tokens, mask = padded_batch
    path = str(tmp_path / "bf16")
    _load_torch(zoo("gemma")[1]).to(torch.bfloat16).save_pretrained(path)
    assert next(iter(load_file(os.path.join(path, "model.safetensors")).values())).dtype.name == "bfloat16"
    model = from_pretrained(path)
    assert model.layers["q"][...].dtype == jnp.float32
    expected = hf_logits(_load_torch(path), tokens, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(forward(model, tokens, mask))[valid], expected[valid], **VS_OTHER_ORDER)


@pytest.mark.parametrize("name", ["qwen2", "qwen2_tied", "qwen3", "gemma"])
def test_save_pretrained_loads_in_transformers(zoo, padded_batch, tmp_path, name):
    torch_model, path = zoo(name)
    tokens, mask = padded_batch
    model = from_pretrained(path)

    out = tmp_path / "single"
    save_pretrained(model, str(out))
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == ["model.safetensors"]
    assert from_hf_config(json.load(open(out / "config.json"))) == model.config
    reloaded = _load_torch(str(out))
    original = {k: v for k, v in torch_model.state_dict().items()}
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=0, msg=key)
    # The same weights bit for bit through the same torch model: the same logits, exactly.
    np.testing.assert_array_equal(hf_logits(reloaded, tokens, mask), hf_logits(torch_model, tokens, mask))


@pytest.mark.parametrize("name", ["qwen2", "gemma"])
def test_sharded_safetensors_round_trip(zoo, padded_batch, tmp_path, name):
    torch_model, path = zoo(name)
    tokens, mask = padded_batch
    model = from_pretrained(path)
    out = tmp_path / "sharded"
    save_pretrained(model, str(out), max_shard_bytes=40_000)

    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 2, files
    assert all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    index = json.load(open(out / "model.safetensors.index.json"))
    assert set(index["weight_map"].values()) == set(files)
    names = set()
    for f in files:
        names |= set(load_file(str(out / f)))
    assert names == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(a.nbytes for f in files for a in load_file(str(out / f)).values())

    again = from_pretrained(str(out))
    np.testing.assert_array_equal(np.asarray(forward(again, tokens, mask)), np.asarray(forward(model, tokens, mask)))
    reloaded = _load_torch(str(out))
    np.testing.assert_array_equal(hf_logits(reloaded, tokens, mask), hf_logits(torch_model, tokens, mask))  # same bits


@pytest.mark.parametrize("first, second", [(40_000, 4 << 30), (4 << 30, 40_000)], ids=["sharded-then-single", "single-then-sharded"])
def test_save_pretrained_over_previous_save_is_not_stale(tmp_path, first, second):
    """A save over an earlier one with another shard count must not leave weights that loaders prefer."""
    _, path = make_hf_model("qwen2", tmp_path)
    model = from_pretrained(path)
    out = str(tmp_path / "out")
    save_pretrained(model, out, max_shard_bytes=first)
    model.layers["q"][...] = model.layers["q"][...] * 2
    save_pretrained(model, out, max_shard_bytes=second)
    latest = np.asarray(model.layers["q"][...])
    assert np.array_equal(np.asarray(from_pretrained(out).layers["q"][...]), latest)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert float(hf.model.layers[0].self_attn.q_proj.weight[0, 0]) == float(latest[0, 0, 0, 0])


def _copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_named(zoo, tmp_path):
    path = _copy_checkpoint(zoo("qwen2")[1], tmp_path / "ckpt")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        from_pretrained(str(path))


def test_wrong_shape_is_named(zoo, tmp_path):
    path = _copy_checkpoint(zoo("qwen3")[1], tmp_path / "ckpt")
    config = json.load(open(path / "config.json"))
    config["intermediate_size"] = 96
    json.dump(config, open(path / "config.json", "w"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\[128, 64\].*\[96, 64\]"):
        from_pretrained(str(path))


def test_unknown_architecture_is_named(zoo, tmp_path):
    path = _copy_checkpoint(zoo("qwen2")[1], tmp_path / "ckpt")
    config = json.load(open(path / "config.json"))
    config["architectures"], config["model_type"] = ["LlamaForCausalLM"], "llama"
    json.dump(config, open(path / "config.json", "w"))
    with pytest.raises(ValueError, match=r"LlamaForCausalLM") as info:
        from_pretrained(str(path))
    assert "config.json" in str(info.value) and "Qwen2ForCausalLM" in str(info.value)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        from_pretrained(str(tmp_path / "does-not-exist"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(str(tmp_path))


def test_gcs_round_trip(zoo, padded_batch, gcs_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where gs:// checkpoints are copied to
    _, path = zoo("gemma")
    tokens, mask = padded_batch
    storage.copy_dir_to(path, f"{gcs_dir}/x")
    model = from_pretrained(f"{gcs_dir}/x")
    save_pretrained(model, f"{gcs_dir}/out/step1", max_shard_bytes=100_000)
    assert "model.safetensors.index.json" in storage.listdir(f"{gcs_dir}/out/step1")
    again = from_pretrained(f"{gcs_dir}/out/step1")
    np.testing.assert_array_equal(np.asarray(forward(again, tokens, mask)), np.asarray(forward(model, tokens, mask)))


@pytest.mark.parametrize("name", ["qwen2", "qwen2_tied"])
def test_resize_vocab(zoo, padded_batch, name):
    model = from_pretrained(zoo(name)[1])
    tokens, mask = padded_batch
    tokens = np.where(np.isin(tokens, (5, 7)), 9, tokens)  # inputs avoid the re-initialised ids
    old_embed = np.asarray(model.embed[...])
    old_head = None if model.config.tie_embeddings else np.asarray(model.lm_head[...])
    old_logits = np.asarray(forward(model, tokens, mask))

    resize_vocab(model, 260, new_token_ids=(5, 7, 258))
    assert model.config.vocab_size == 260
    keep = np.setdiff1d(np.arange(256), (5, 7))
    embed = np.asarray(model.embed[...])
    assert embed.shape == (260, 64)
    np.testing.assert_array_equal(embed[keep], old_embed[keep])
    mean = old_embed[keep].mean(0)
    # float32 means of 254 rows, summed in another order by NumPy and XLA.
    for row in (5, 7, 256, 257, 258, 259):
        np.testing.assert_allclose(embed[row], mean, rtol=1e-5, atol=1e-6)
    if old_head is not None:
        head = np.asarray(model.lm_head[...])
        assert head.shape == (64, 260)
        np.testing.assert_array_equal(head[:, keep], old_head[:, keep])
        for col in (5, 7, 256, 259):
            np.testing.assert_allclose(head[:, col], old_head[:, keep].mean(1), rtol=1e-5, atol=1e-6)

    logits = np.asarray(forward(model, tokens, mask))
    assert logits.shape == (3, T, 260)
    valid = mask.astype(bool)
    np.testing.assert_allclose(logits[..., keep][valid], old_logits[..., keep][valid], **SAME_SUMS)
    # A new column is the mean of the kept columns (the unembedding is linear).
    np.testing.assert_allclose(logits[..., 257][valid], old_logits[..., keep].mean(-1)[valid], **SAME_SUMS)


def test_resize_vocab_keeps_sharding(zoo):
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    model = from_pretrained(zoo("qwen2")[1], mesh=mesh)
    resize_vocab(model, 260)
    assert model.embed[...].sharding.spec == P("tensor", "fsdp")
    assert model.lm_head[...].sharding.spec == P("fsdp", "tensor")
    with pytest.raises(ValueError, match="smaller"):
        resize_vocab(model, 100)


@pytest.mark.parametrize("family", ["qwen3", "gemma"])
def test_attention_bias_checkpoint_is_rejected_or_loaded(tmp_path, family):
    """Qwen3/Gemma config.json with attention_bias=true: the biases must be loaded or refused, never ignored."""
    torch_model, path = make_hf_model(family, tmp_path, attention_bias=True)
    tokens, mask = left_padded_batch(256, (12, 9, 4), 12, seed=1)
    try:
        model = from_pretrained(path)
    except ValueError as e:
        assert "attention_bias" in str(e) or "bias" in str(e)
        return
    logits, _ = model(tokens, np.maximum(np.cumsum(mask, -1) - 1, 0), mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[valid], hf_logits(torch_model, tokens, mask)[valid], **VS_OTHER_ORDER)


def test_exported_model_stops_at_the_end_of_turn_in_transformers_generate(tmp_path, tokenizer):
    """export_hf writes generation_config.json and config.json ids: `generate` stops at <|im_end|>."""
    model = Decoder(PRESETS["tiny-kardia"], rngs=nnx.Rngs(0))
    assert model.config.tie_embeddings
    # Rigged: layers add nothing (o, down = 0), every embedding row is e and the end-of-turn row 2e, so
    # the final hidden state is norm(e) at every position and the tied unembedding prefers eos.
    model.layers.o[...] = jnp.zeros_like(model.layers.o[...])
    model.layers.down[...] = jnp.zeros_like(model.layers.down[...])
    e = jnp.linspace(0.5, 1.5, model.config.hidden_size)
    model.embed[...] = jnp.tile(e, (model.config.vocab_size, 1)).at[tokenizer.eos_id].set(2 * e)
    graphdef, params = nnx.split(model)
    out = str(tmp_path / "hf")
    loading.export_hf(graphdef, params, tokenizer, out)
    assert json.load(open(os.path.join(out, "config.json")))["eos_token_id"] == tokenizer.eos_id
    prompt = torch.tensor([tokenizer.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)])
    hf_model = _load_torch(out)
    config = transformers.GenerationConfig.from_pretrained(out)
    assert config.eos_token_id in (tokenizer.eos_id, list(tokenizer.stop_ids))
    stopped = hf_model.generate(prompt, generation_config=config, max_new_tokens=8, do_sample=False)
    assert stopped[0, prompt.shape[1]:].tolist() == [tokenizer.eos_id]
    # Without the ids it runs on past the end of turn to max_new_tokens (what the export prevents).
    bare = transformers.GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    hf_model.generation_config = bare
    hf_model.config.eos_token_id = None
    runs_on = hf_model.generate(prompt, generation_config=bare)
    assert runs_on[0, prompt.shape[1]:].tolist() == [tokenizer.eos_id] * 8
