"""Models: one NNX decoder for Qwen2/2.5, Qwen3 and Gemma; presets; HF weights in and out; tokenizers."""

from kardia_jax.models.config import PRESETS, ModelConfig, from_hf_config, preset, to_hf_config
from kardia_jax.models.decoder import Decoder, chunked_logprobs, fan_out_prefix, fused_token_loss, init_cache, positions_from_mask, rope_tables
from kardia_jax.models.weights import from_pretrained, resize_vocab, save_pretrained

__all__ = [
    "PRESETS",
    "Decoder",
    "ModelConfig",
    "chunked_logprobs",
    "fan_out_prefix",
    "from_hf_config",
    "fused_token_loss",
    "from_pretrained",
    "init_cache",
    "positions_from_mask",
    "preset",
    "resize_vocab",
    "rope_tables",
    "save_pretrained",
    "to_hf_config",
]
