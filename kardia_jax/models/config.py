"""Decoder hyper-parameters for the Qwen2/2.5, Qwen3 and Gemma (v1) families, presets, and the
translation to and from Hugging Face `config.json`.

One `ModelConfig` describes every supported model; the family only decides a handful of switches
(biases on q/k/v, per-head q/k norm, activation, embedding scale, RMSNorm offset, tied embeddings).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

FAMILIES = ("qwen2", "qwen3", "gemma")

# Hugging Face `architectures[0]` / `model_type` -> family.
HF_ARCHITECTURES = {
        "Qwen2ForCausalLM": "qwen2",
        "Qwen3ForCausalLM": "qwen3",
        "GemmaForCausalLM": "gemma",
}
HF_MODEL_TYPES = {"qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma"}

# Remat (activation checkpointing) policies for the scanned layer, by config name.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder. Sizes: D = hidden_size, H = num_heads, K = num_kv_heads,
    Dh = head_dim, F = intermediate_size, V = vocab_size, L = num_layers."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    max_position_embeddings: int = 32_768
    # Numerics, memory and compilation knobs (not architecture): parameter storage dtype,
    # activation/matmul dtype, the remat policy of a layer, and whether cache-free forwards (training)
    # run the layers in a `lax.scan` (compile time flat in depth) or unrolled (no stacking of per-layer
    # residuals for the backward: faster for a few layers on CPU, compile time grows with depth).
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family={self.family!r}: expected one of {FAMILIES}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                    f"ModelConfig: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}."
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat={self.remat!r}: expected one of {REMAT_POLICIES}.")
        for key in ("param_dtype", "dtype"):
            if getattr(self, key) not in DTYPES:
                raise ValueError(f"ModelConfig.{key}={getattr(self, key)!r}: expected one of {tuple(DTYPES)}.")

    # Family switches ------------------------------------------------------------------------------
    @property
    def qkv_bias(self) -> bool:
        return self.family == "qwen2"

    @property
    def qk_norm(self) -> bool:
        return self.family == "qwen3"

    @property
    def activation(self) -> str:
        return "gelu_tanh" if self.family == "gemma" else "silu"

    @property
    def scale_embeddings(self) -> bool:
        return self.family == "gemma"

    @property
    def norm_offset(self) -> float:
        """Gemma's RMSNorm multiplies by (1 + weight); the others by weight."""
        return 1.0 if self.family == "gemma" else 0.0

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        d, f, v, l = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = d * (q_out + 2 * kv_out) + q_out * d + 3 * d * f + 2 * d
        per_layer += (q_out + 2 * kv_out) if self.qkv_bias else 0
        per_layer += 2 * self.head_dim if self.qk_norm else 0
        return l * per_layer + v * d * (1 if self.tie_embeddings else 2) + d


# Presets: the real dimensions of the backbones used by Kardia-R1 (and the judge), plus tiny ones.
PRESETS: dict[str, ModelConfig] = {
        "qwen2.5-0.5b": ModelConfig("qwen2", 151_936, 896, 24, 14, 2, 64, 4864, 1_000_000.0, 1e-6, True),
        "qwen2.5-3b": ModelConfig("qwen2", 151_936, 2048, 36, 16, 2, 128, 11_008, 1_000_000.0, 1e-6, True),
        "qwen2.5-7b": ModelConfig("qwen2", 152_064, 3584, 28, 28, 4, 128, 18_944, 1_000_000.0, 1e-6, False),
        "qwen3-8b": ModelConfig("qwen3", 151_936, 4096, 36, 32, 8, 128, 12_288, 1_000_000.0, 1e-6, False, 40_960),
        "gemma-2b": ModelConfig("gemma", 256_000, 2048, 18, 8, 1, 256, 16_384, 10_000.0, 1e-6, True, 8192),
        "gemma-7b": ModelConfig("gemma", 256_000, 3072, 28, 16, 16, 256, 24_576, 10_000.0, 1e-6, True, 8192),
        # Tiny presets for tests and the CPU demo (GQA 2:1 for Qwen, MQA for Gemma like gemma-2b).
        "tiny-qwen2": ModelConfig("qwen2", 4096, 64, 2, 4, 2, 16, 128, 10_000.0, 1e-6, False),
        "tiny-qwen3": ModelConfig("qwen3", 4096, 64, 2, 4, 2, 32, 128, 1_000_000.0, 1e-6, True),
        "tiny-gemma": ModelConfig("gemma", 4096, 64, 2, 4, 1, 16, 128, 10_000.0, 1e-6, True),
        # The CPU demo's policy: ~1.3M parameters; its 2176 embedding rows cover the shipped 1,872-id
        # tokenizer (the ids past it map to no text; SFT drives their probability down).
    "tiny-kardia": ModelConfig("qwen2", 2176, 128, 4, 4, 2, 32, 384, 10_000.0, 1e-6, True),
    # The workload of the sampler / GRPO benchmarks ("bench-tiny").
        "bench-tiny": ModelConfig("qwen2", 8192, 256, 4, 4, 2, 64, 1024, 10_000.0, 1e-6, False),
}


