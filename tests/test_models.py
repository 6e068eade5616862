"""Tests for kardia_jax.models against Hugging Face transformers (torch CPU), on tiny random models.

Covers: logits vs transformers for Qwen2 (GQA, biases, tied and untied), Qwen3 (q/k norm, head_dim !=
D/H) and Gemma (MQA, embedding scale, 1 + w norms) with left padding; save_pretrained -> transformers
and sharded safetensors; loading onto an 8-device (fsdp=4, tensor=2) mesh; chunked log-probs, entropy
and their gradients; KV-cache prefill + decode; errors for bad checkpoints; gs:// paths; resize_vocab;
bfloat16; remat policies.
"""

from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file, save_file

from helpers_float import assert_trees_close
from helpers_hf import hf_logits, left_padded_batch, make_hf_model
from kardia_jax.models import loading
from kardia_jax import storage
from kardia_jax.models import (
    PRESETS,
    Decoder,
    chunked_logprobs,
    fused_token_loss,
    from_hf_config,
    from_pretrained,
    init_cache,
    positions_from_mask,
    resize_vocab,
    rope_tables,
    save_pretrained,
    to_hf_config,
)
from kardia_jax.sharding import make_mesh

# Named tiny HF models: name -> (family, config overrides).
MODELS = {
    "qwen2": ("qwen2", {"tie_word_embeddings": False}),
    "qwen2_tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {}),
    "gemma": ("gemma", {}),
}
FAMILY_MODELS = ["qwen2", "qwen3", "gemma"]

# A left-padded batch [3, 12]: one full row, one with 3 pads, one with 8 pads.
LENGTHS, T = (12, 9, 4), 12

# float32 accumulation error of the tiny models' logits, logprobs and entropies (|value| <= ~15; observed
# <= 5e-6 absolute). VS_OTHER_ORDER: another computation of them (transformers' torch kernels, a KV cache,
# sums split over devices). SAME_SUMS: one forward's logits read another way (chunked log-softmax, a
# resized vocabulary).
VS_OTHER_ORDER = dict(rtol=1e-4, atol=1e-5)
SAME_SUMS = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """name -> (torch model, checkpoint dir), built lazily once per module."""
    root = tmp_path_factory.mktemp("hf_models")
    cache = {}

    def get(name):
        if name not in cache:
            family, overrides = MODELS[name]
            cache[name] = make_hf_model(family, root, seed=len(cache), **overrides)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def batch():
    tokens, mask = left_padded_batch(256, LENGTHS, T, seed=1)
    return tokens, mask


# -- jitted entry points (graphdef static, state as an argument) ---------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, mask):
    model = nnx.merge(graphdef, state)
    logits, _ = model(tokens, positions_from_mask(mask), mask)
    return logits


def forward(model, tokens, mask) -> jax.Array:
    """Logits [B, T, V] float32 of a full (cache-less) forward."""
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask))


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, state, tokens, positions, mask, cache):
    return nnx.merge(graphdef, state)(tokens, positions, mask, cache)


def _direct_logprobs(logits, targets, temperature):
    logp_all = jax.nn.log_softmax(logits / temperature, axis=-1)
    return jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0], logp_all


@functools.partial(jax.jit, static_argnums=(0, 1))
def _loss_grads(graphdef, chunked, state, tokens, mask, targets):
    """d/dparams of sum(mask * log p(targets)), by target_logprobs (chunked) or log_softmax (direct)."""

    def loss(state):
        model = nnx.merge(graphdef, state)
        positions = positions_from_mask(mask)
        if chunked:
            logp = model.target_logprobs(tokens, positions, mask, targets, temperature=0.7, chunk_size=5)
        else:
            logits, _ = model(tokens, positions, mask)
            logp, _ = _direct_logprobs(logits, targets, 0.7)
        return jnp.sum(logp * mask)

    return jax.value_and_grad(loss)(state)


def loss_grads(model, tokens, mask, targets, chunked=True):
    graphdef, state = nnx.split(model)
    return _loss_grads(graphdef, chunked, state, *map(jnp.asarray, (tokens, mask, targets)))


