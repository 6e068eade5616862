"""Tests for kardia_jax.checkpoints: round trip, retention, resharding, crash safety, preemption."""

import os
import shutil
import signal

import grain
import grain.python
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from kardia_jax.checkpoints import Checkpointer, PreemptionGuard
from kardia_jax.sharding import make_mesh


def _sharded_params(mesh):
    """Params on `mesh`: a matrix split over fsdp and tensor, a replicated bias. [16, 8], [8]."""
    kernel = jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8)
    return {
        "dense": {
            "kernel": jax.device_put(kernel, NamedSharding(mesh, PartitionSpec("fsdp", "tensor"))),
            "bias": jax.device_put(jnp.linspace(-1, 1, 8), NamedSharding(mesh, PartitionSpec())),
        }
    }


def _abstract(tree, sharding_for):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_for(x)), tree)


def _assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def _one_adamw_step(params):
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _dataset_iterator():
    """A Grain `DatasetIterator` (what the pipelines give; its state is a dict) over 0..39."""
    return iter(grain.MapDataset.range(40).shuffle(seed=1).to_iter_dataset())


def _data_loader_iterator():
    """A Grain `DataLoaderIterator` (its state is bytes) over 0..39."""
    sampler = grain.python.IndexSampler(40, grain.python.NoSharding(), shuffle=True, num_epochs=1, seed=1)
    return iter(grain.python.DataLoader(data_source=grain.python.RangeDataSource(0, 40, 1), sampler=sampler,
                                        worker_count=0))


@pytest.mark.parametrize("make_iterator", [_dataset_iterator, _data_loader_iterator], ids=["dict", "bytes"])
def test_round_trip_everything(tmp_path, make_iterator):
    mesh = make_mesh(fsdp=4, tensor=2)
    params, opt_state = _one_adamw_step(_sharded_params(mesh))
    rng = jax.random.split(jax.random.key(3))[1]
    metadata = {"model": "tiny", "lr": 1e-4, "rules": [["embed", "fsdp"]]}
    iterator = make_iterator()
    for _ in range(17):
        next(iterator)

    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.save(7, params, opt_state, data_iterator=iterator, rng=rng, metadata=metadata)
        ahead = [next(iterator) for _ in range(3)]  # read after `save` returned: not in the checkpoint
        ckpt.wait_until_finished()
        resumed = make_iterator()
        restored = ckpt.restore_latest(
            _abstract(params, lambda x: x.sharding), _abstract(opt_state, lambda x: x.sharding), data_iterator=resumed
        )

    assert restored.step == 7
    _assert_trees_equal(restored.params, params)
    _assert_trees_equal(restored.opt_state, opt_state)
    assert restored.opt_state[0].count == 1
    assert [next(resumed) for _ in range(3)] == ahead  # the restored iterator continues where it was saved
    saved = os.listdir(tmp_path / "ckpt" / "7" / "data_iterator")
    assert [name for name in saved if name.endswith(".json")] == ["process_0-of-1.json"]  # one per process
    assert restored.metadata == metadata
    assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(rng))
    assert restored.params["dense"]["kernel"].sharding == params["dense"]["kernel"].sharding


def test_nnx_state_and_raw_key_round_trip(tmp_path):
    model = nnx.Linear(4, 6, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    abstract = nnx.state(nnx.eval_shape(lambda: nnx.Linear(4, 6, rngs=nnx.Rngs(1))), nnx.Param)
    device = SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)

    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, params, rng=jax.random.PRNGKey(5))
        restored = ckpt.restore_latest(abstract)

    assert isinstance(restored.params, nnx.State)
    assert isinstance(jax.tree.leaves(abstract)[0], jax.ShapeDtypeStruct)  # The target is left untouched.
    fresh = nnx.Linear(4, 6, rngs=nnx.Rngs(1))
    nnx.update(fresh, restored.params)
    np.testing.assert_array_equal(fresh.kernel[...], model.kernel[...])
    np.testing.assert_array_equal(restored.rng, jax.random.PRNGKey(5))
    assert restored.opt_state is None and restored.metadata == {}
    assert not os.path.exists(tmp_path / "1" / "data_iterator")  # no iterator given, none saved


