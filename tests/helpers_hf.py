"""Tiny random Hugging Face models for reference tests (torch CPU, offline, float32).

    model, path = make_hf_model("qwen3", tmp_path, seed=0, tie_word_embeddings=True)
    ref = hf_logits(model, tokens, mask)           # [B, T, V] float32 numpy, left padding handled

`make_hf_model` builds a transformers model from a small config (hidden 64, 2 layers, vocab 256), adds
noise to *every* parameter (norm weights and biases included, so a wrong RMSNorm offset or a dropped
bias changes the logits), and saves it as safetensors under `tmp_path`. The families' defaults cover the
attention layouts kardia_jax must handle: Qwen2 GQA 2:1 with q/k/v biases, Qwen3 GQA with q/k norms and
head_dim != hidden / heads, Gemma MQA (one KV head) with embedding scaling and (1 + w) norms.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

# Per-family tiny configs; keyword arguments of `make_hf_model` override them.
TINY_HF_CONFIGS = {
    "qwen2": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA 2:1
        max_position_embeddings=512,
        rope_theta=10_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_sliding_window=False,
    ),
    "qwen3": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA 2:1
        head_dim=32,  # != hidden_size / num_attention_heads = 16
        max_position_embeddings=512,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_bias=False,
        use_sliding_window=False,
    ),
    "gemma": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,  # MQA
        head_dim=16,
        max_position_embeddings=512,
        rope_theta=10_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh",
    ),
}

FAMILIES = tuple(TINY_HF_CONFIGS)


def hf_config(family: str, **overrides):
    """A transformers config object for a tiny `family` model ("qwen2", "qwen3", "gemma")."""
    import transformers

    if family not in TINY_HF_CONFIGS:
        raise KeyError(f"make_hf_model: unknown family {family!r}; known: {FAMILIES}.")
    kwargs = TINY_HF_CONFIGS[family] | overrides
    rope_theta = kwargs.pop("rope_theta")
    kwargs.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": rope_theta})
    cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config, "gemma": transformers.GemmaConfig}
    return cls[family](**kwargs)


def make_hf_model(family: str, tmp_path, seed: int = 0, noise: float = 0.1, **config):
    """(torch model in eval mode, local directory with config.json + model.safetensors).

    Weights: transformers' initialisation (std `initializer_range`, 0.1 by default here so attention and
    logits are far from uniform) plus N(0, noise^2) on every parameter. Deterministic in `seed`.
    Each call writes to a fresh sub-directory of `tmp_path`.
    """
    import torch
    import transformers

    config.setdefault("initializer_range", 0.1)
    cfg = hf_config(family, **config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):  # tied weights appear once
            param.add_(noise * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    model.eval()
    path = tempfile.mkdtemp(prefix=f"hf-{family}-", dir=os.fspath(tmp_path))
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Same as kardia_jax.models.positions_from_mask, in numpy: [B, T] -> [B, T] int (pads get 0)."""
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int64)


def left_padded_batch(
    vocab_size: int, lengths, total: int, seed: int = 0, pad_id: int = 0, low: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """tokens, mask [B, total] int32: row i holds lengths[i] random tokens in [low, vocab) on the right."""
    rng = np.random.default_rng(seed)
    tokens = np.full((len(lengths), total), pad_id, np.int32)
    mask = np.zeros((len(lengths), total), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, total - n :] = rng.integers(low, vocab_size, n)
        mask[i, total - n :] = 1
    return tokens, mask


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Float32 logits [B, T, V] of a torch HF model, with explicit position ids for left padding."""
    import torch

    tokens, mask = np.array(tokens, np.int64), np.array(mask, np.int64)  # writable copies for torch
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(tokens),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions_from_mask(mask)),
        )
    return out.logits.float().numpy()