def _targets(tokens):
    """Next-token targets [B, T] (the last column wraps; it is as good a target as any)."""
    return np.roll(tokens, -1, axis=1)


# -- 1. logits vs transformers ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_transformers(zoo, batch, name):
    torch_model, path = zoo(name)
    tokens, mask = batch
    model = from_pretrained(path)
    family, overrides = MODELS[name]
    assert model.config.family == family
    assert model.config.tie_embeddings == overrides.get("tie_word_embeddings", True)
    assert hasattr(model, "lm_head") != model.config.tie_embeddings

    expected = hf_logits(torch_model, tokens, mask)
    actual = np.asarray(forward(model, tokens, mask))
    assert actual.dtype == np.float32 and actual.shape == (3, T, 256)
    valid = mask.astype(bool)
    assert np.abs(expected[valid]).std() > 0.3  # a model whose logits are not all ~0
    np.testing.assert_allclose(actual[valid], expected[valid], **VS_OTHER_ORDER)


def test_bfloat16_checkpoint_loads_in_float32(zoo, batch, tmp_path):
    """Released checkpoints are stored in bf16: loading one upcasts exactly (compare with transformers
    loading the same bf16 file in float32)."""
    tokens, mask = batch
    path = str(tmp_path / "bf16")
    _load_torch(zoo("gemma")[1]).to(torch.bfloat16).save_pretrained(path)
    assert next(iter(load_file(os.path.join(path, "model.safetensors")).values())).dtype.name == "bfloat16"
    model = from_pretrained(path)
    assert model.layers["q"][...].dtype == jnp.float32
    expected = hf_logits(_load_torch(path), tokens, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(forward(model, tokens, mask))[valid], expected[valid], **VS_OTHER_ORDER)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_hf_config(name):
    config = PRESETS[name]
    assert from_hf_config(json.loads(json.dumps(to_hf_config(config)))) == config
    assert transformers.AutoConfig.for_model(**to_hf_config(config)).num_key_value_heads == config.num_kv_heads


def test_config_layouts(zoo):
    """The families' distinguishing shapes made it into the ModelConfig."""
    assert (from_pretrained(zoo("qwen2")[1]).config.num_kv_heads, from_pretrained(zoo("qwen2")[1]).config.head_dim) == (2, 16)
    qwen3 = from_pretrained(zoo("qwen3")[1]).config
    assert (qwen3.num_heads, qwen3.num_kv_heads, qwen3.head_dim, qwen3.hidden_size) == (4, 2, 32, 64)
    gemma = from_pretrained(zoo("gemma")[1]).config
    assert (gemma.num_kv_heads, gemma.head_dim, gemma.tie_embeddings) == (1, 16, True)


# -- 2. save_pretrained -> transformers; sharded checkpoints -----------------------------------------


def _load_torch(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32
    ).eval()


@pytest.mark.parametrize("name", ["qwen2", "qwen2_tied", "qwen3", "gemma"])
def test_save_pretrained_loads_in_transformers(zoo, batch, tmp_path, name):
    torch_model, path = zoo(name)
    tokens, mask = batch
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
def test_sharded_safetensors_round_trip(zoo, batch, tmp_path, name):
    torch_model, path = zoo(name)
    tokens, mask = batch
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


# -- 3. sharded loading and forward on an 8-device mesh ----------------------------------------------


