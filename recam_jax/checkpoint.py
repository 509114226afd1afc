"""Training checkpoints: one orbax CheckpointManager for the train state and the data iterator.

Orbax writes each step into a temporary folder and renames it only when complete, so a crash
mid-save never leaves a checkpoint that restores wrong; restore reads only finished steps.
Arrays are restored straight onto the shardings of the abstract state they are given.
`workdir` may be a gs:// URL: orbax writes there itself, every host to the same place.
"""

from __future__ import annotations

import grain
import orbax.checkpoint as ocp

from recam_jax import storage


def make_manager(workdir: str, *, every: int, keep_last: int, keep_every: int) -> ocp.CheckpointManager:
    """Async saves every `every` steps; keeps the last `keep_last` and every `keep_every`-th step."""
    options = ocp.CheckpointManagerOptions(
        # Only every `every`-th step (and forced saves): orbax's default policy would also save the
        # first step of a run that has no checkpoint yet (its InitialSavePolicy).
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every),
        max_to_keep=keep_last,
        keep_period=keep_every or None,
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,  # a save cut short by a crash is removed, never restored
        create=True,
    )
    return ocp.CheckpointManager(storage.join(storage.absolute(workdir), "checkpoints"), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, *, force: bool = False) -> bool:
    """Saves (asynchronously) if `step` is due or `force`; returns whether a save started."""
    return manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)))


def restore_latest(manager: ocp.CheckpointManager, abstract_state, data_iterator):
    """The latest finished checkpoint's state on `abstract_state`'s shardings (None if there is
    none); `data_iterator` is moved to the position saved with it."""
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored.state
