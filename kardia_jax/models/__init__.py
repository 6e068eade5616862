"""Models: one NNX decoder for Qwen2/2.5, Qwen3 and Gemma; presets; HF weights in and out; tokenizers.

  config     ModelConfig, presets, HF config.json in and out
  layers     RMSNorm, rotary tables, positions, `dense`
  attention  block attention and the KV cache (KVCache, KVBlock, init_cache, fan_out_prefix)
  decoder    the Decoder module (scanned or unrolled layers, prefill, decode, shared-prefix forwards)
  logprobs   target log-probabilities and the fused per-token loss, chunked over positions
  weights    safetensors in and out, resize_vocab
  loading    the policy / reference / judge loaders of the entry points; tokenizer: tokenizers
"""

from kardia_jax.models.attention import KVBlock, KVCache, fan_out_prefix, init_cache
from kardia_jax.models.config import PRESETS, ModelConfig, from_hf_config, preset, to_hf_config
from kardia_jax.models.decoder import Decoder
from kardia_jax.models.layers import positions_from_mask, rope_tables
from kardia_jax.models.logprobs import chunked_logprobs, fused_token_loss
from kardia_jax.models.weights import from_pretrained, resize_vocab, save_pretrained

__all__ = [
    "PRESETS",
    "Decoder",
    "KVBlock",
    "KVCache",
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