@pytest.mark.parametrize("name", ["qwen2", "gemma"])
def test_sharded_load_and_forward(zoo, name):
    assert len(jax.devices()) == 8
    _, path = zoo(name)
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    tokens, mask = left_padded_batch(256, (12, 9, 4, 1), T, seed=2)  # batch 4: divisible by fsdp

    sharded = from_pretrained(path, mesh=mesh)
    specs = {"/".join(map(str, k)): v[...].sharding for k, v in nnx.to_flat_state(nnx.state(sharded))}
    for s in specs.values():
        assert isinstance(s, NamedSharding) and s.mesh == mesh
    specs = {k: s.spec for k, s in specs.items()}
    assert specs["layers/q"] == P(None, "fsdp", "tensor", None)  # [L, D, H, Dh]
    assert specs["layers/o"] == P(None, "tensor", None, "fsdp")  # [L, H, Dh, D]
    assert specs["layers/gate"] == P(None, "fsdp", "tensor")  # [L, D, F]
    assert specs["layers/down"] == P(None, "tensor", "fsdp")  # [L, F, D]
    assert specs["layers/attn_norm"] == P(None, "fsdp")
    assert specs["embed"] == P("tensor", "fsdp")  # [V, D]
    if name == "gemma":  # one KV head cannot be split over tensor=2: replicated on that axis
        assert specs["layers/k"] == P(None, "fsdp", None, None)
        assert specs["layers/v"] == P(None, "fsdp", None, None)
    else:
        assert specs["layers/k"] == P(None, "fsdp", "tensor", None)
        assert specs["layers/k_bias"] == P(None, "tensor", None)
        assert specs["lm_head"] == P("fsdp", "tensor")  # [D, V]
    q = sharded.layers["q"][...]
    assert q.addressable_shards[0].data.shape == (2, 64 // 4, 4 // 2, 16)

    unsharded = from_pretrained(path)
    expected = np.asarray(forward(unsharded, tokens, mask))
    with jax.set_mesh(mesh):
        logits = forward(sharded, tokens, mask)
    assert logits.sharding.spec == P("fsdp", None, "tensor")  # activation constraints were applied
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[valid], expected[valid], **VS_OTHER_ORDER)


