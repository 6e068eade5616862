"""kardia_jax.models.layers: the rotary tables against transformers'; the embedding lookup on a mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from helpers_float import assert_trees_close
from jax.sharding import PartitionSpec

from kardia_jax import sharding
from kardia_jax.models import rope_tables
from kardia_jax.models.layers import embedding_lookup
from kardia_jax.sharding import make_mesh


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


def test_embedding_lookup_on_a_mesh_equals_take_and_its_gradient_stays_sharded_like_the_table():
    """`embedding_lookup` on a data 1 x fsdp 4 x tensor 2 mesh: its rows equal jnp.take's (exactly: a
    lookup sums nothing); its gradient (a custom VJP that scatter-adds into the table's own shards) equals
    jnp.take's autodiff gradient, ids repeated within and across batch rows, within float32 accumulation;
    and that gradient comes out sharded as the parameter is (vocab over tensor, embed over fsdp)."""
    vocab, dim = 64, 16
    table = jax.random.normal(jax.random.key(0), (vocab, dim), jnp.float32)
    tokens = jax.random.randint(jax.random.key(1), (8, 12), 0, 8)  # 96 ids of 8 values: many repeats
    weights = jax.random.normal(jax.random.key(2), (8, 12, dim), jnp.float32)
    loss = lambda lookup: lambda t: jnp.sum(jnp.sin(lookup(t)) * weights)
    want_rows = jnp.take(table, tokens, axis=0)
    want_grad = jax.grad(loss(lambda t: jnp.take(t, tokens, axis=0)))(table)

    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    param = jax.device_put(table, sharding.named_sharding(("vocab", "embed"), table.shape, sharding.DEFAULT_RULES, mesh))
    ids = jax.device_put(tokens, sharding.named_sharding(("activation_batch", None), tokens.shape,
                                                          sharding.DEFAULT_RULES, mesh))
    ours = lambda t: embedding_lookup(t, ids, jnp.float32, sharding.DEFAULT_RULES)
    with jax.set_mesh(mesh):
        rows = jax.jit(ours)(param)
        grad = jax.jit(jax.grad(loss(ours)))(param)
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(want_rows))
    assert_trees_close(grad, want_grad)
    assert grad.sharding.spec == param.sharding.spec == PartitionSpec("tensor", "fsdp")
    assert float(jnp.abs(grad[8:]).max()) == 0.0  # ids never looked up get no gradient
