"""Training checkpoints: one orbax CheckpointManager for the train state and the data iterator,
and the frozen parameters written once per run beside it (WORKDIR/frozen: they never change, so no
step checkpoint holds them).

Orbax writes each step into a temporary folder and renames it only when complete, so a crash
mid-save never leaves a checkpoint that restores wrong; restore reads only finished steps.
Arrays are restored straight onto the shardings of the abstract state they are given.
`workdir` may be a gs:// URL: orbax writes there itself, every host to the same place.
"""

from __future__ import annotations

import grain
import jax
import orbax.checkpoint as ocp

from recam_jax import convert, storage

FROZEN_FOLDER = "frozen"


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
    """Saves (asynchronously) if `step` is due or `force`, all of `state` but its frozen parameters
    (`save_frozen`); returns whether a save started."""
    return manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state.replace(frozen=None)), data=grain.checkpoint.CheckpointSave(data_iterator)))


def restore_latest(manager: ocp.CheckpointManager, abstract_state, data_iterator):
    """The latest finished checkpoint's state with the run's frozen parameters, on `abstract_state`'s
    shardings (None if there is no checkpoint); `data_iterator` is moved to the position saved with it."""
    step = manager.latest_step()
    if step is None:
        return None
    frozen = restore_frozen(manager, abstract_state.frozen)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state.replace(frozen=None)),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored.state.replace(frozen=frozen)


def _frozen_path(manager: ocp.CheckpointManager) -> str:
    return storage.join(str(manager.directory.parent), FROZEN_FOLDER)  # beside WORKDIR/checkpoints


def save_frozen(manager: ocp.CheckpointManager, frozen) -> None:
    """Writes the frozen parameters of a run that starts (replacing those of a start that crashed
    before its first checkpoint), and waits for them: a step checkpoint needs them to restore."""
    if jax.tree.leaves(frozen):
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(_frozen_path(manager), frozen, force=True)


def restore_frozen(manager: ocp.CheckpointManager, abstract_frozen):
    """The run's frozen parameters on `abstract_frozen`'s shardings, refused unless the stored ones have
    exactly its names, shapes and dtypes (orbax would silently cast, e.g. after `model.frozen_in_compute_dtype`
    or `trainable` changed between restarts)."""
    path = _frozen_path(manager)
    describe = lambda array: f"{tuple(array.shape)} {jax.numpy.dtype(array.dtype).name}"
    wanted = {p: describe(v) for p, v in abstract_frozen.flat_state()}
    if not storage.exists(path):
        if wanted:
            raise FileNotFoundError(f"{path}: missing: the run's checkpoints need the frozen parameters written there")
        return abstract_frozen
    stored = {p: describe(s) for p, s in convert.stored_param_shapes(path).items()}
    if stored != wanted:
        show = lambda p: ".".join(map(str, p))
        differences = [f"{show(p)}: stored {stored.get(p, 'nothing')}, config {wanted.get(p, 'nothing')}"
                       for p in sorted(stored.keys() | wanted.keys(), key=show) if stored.get(p) != wanted.get(p)]
        raise ValueError(f"{path}: the frozen parameters stored for this run do not match the config "
                         f"(trainable, model.*): {len(differences)} differ: " + "; ".join(differences[:5]))
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path, abstract_frozen)