def test_rope_tables_match_transformers_and_reject_positions_beyond_the_table():
    """The constant-table lookup equals HF's rotary cos/sin (computed in the graph) within 1e-5 at positions up
    to 4095 (NumPy's and torch's float32 powers differ by an ulp in a few inverse frequencies, and the angle
    multiplies that by the position); a position past the table is NaN, not a silently clamped rotation."""
    head_dim, theta, max_positions = 64, 1e6, 4096
    config = transformers.Qwen2Config(hidden_size=256, num_attention_heads=4, rope_theta=theta,
                                      max_position_embeddings=max_positions)
    rotary = transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding(config)
    positions = np.array([[0, 1, 2, 777], [4095, 3000, 17, 5]], np.int32)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.from_numpy(positions).long())  # [B, T, Dh]
    ours_sin, ours_cos = rope_tables(jnp.asarray(positions), head_dim, theta, max_positions)  # [B, T, 1, Dh/2]
    # An absolute error of the angle (position x an ulp of the frequency), not accumulation: no rtol applies.
    np.testing.assert_allclose(ours_cos[:, :, 0], cos.numpy()[..., : head_dim // 2], atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours_sin[:, :, 0], sin.numpy()[..., : head_dim // 2], atol=1e-5, rtol=0)
    beyond_sin, beyond_cos = rope_tables(jnp.asarray([[4095, 4096]]), head_dim, theta, max_positions)
    assert np.isfinite(beyond_sin[0, 0]).all() and np.isnan(beyond_sin[0, 1]).all() and np.isnan(beyond_cos[0, 1]).all()


# -- 4. chunked log-probabilities, entropy and their gradients ---------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 5, 12, 64])
def test_chunked_logprobs_function(chunk_size):
    kh, kw, kt = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(kh, (2, 12, 16))
    w = jax.random.normal(kw, (16, 40))
    targets = jax.random.randint(kt, (2, 12), 0, 40)
    logp, ent = chunked_logprobs(h, w, targets, temperature=1.3, chunk_size=chunk_size, with_entropy=True)
    expected, logp_all = _direct_logprobs(h @ w, targets, 1.3)
    np.testing.assert_allclose(logp, expected, **SAME_SUMS)
    np.testing.assert_allclose(ent, -jnp.sum(jnp.exp(logp_all) * logp_all, -1), **SAME_SUMS)
    assert chunked_logprobs(h, w, targets, 1.3, chunk_size).shape == (2, 12)


def _ppo_token_loss(logp, aux):
    """A GRPO-like per-token loss: clipped ratio times an advantage, weighted; nonlinear in logp."""
    old, adv, weight = aux
    ratio = jnp.exp(logp - old)
    return -jnp.minimum(ratio * adv, jnp.clip(ratio, 0.8, 1.2) * adv) * weight


@pytest.mark.parametrize("chunk_size", [1, 4, 13, 64])  # 4 does not divide T = 13; 64 > T
def test_fused_token_loss_equals_autodiff_of_the_unfused_loss(chunk_size):
    """Loss, logp, entropy and the gradients to h and unembed equal plain autodiff through the full
    [B, T, V] logits (within float32 accumulation error), under an outer scale (the backward multiplies
    by the cotangent)."""
    kh, kw, kt, ko, ka = jax.random.split(jax.random.key(0), 5)
    b, t, d, v = 3, 13, 16, 40
    h = jax.random.normal(kh, (b, t, d))
    w = jax.random.normal(kw, (d, v))
    targets = jax.random.randint(kt, (b, t), 0, v)
    # old logprobs near the current ones, so some ratios fall inside and some outside the clip range
    logp_now, _ = _direct_logprobs(h @ w, targets, 1.3)
    old = logp_now + 0.3 * jax.random.normal(ko, (b, t))
    aux = (old, jnp.broadcast_to(jax.random.normal(ka, (b, 1)), (b, t)), jnp.linspace(0.0, 1.0, b * t).reshape(b, t))

    def direct(h, w):
        logp, logp_all = _direct_logprobs(h @ w, targets, 1.3)
        entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, -1)
        return 2.5 * jnp.sum(_ppo_token_loss(logp, aux)), (logp, entropy)

    def fused(h, w):
        loss, logp, entropy = fused_token_loss(h, w, targets, _ppo_token_loss, aux, temperature=1.3,
                                               chunk_size=chunk_size, with_entropy=True)
        return 2.5 * loss, (logp, entropy)

    (loss_d, aux_d), grads_d = jax.value_and_grad(direct, argnums=(0, 1), has_aux=True)(h, w)
    (loss_f, aux_f), grads_f = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(h, w)
    np.testing.assert_allclose(loss_f, loss_d, rtol=1e-5)
    for got, want in zip(aux_f + grads_f, aux_d + grads_d):
        assert_trees_close(got, want)  # each array against its own largest entry
    assert float(jnp.mean(jnp.abs(jnp.exp(aux_d[0] - old) - 1) > 0.2)) > 0.2  # the clip is exercised

    # Not differentiated (evaluation): the same values, and no gradient work in the program.
    loss_e, logp_e, entropy_e = jax.jit(lambda h, w: fused_token_loss(
        h, w, targets, _ppo_token_loss, aux, temperature=1.3, chunk_size=chunk_size))(h, w)
    np.testing.assert_allclose(loss_e, loss_d / 2.5, rtol=1e-5)
    np.testing.assert_allclose(logp_e, aux_d[0], **SAME_SUMS)
    assert entropy_e is None


@pytest.mark.parametrize("name", ["qwen2", "gemma"])
def test_target_logprobs_match_log_softmax(zoo, batch, name):
    model = from_pretrained(zoo(name)[1])
    tokens, mask = batch
    targets = _targets(tokens)
    positions = positions_from_mask(jnp.asarray(mask))
    logp, ent = model.target_logprobs(
        jnp.asarray(tokens), positions, jnp.asarray(mask), jnp.asarray(targets),
        temperature=0.7, chunk_size=5, with_entropy=True,
    )  # chunk 5 does not divide T = 12
    expected, logp_all = _direct_logprobs(forward(model, tokens, mask), jnp.asarray(targets), 0.7)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logp)[valid], np.asarray(expected)[valid], **SAME_SUMS)
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, -1)
    np.testing.assert_allclose(np.asarray(ent)[valid], np.asarray(entropy)[valid], **SAME_SUMS)
    assert float(jnp.min(entropy)) > 0.1  # temperature 0.7 on these logits is far from one-hot

    value_c, grads_c = loss_grads(model, tokens, mask, targets, chunked=True)
    value_d, grads_d = loss_grads(model, tokens, mask, targets, chunked=False)
    np.testing.assert_allclose(value_c, value_d, rtol=1e-6)
    assert jax.tree.structure(grads_c) == jax.tree.structure(grads_d)
    assert_trees_close(grads_c, grads_d)  # float32 accumulation error (|grad| reaches ~20 here)
    assert float(jnp.max(jnp.abs(grads_d["layers"]["q"][...]))) > 1e-2  # gradients are not trivially 0


