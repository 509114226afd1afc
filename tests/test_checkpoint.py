"""The checkpoint manager on a toy state and data iterator: which steps it keeps, what it restores (seconds)."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from recam_jax import checkpoint


def data_iterator():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


@struct.dataclass
class ToyState:
    """A train state's shape for the manager: arrays, and frozen parameters (none here) kept apart."""
    w: jax.Array
    step: jax.Array
    frozen: nnx.State


def state_at(step):
    return ToyState(w=jnp.full((4,), float(step)), step=jnp.asarray(step), frozen=nnx.State({}))


def save_steps(manager, steps, iterator, force_last=False):
    started = []
    for step in steps:
        next(iterator)  # one batch consumed per step
        if force_last and step == steps[-1]:
            started.append(checkpoint.save(manager, step, state_at(step), iterator, force=True))
        else:
            started.append(checkpoint.save(manager, step, state_at(step), iterator))  # due steps only
    manager.wait_until_finished()
    return started


def test_saves_only_due_steps_keeps_the_last_and_the_periodic_ones(tmp_path):
    manager = checkpoint.make_manager(str(tmp_path), every=2, keep_last=2, keep_every=4)
    started = save_steps(manager, list(range(1, 12)), data_iterator(), force_last=True)
    assert started == [step % 2 == 0 or step == 11 for step in range(1, 12)]
    assert manager.all_steps() == [4, 8, 10, 11]  # periodic 4 and 8, then the last two
    assert (tmp_path / "checkpoints").is_dir()


def test_without_keep_every_only_the_last_remain(tmp_path):
    manager = checkpoint.make_manager(str(tmp_path), every=1, keep_last=2, keep_every=0)
    save_steps(manager, [1, 2, 3, 4], data_iterator())
    assert manager.all_steps() == [3, 4]


def test_restore_latest_returns_the_last_state_on_the_given_shardings_and_moves_the_iterator_there(tmp_path):
    manager = checkpoint.make_manager(str(tmp_path), every=3, keep_last=5, keep_every=0)
    assert checkpoint.restore_latest(manager, jax.eval_shape(lambda: state_at(0)), data_iterator()) is None
    save_steps(manager, [1, 2, 3, 4, 5, 6, 7], data_iterator())
    resumed = data_iterator()
    fresh = checkpoint.make_manager(str(tmp_path), every=3, keep_last=5, keep_every=0)  # a restarted run
    split = NamedSharding(Mesh(np.array(jax.devices()[:4]), ("x",)), PartitionSpec("x"))  # saved whole on one device
    target = jax.eval_shape(lambda: state_at(0)).replace(w=jax.ShapeDtypeStruct((4,), jnp.float32, sharding=split))
    restored = checkpoint.restore_latest(fresh, target, resumed)
    assert restored.w.sharding == split
    np.testing.assert_array_equal(restored.w, np.full((4,), 6.0))
    assert int(restored.step) == 6
    assert next(resumed) == 6  # six elements were consumed before the step-6 save


def test_a_save_cut_short_is_removed_and_the_last_finished_step_restored(tmp_path):
    manager = checkpoint.make_manager(str(tmp_path), every=2, keep_last=3, keep_every=0)
    save_steps(manager, [1, 2], data_iterator())
    partial = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1700000000"  # orbax's name while writing step 4
    partial.mkdir()
    (partial / "state").write_text("half written")
    restarted = checkpoint.make_manager(str(tmp_path), every=2, keep_last=3, keep_every=0)
    assert restarted.latest_step() == 2
    assert int(checkpoint.restore_latest(restarted, jax.eval_shape(lambda: state_at(0)), data_iterator()).step) == 2
    checkpoint.save(restarted, 4, state_at(4), data_iterator())  # orbax removes stale folders by its first save
    restarted.wait_until_finished()
    assert not partial.exists() and restarted.all_steps() == [2, 4]
