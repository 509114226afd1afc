"""A few training steps give the same losses and parameters on every mesh as on one device.

The trainer draws one noise key per example, so the result does not depend on how the batch is
split; only the order of float32 reductions differs between meshes.
"""

import contextlib
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from recam_jax import sharding, train
from recam_jax.models import dit
from tests.conftest import tiny_config

STEPS = 3
TOLERANCE = 1e-5  # relative L2 error per parameter, float32


def run_steps(config, devices):
    """Per-step losses and the final train state of STEPS trainer steps on a mesh over `devices`."""
    mesh = train.make_mesh(config, devices)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules_for(config.sharding_rules)):
        step_fn, _, _, shardings, data_sharding = train.compile_step(config, mesh)
        state = jax.device_put(train.init_fn(config)(), shardings)
        batches = train.make_data_iterator(config, data_sharding)
        losses = []
        for _ in range(STEPS):
            state, metrics = step_fn(state, train.to_global(next(batches), data_sharding, config))
            losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state)


def mesh_config(sizes, attention):
    """The tiny float32 config on a mesh (unset axes 1); guard off, as tiny's small vectors stay whole."""
    fields = {f"mesh.{axis}": sizes.get(axis, 1) for axis in sharding.MESH_AXES}
    return tiny_config(**fields, **{"model.attention": attention, "max_unsharded_fraction": 1.0})


@contextlib.contextmanager
def tiny_heads(num_heads):
    """The tiny DiT variant with `num_heads` heads (dim 64 stays), e.g. 8 for ulysses on context 8."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(dit.VARIANTS, "tiny", {**dit.VARIANTS["tiny"], "num_heads": num_heads})
        yield


@functools.cache
def reference(num_heads):
    """The single-device run with `xla` attention."""
    with tiny_heads(num_heads):
        return run_steps(mesh_config({}, "xla"), jax.devices()[:1])


def relative_error(got, want) -> float:
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@pytest.mark.parametrize("sizes, attention, num_heads", [
    ({"data": 8}, "xla", 4),
    ({"fsdp": 8}, "xla", 4),
    ({"data": 2, "fsdp": 2, "context": 2}, "ring", 4),
    ({"context": 4, "tensor": 2}, "ring", 4),
    ({"context": 8}, "ring", 4),
    ({"context": 8}, "ulysses", 8),  # ulysses needs heads divisible by the context size
])
def test_steps_on_mesh_match_one_device(sizes, attention, num_heads):
    want_losses, want_state = reference(num_heads)
    with tiny_heads(num_heads):
        losses, state = run_steps(mesh_config(sizes, attention), jax.devices())
    assert relative_error(losses, want_losses) <= TOLERANCE, (losses, want_losses)
    errors = {jax.tree_util.keystr(path): relative_error(np.asarray(got), np.asarray(want))
              for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(state.trainable)[0],
                                           jax.tree.leaves(want_state.trainable), strict=True)}
    assert max(errors.values()) <= TOLERANCE, sorted(errors.items(), key=lambda e: -e[1])[:3]
    assert int(state.step) == STEPS