# -- 5. KV cache: prefill + one-token decode == full forward ------------------------------------------


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_kv_cache_prefill_then_decode(zoo, name):
    model = from_pretrained(zoo(name)[1])
    graphdef, state = nnx.split(model)
    prompt, prompt_mask = left_padded_batch(256, (7, 4, 1), 7, seed=3)
    new = np.random.default_rng(4).integers(1, 256, (3, 4)).astype(np.int32)
    full_tokens = np.concatenate([prompt, new], axis=1)
    full_mask = np.concatenate([prompt_mask, np.ones_like(new)], axis=1)
    expected = np.asarray(forward(model, full_tokens, full_mask))  # [3, 11, V]

    cache = init_cache(model.config, batch=3, length=7 + 4 + 2)  # 2 spare columns, never valid
    positions = positions_from_mask(jnp.asarray(prompt_mask))
    logits, cache = _step(graphdef, state, jnp.asarray(prompt), positions, jnp.asarray(prompt_mask), cache)
    valid = prompt_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[valid], expected[:, :7][valid], **VS_OTHER_ORDER)
    assert int(cache["end"]) == 7
    np.testing.assert_array_equal(np.asarray(cache["valid"])[:, :7], valid)

    next_pos = positions[:, -1:] + 1
    for i in range(4):
        tok = jnp.asarray(new[:, i : i + 1])
        logits, cache = _step(graphdef, state, tok, next_pos, jnp.ones((3, 1), jnp.int32), cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], expected[:, 7 + i], **VS_OTHER_ORDER, err_msg=f"step {i}")
        next_pos = next_pos + 1
    assert int(cache["end"]) == 11
    assert not np.asarray(cache["valid"])[:, 11:].any()


# -- 6. bad checkpoints ---------------------------------------------------------------------------------


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


# -- 7. gs:// paths -------------------------------------------------------------------------------------


def test_gcs_round_trip(zoo, batch, gcs_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where gs:// checkpoints are copied to
    _, path = zoo("gemma")
    tokens, mask = batch
    storage.copy_dir_to(path, f"{gcs_dir}/x")
    model = from_pretrained(f"{gcs_dir}/x")
    save_pretrained(model, f"{gcs_dir}/out/step1", max_shard_bytes=100_000)
    assert "model.safetensors.index.json" in storage.listdir(f"{gcs_dir}/out/step1")
    again = from_pretrained(f"{gcs_dir}/out/step1")
    np.testing.assert_array_equal(np.asarray(forward(again, tokens, mask)), np.asarray(forward(model, tokens, mask)))


# -- 8. resize_vocab and bfloat16 ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen2", "qwen2_tied"])
def test_resize_vocab(zoo, batch, name):
    model = from_pretrained(zoo(name)[1])
    tokens, mask = batch
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


# bf16 tolerance: parameters and activations rounded to 8 mantissa bits (relative step 2^-8) through 2
# layers. On these logits (std ~0.7, |max| ~3) the observed error vs float32 is <= 0.1 max abs and
# <= 0.014 mean abs (transformers' own bf16 forward is as far off); we allow 0.2 max and 0.025 mean.
BF16_MAX_ABS, BF16_MEAN_ABS = 0.2, 0.025


@pytest.mark.parametrize("name", ["qwen3", "gemma"])
def test_bfloat16_params_and_compute(zoo, batch, name):
    path = zoo(name)[1]
    tokens, mask = batch
    model = from_pretrained(path, param_dtype="bfloat16", dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(model)))
    logits = np.asarray(forward(model, tokens, mask))
    assert logits.dtype == np.float32
    expected = np.asarray(forward(from_pretrained(path), tokens, mask))
    valid = mask.astype(bool)
    err = np.abs(logits[valid] - expected[valid])
    assert np.isfinite(logits).all()
    assert err.max() < BF16_MAX_ABS and err.mean() < BF16_MEAN_ABS, (err.max(), err.mean())


