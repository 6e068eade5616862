"""kardia_jax.models.config: presets through HF config.json and back, and the families' layouts read from
HF checkpoints."""

from __future__ import annotations

import json

import pytest
import transformers

from kardia_jax.models import PRESETS, from_hf_config, from_pretrained, to_hf_config


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
