"""kardia_jax.models.decoder against Hugging Face transformers (torch CPU), on tiny random models.

Covers: logits vs transformers for Qwen2 (GQA, biases, tied and untied), Qwen3 (q/k norm, head_dim !=
D/H) and Gemma (MQA, embedding scale, 1 + w norms) with left padding; the forward on an 8-device
(fsdp=4, tensor=2) mesh; bfloat16 parameters and compute; remat policies and unrolled layers. (The KV
cache: tests/test_attention.py; log-probabilities: tests/test_logprobs.py; checkpoints:
tests/test_weights.py.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers_float import assert_trees_close
from helpers_hf import hf_logits, left_padded_batch
from helpers_models import MODELS, T, VS_OTHER_ORDER, count_remat, forward, loss_grads, next_targets
from kardia_jax.models import from_pretrained, positions_from_mask
from kardia_jax.sharding import make_mesh


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_transformers(zoo, padded_batch, name):
    torch_model, path = zoo(name)
    tokens, mask = padded_batch
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


# bf16 tolerance: parameters and activations rounded to 8 mantissa bits (relative step 2^-8) through 2
# layers. On these logits (std ~0.7, |max| ~3) the observed error vs float32 is <= 0.1 max abs and
# <= 0.014 mean abs (transformers' own bf16 forward is as far off); we allow 0.2 max and 0.025 mean.
BF16_MAX_ABS, BF16_MEAN_ABS = 0.2, 0.025


@pytest.mark.parametrize("name", ["qwen3", "gemma"])
def test_bfloat16_params_and_compute(zoo, padded_batch, name):
    path = zoo(name)[1]
    tokens, mask = padded_batch
    model = from_pretrained(path, param_dtype="bfloat16", dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(model)))
    logits = np.asarray(forward(model, tokens, mask))
    assert logits.dtype == np.float32
    expected = np.asarray(forward(from_pretrained(path), tokens, mask))
    valid = mask.astype(bool)
    err = np.abs(logits[valid] - expected[valid])
    assert np.isfinite(logits).all()
    assert err.max() < BF16_MAX_ABS and err.mean() < BF16_MEAN_ABS, (err.max(), err.mean())


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_policies_same_gradients(zoo, padded_batch, remat):
    path = zoo("qwen2")[1]
    tokens, mask = padded_batch
    targets = next_targets(tokens)
    plain, rematted = from_pretrained(path), from_pretrained(path, remat=remat)
    assert count_remat(rematted, tokens, mask, targets) > count_remat(plain, tokens, mask, targets)
    value, grads = loss_grads(plain, tokens, mask, targets)
    value_r, grads_r = loss_grads(rematted, tokens, mask, targets)
    np.testing.assert_allclose(value_r, value, rtol=1e-6)
    assert_trees_close(grads_r, grads)  # recomputed activations may be fused and summed in another order


def test_unrolled_layers_same_loss_and_gradients(zoo, padded_batch):
    """scan_layers=False (layers unrolled, no while loop in the program) is the same computation."""
    path = zoo("qwen2")[1]
    tokens, mask = padded_batch
    targets = next_targets(tokens)
    scanned, unrolled = from_pretrained(path), from_pretrained(path, scan_layers=False)
    program = lambda m: jax.jit(lambda: m.hidden_states(tokens, positions_from_mask(mask), mask)).lower().as_text()
    assert "while" in program(scanned) and "while" not in program(unrolled)
    value, grads = loss_grads(scanned, tokens, mask, targets)
    value_u, grads_u = loss_grads(unrolled, tokens, mask, targets)
    np.testing.assert_allclose(value_u, value, rtol=1e-6)
    assert_trees_close(grads_u, grads)  # another program: float32 accumulation error