def test_restore_onto_another_mesh(tmp_path):
    params = _sharded_params(make_mesh(fsdp=4, tensor=2))
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, params)
        ckpt.wait_until_finished()

        fsdp8 = make_mesh(fsdp=8)
        on_fsdp8 = NamedSharding(fsdp8, PartitionSpec("fsdp"))
        restored = ckpt.restore_latest(_abstract(params, lambda x: on_fsdp8))
        _assert_trees_equal(restored.params, params)
        assert all(leaf.sharding == on_fsdp8 for leaf in jax.tree.leaves(restored.params))
        kernel_shards = restored.params["dense"]["kernel"].addressable_shards
        assert len(kernel_shards) == 8 and kernel_shards[0].data.shape == (2, 8)

        one_device = SingleDeviceSharding(jax.devices()[5])
        restored = ckpt.restore_latest(_abstract(params, lambda x: one_device))
        _assert_trees_equal(restored.params, params)
        assert all(leaf.sharding == one_device for leaf in jax.tree.leaves(restored.params))


def test_interval_and_max_to_keep(tmp_path):
    params = {"w": jnp.zeros(3)}
    with Checkpointer(tmp_path, save_interval_steps=2, max_to_keep=2) as ckpt:
        saved = [ckpt.save(step, params) for step in range(1, 8)]
        assert saved == [False, True, False, True, False, True, False]
        assert ckpt.save(7, params, force=True)  # The final step, off the interval.
        assert not ckpt.save(7, params, force=True)  # Already there: not overwritten, no error.
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [6, 7]
    assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["6", "7"]


def test_no_checkpoint_returns_none(tmp_path):
    with Checkpointer(tmp_path / "empty") as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.restore_latest({"w": jax.ShapeDtypeStruct((3,), jnp.float32)}) is None


def test_unfinished_save_is_ignored(tmp_path):
    params = {"w": jnp.arange(4.0)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, params)
    # A crash while writing step 9: Orbax's temporary directory holds a (here: complete-looking) copy.
    shutil.copytree(tmp_path / "5", tmp_path / "9.orbax-checkpoint-tmp-1712345678")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [5]
        device = SingleDeviceSharding(jax.devices()[0])
        restored = ckpt.restore_latest(_abstract(params, lambda x: device))
    assert restored.step == 5


def test_errors_say_what_to_fix(tmp_path):
    params = {"w": jnp.arange(4.0)}
    device = SingleDeviceSharding(jax.devices()[0])
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, params)
        ckpt.wait_until_finished()
        with pytest.raises(ValueError, match="no sharding"):
            ckpt.restore_latest({"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
        with pytest.raises(ValueError, match="abstract_opt_state=None"):
            ckpt.restore_latest(_abstract(params, lambda x: device), _abstract(params, lambda x: device))
        with pytest.raises(FileNotFoundError, match="available steps"):
            ckpt.restore(2, _abstract(params, lambda x: device))
        with pytest.raises(ValueError, match="no data-iterator state"):
            ckpt.restore(1, _abstract(params, lambda x: device), data_iterator=_dataset_iterator())
        ckpt.save(3, params, data_iterator=_dataset_iterator(), force=True)
        ckpt.wait_until_finished()
        saved = tmp_path / "3" / "data_iterator"
        os.rename(saved / "process_0-of-1.json", saved / "process_0-of-2.json")  # as if from 2 processes
        with pytest.raises(FileNotFoundError, match="different number of processes"):
            ckpt.restore(3, _abstract(params, lambda x: device), data_iterator=_dataset_iterator())
        with pytest.raises(TypeError, match="JSON-serializable"):
            ckpt.save(2, params, metadata={"dtype": jnp.float32}, force=True)
        with pytest.raises(TypeError, match="rng="):
            ckpt.save(2, {"w": params["w"], "key": jax.random.key(0)}, force=True)


def test_sigterm_requests_a_save(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as preemption:
        assert not preemption.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.reached(2)
        assert preemption.signal_received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous
