"""The trainers' shared pieces (`kardia_jax.scaffold`, `kardia_jax.optim`): the group-aware minibatch split and
its inverse, and the optimizer state's layout."""

import jax
import numpy as np
import pytest

from kardia_jax import optim, scaffold, sharding
from kardia_jax.models import loading, preset


def test_minibatches_keep_groups_whole_and_deal_them_round_robin():
    """3 prompts' worth of groups per part: prompts [B] (groups of 1) and completions [N] (groups of G)
    split alike, group j into part j % k, and join_minibatches undoes the split."""
    b, g, k = 6, 3, 2
    prompts, completions = np.arange(b), np.arange(b * g)
    parts = scaffold.split_minibatches({"p": prompts, "c": completions}, k, num_groups=b)
    assert parts["p"].tolist() == [[0, 2, 4], [1, 3, 5]]
    for a in range(k):
        assert parts["c"][a].tolist() == [i * g + s for i in parts["p"][a] for s in range(g)]
    joined = scaffold.join_minibatches(parts, num_groups=b)
    np.testing.assert_array_equal(joined["p"], prompts)
    np.testing.assert_array_equal(joined["c"], completions)
    # Every row its own group (SFT): part a holds rows a, k + a, 2k + a, ...
    np.testing.assert_array_equal(scaffold.split_minibatches(np.arange(8), 4), np.arange(8).reshape(2, 4).T)
    with pytest.raises(ValueError, match="do not split into 4 minibatches"):
        scaffold.split_minibatches(completions, 4, num_groups=b)


def test_every_minibatch_is_spread_over_every_device():
    """On 8 devices (batch over data x fsdp), 16 prompts x 2 samples in k = 2 parts: each part's rows come from
    all 8 devices' blocks, and the jitted split keeps each part sharded over all of them (no part on 1/k)."""
    mesh = sharding.make_mesh(data=2, fsdp=4, tensor=1)
    b, g, k = 16, 2, 2
    rows_per_device = b * g // 8
    with jax.set_mesh(mesh):
        completions = scaffold.shard_batch({"c": np.arange(b * g, dtype=np.int32)}, mesh)["c"]
        parts = jax.jit(lambda x: scaffold.split_minibatches(x, k, num_groups=b, rules=sharding.DEFAULT_RULES))(
            completions)
    for a in range(k):
        assert {int(row) // rows_per_device for row in np.asarray(parts[a])} == set(range(8))
    assert parts.sharding.spec[:2] == (None, ("data", "fsdp"))  # [k, N/k]: each part's rows over all 8
    assert parts.sharding.shard_shape(parts.shape) == (k, b * g // k // 8)


def test_optimizer_state_is_sharded_like_the_params():
    """Adam's moments follow the params' shardings (a plain jit of optimizer.init puts them on one device)."""
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh):
        model = loading.init_model(preset("tiny-qwen2"), mesh, sharding.DEFAULT_RULES)
    params = scaffold.split_params(model)[1]
    optimizer = optim.make_optimizer(1e-3, 2, 10, 0.1, 1.0)
    state = optim.init_optimizer(optimizer, params)
    adam = state.inner[1][0]
    for moments in (adam.mu, adam.nu):
        jax.tree.map(lambda m, p: assert_same_sharding(m.sharding, p.sharding, m.ndim), moments, params)
    for count in (adam.count, state.consecutive, state.total):
        assert count.sharding.is_fully_replicated and len(count.sharding.device_set) == 8
    assert params["layers"]["q"].sharding.spec != jax.sharding.PartitionSpec()  # the check is not vacuous


def assert_same_sharding(a, b, ndim):
    assert a.is_equivalent_to(b, ndim), (a, b)