# -- 9. remat policies -----------------------------------------------------------------------------------


def _count_remat(model, tokens, mask, targets) -> int:
    """How many remat (jax.checkpoint) regions the gradient's jaxpr has."""
    graphdef, state = nnx.split(model)
    args = tuple(map(jnp.asarray, (tokens, mask, targets)))
    return str(jax.make_jaxpr(lambda s: _loss_grads.__wrapped__(graphdef, True, s, *args))(state)).count("remat")


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_policies_same_gradients(zoo, batch, remat):
    path = zoo("qwen2")[1]
    tokens, mask = batch
    targets = _targets(tokens)
    plain, rematted = from_pretrained(path), from_pretrained(path, remat=remat)
    assert _count_remat(rematted, tokens, mask, targets) > _count_remat(plain, tokens, mask, targets)
    value, grads = loss_grads(plain, tokens, mask, targets)
    value_r, grads_r = loss_grads(rematted, tokens, mask, targets)
    np.testing.assert_allclose(value_r, value, rtol=1e-6)
    assert_trees_close(grads_r, grads)  # recomputed activations may be fused and summed in another order


def test_unrolled_layers_same_loss_and_gradients(zoo, batch):
    """scan_layers=False (layers unrolled, no while loop in the program) is the same computation."""
    path = zoo("qwen2")[1]
    tokens, mask = batch
    targets = _targets(tokens)
    scanned, unrolled = from_pretrained(path), from_pretrained(path, scan_layers=False)
    program = lambda m: jax.jit(lambda: m.hidden_states(tokens, positions_from_mask(mask), mask)).lower().as_text()
    assert "while" in program(scanned) and "while" not in program(unrolled)
    value, grads = loss_grads(scanned, tokens, mask, targets)
    value_u, grads_u = loss_grads(unrolled, tokens, mask, targets)
    np.testing.assert_allclose(value_u, value, rtol=1e-6)
    assert_trees_close(grads_u, grads)  # another program: float32 accumulation error


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


def test_prefill_prefix_fan_out_equals_full_forward(tmp_path):
    """A prompt prefilled once and shared (no copies) by F continuations, with and without an own cache,
    gives the logits of F independent full forwards."""
    from kardia_jax.models.decoder import fan_out_prefix

    _, path = make_hf_model("qwen2", tmp_path)
    model = from_pretrained(path)
    prompt, prompt_mask = left_padded_batch(256, (7, 4), 7, seed=3)
    fan, t = 3, 4
    suffix = np.random.default_rng(4).integers(1, 256, (2 * fan, t)).astype(np.int32)
    suffix_mask = np.ones_like(suffix)
    _, cache = model.prefill(jnp.asarray(prompt), positions_from_mask(jnp.asarray(prompt_mask)), jnp.asarray(prompt_mask))
    start = jnp.repeat(jnp.asarray(prompt_mask).sum(-1), fan)[:, None]
    full_tokens = np.concatenate([np.repeat(prompt, fan, 0), suffix], 1)
    full_mask = np.concatenate([np.repeat(prompt_mask, fan, 0), suffix_mask], 1)
    ref, _ = model(jnp.asarray(full_tokens), positions_from_mask(jnp.asarray(full_mask)), jnp.asarray(full_mask))
    for own_length in (0, t):
        shared = fan_out_prefix(cache, fan, own_length)
        logits, _ = model(jnp.asarray(suffix), start + positions_from_mask(jnp.asarray(suffix_mask)), jnp.asarray(suffix_mask), shared)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref)[:, -t:], **VS_OTHER_ORDER)


def test_exported_model_stops_at_the_end_of_turn_in_transformers_generate(tmp_path):
    """export_hf writes generation_config.json and config.json ids: `generate` stops at <|im_end|>."""
    from kardia_jax.models.tokenizer import load_tokenizer, tokenizer_path  # pylint: disable=import-outside-toplevel

    tokenizer = load_tokenizer(tokenizer_path())
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