# The preset of each hub checkpoint the configs name: what an ahead-of-time compile builds instead of
# reading the checkpoint (`config.model.architecture`; `tests/test_aot.py` checks the entries are presets).
HUB_ARCHITECTURES = {
    "Qwen/Qwen2.5-0.5B-Instruct": "qwen2.5-0.5b",
    "Qwen/Qwen2.5-3B-Instruct": "qwen2.5-3b",
    "Qwen/Qwen2.5-7B-Instruct": "qwen2.5-7b",
    "Qwen/Qwen3-8B": "qwen3-8b",
    "google/gemma-2b-it": "gemma-2b",
    "google/gemma-7b-it": "gemma-7b",
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"Unknown model preset {name!r}; known presets: {sorted(PRESETS)}.")
    return PRESETS[name].replace(**overrides)


# Hugging Face config.json <-> ModelConfig ----------------------------------------------------------


def family_from_hf(hf: dict[str, Any], where: str = "config.json") -> str:
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[arch]
    if hf.get("model_type") in HF_MODEL_TYPES:
        return HF_MODEL_TYPES[hf["model_type"]]
    raise ValueError(
            f"{where}: unsupported architecture {archs or hf.get('model_type')!r}. kardia_jax supports "
            f"{sorted(HF_ARCHITECTURES)} (model_type {sorted(HF_MODEL_TYPES)})."
    )


def from_hf_config(hf: dict[str, Any], where: str = "config.json", **overrides) -> ModelConfig:
    """ModelConfig from a parsed Hugging Face config.json (transformers v4 or v5 layout)."""
    family = family_from_hf(hf, where)
    if family != "qwen2" and hf.get("attention_bias"):
        raise ValueError(f"{where}: attention_bias=true is not supported for {family} (its q/k/v/o biases would be ignored).")
    if hf.get("use_sliding_window"):
        raise ValueError(f"{where}: use_sliding_window=true is not supported; set it to false.")
    rope = hf.get("rope_parameters") or {}
    rope_scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope_scaling.get("rope_type", rope_scaling.get("type", "default")))
    if rope_type != "default":
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported (only 'default').")
    try:
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        config = ModelConfig(
                family=family,
                vocab_size=hf["vocab_size"],
                hidden_size=hidden,
                num_layers=hf["num_hidden_layers"],
                num_heads=num_heads,
                num_kv_heads=hf.get("num_key_value_heads") or num_heads,
                head_dim=hf.get("head_dim") or hidden // num_heads,
                intermediate_size=hf["intermediate_size"],
                rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", family == "gemma")),
                max_position_embeddings=hf.get("max_position_embeddings", 32_768),
        )
    except KeyError as e:
        raise ValueError(f"{where}: missing key {e.args[0]!r} needed to build a {family} model.") from None
    return config.replace(**overrides)


def to_hf_config(config: ModelConfig, **extra) -> dict[str, Any]:
    """A config.json dict that `transformers.AutoConfig` reads back to the same architecture."""
    arch = {v: k for k, v in HF_ARCHITECTURES.items()}[config.family]
    hf = {
            "architectures": [arch],
            "model_type": config.family,
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads,
            "head_dim": config.head_dim,
            "hidden_act": "gelu_pytorch_tanh" if config.family == "gemma" else "silu",
            "max_position_embeddings": config.max_position_embeddings,
            "rms_norm_eps": config.rms_norm_eps,
            "tie_word_embeddings": config.tie_embeddings,
            "rope_theta": config.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
            "torch_dtype": config.param_dtype,
    }
    if config.family == "gemma":
        hf["hidden_activation"] = "gelu_pytorch_tanh"
    if config.family == "qwen3":
        hf["attention_bias"] = False
    if config.family == "qwen2":
        hf["use_sliding_window"] = False
    hf.update(extra)
    return hf
