"""kardia_jax.models.layers: the rotary tables against transformers'."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from kardia_jax.models import rope_tables


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
