"""Mesh, rules and shardings; the tiny DiT on 8 fake devices computes the single-device function.

Regenerate the golden parameter → PartitionSpec dump after an intended change of the model or the
rules with: `JAX_PLATFORMS=cpu python -m tests.test_sharding` (then review the diff of tests/golden/).
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from recam_jax import sharding, train
from recam_jax.models.dit import WanDiT, dit_config
from tests.conftest import tiny_config
from tests.test_attention import tpu_topology

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "dit_1.3B_param_specs.json")
TOLERANCE = 1e-5  # relative L2 error in float32


@functools.cache
def abstract_params(variant, scan_layers=True):
    """The nnx Param state of a DiT as shapes only (nothing allocated; ~15 s to trace the 1.3B)."""
    cfg = dit_config(variant, scan_layers=scan_layers)
    return nnx.state(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))), nnx.Param)


def spec_dump(abstract_state, rules=sharding.DEFAULT_RULES) -> dict[str, list]:
    """Parameter path → PartitionSpec entries (lists for JSON) under the rules."""
    specs = sharding.param_specs(abstract_state, rules)
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
    return {jax.tree_util.keystr(path): [list(a) if isinstance(a, tuple) else a for a in spec]
            for path, spec in flat}


# Mesh and processes


def test_make_mesh_fills_one_axis_and_names_all_four():
    mesh = sharding.make_mesh({"fsdp": -1, "tensor": 2})
    assert mesh.axis_names == sharding.MESH_AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "context": 1, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("sizes, message", [
    ({"fsdp": -1, "data": -1}, "at most one"), ({"data": 3}, "do not multiply"), ({"model": 8}, "unknown mesh axes")])
def test_make_mesh_rejects_bad_sizes(sizes, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(sizes)


def test_make_mesh_with_dcn_sizes_is_per_slice_times_slices():
    mesh = sharding.make_mesh({"fsdp": -1, "context": 2}, dcn_sizes={"data": 1})  # one CPU "slice"
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "context": 2, "tensor": 1}


def test_process_rows_refuses_a_batch_that_is_not_whole_rows_per_device():
    batch_sharding = sharding.batch_sharding(sharding.make_mesh({"data": 2, "fsdp": 2, "context": 2}))
    with pytest.raises(sharding.BatchLayoutError, match=r"batch_size=6 .*\('data', 'fsdp'\) \(4 shards\), "
                                                        r"so each device would hold 1.5 rows"):
        sharding.process_rows(batch_sharding, 6)


@pytest.mark.parametrize("spec", [PartitionSpec(), PartitionSpec(None), PartitionSpec("data"), PartitionSpec(("data",))])
def test_process_rows_reads_a_replicated_or_one_axis_batch(spec):
    """A replicated batch (no spec, or None) is loaded whole; one axis named alone or in a tuple splits it."""
    mesh = sharding.make_mesh({"data": 8})
    rows = sharding.process_rows(NamedSharding(mesh, spec), 8)
    assert list(rows) == [0] and list(rows[0]) == list(range(8))
    if spec and spec[0]:
        with pytest.raises(sharding.BatchLayoutError, match=r"\('data',\) \(8 shards\)"):
            sharding.process_rows(NamedSharding(mesh, spec), 4)


def test_make_mesh_uses_the_devices_it_is_given():
    devices = jax.devices()[4:6]
    assert list(sharding.make_mesh({"data": 2}, devices=devices).devices.flat) == devices


def test_unsharded_fraction_counts_elements_replicated_over_several_devices(caplog):
    two = sharding.make_mesh({"data": 2}, devices=jax.devices()[:2])
    state = {"split": jax.ShapeDtypeStruct((6,), jnp.float32), "whole": jax.ShapeDtypeStruct((2,), jnp.float32)}
    shardings = {"split": NamedSharding(two, PartitionSpec("data")), "whole": NamedSharding(two, PartitionSpec())}
    with caplog.at_level("INFO"):
        assert sharding.check_sufficiently_sharded(state, shardings, max_unsharded_fraction=0.25) == 0.25  # 2 of 8
    assert caplog.records[-1].getMessage() == "unsharded parameters: 25.00%"
    with pytest.raises(ValueError, match=r"25.0% of parameter elements are unsharded \(limit 24.0%\)"):
        sharding.check_sufficiently_sharded(state, shardings, max_unsharded_fraction=0.24)
    one = NamedSharding(sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]), PartitionSpec())
    assert sharding.check_sufficiently_sharded(state, {"split": one, "whole": one}) == 0.0  # one device: nothing to split
    scalar = {"w": jax.ShapeDtypeStruct((1,), jnp.float32)}
    assert sharding.check_sufficiently_sharded(scalar, {"w": shardings["whole"]}, max_unsharded_fraction=1.0) == 1.0


def test_the_unsharded_error_names_the_five_largest_arrays():
    two = sharding.make_mesh({"data": 2}, devices=jax.devices()[:2])
    state = {f"w{n}": jax.ShapeDtypeStruct((n,), jnp.float32) for n in range(1, 7)}
    replicated = {name: NamedSharding(two, PartitionSpec()) for name in state}
    with pytest.raises(ValueError, match=r"largest: \['w6'\] \(6\), \['w5'\] \(5\), \['w4'\] \(4\), "
                                         r"\['w3'\] \(3\), \['w2'\] \(2\)$"):
        sharding.check_sufficiently_sharded(state, replicated)


def test_make_mesh_keeps_fsdp_within_a_slice_and_data_across_slices():
    devices = tpu_topology("v5p:2x2x1", num_slices=2).devices
    mesh = sharding.make_mesh({"fsdp": -1}, dcn_sizes={"data": 2}, devices=devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices).reshape(2, 4)
    np.testing.assert_array_equal(slices, [[0] * 4, [1] * 4])


CLUSTER_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
                     "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri")


@pytest.fixture
def plain_host(monkeypatch):
    """This process's environment without any launcher's variables."""
    for name in CLUSTER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


SLURM_TASK = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[0-1]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
              "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("env, detected", [({}, False), (SLURM_TASK, True),
                                           ({"OMPI_MCA_orte_hnp_uri": "123.0;tcp://10.0.0.1:5000"}, True)])
def test_jax_cluster_detection_decides_from_the_environment(plain_host, env, detected):
    for name, value in env.items():
        plain_host.setenv(name, value)
    assert sharding.jax_detects_cluster() == detected
    calls = []
    assert sharding.maybe_initialize_distributed(initialize=lambda **kw: calls.append(kw)) == detected
    assert calls == [{}] * detected  # the layout is left to JAX's detection


def test_a_cloud_tpu_pod_found_by_jax_initialises_with_no_variables_set(plain_host):
    """On a TPU VM pod JAX finds the workers from the VM's metadata server, not the environment."""
    from jax._src.clusters import cloud_tpu_cluster

    plain_host.setattr(cloud_tpu_cluster.GceTpuCluster, "is_env_present", classmethod(lambda cls: True))
    calls = []
    assert sharding.maybe_initialize_distributed(initialize=lambda **kw: calls.append(kw))
    assert calls == [{}]


def test_hand_made_launch_passes_its_process_layout(plain_host):
    calls = []
    for name, value in {"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}.items():
        plain_host.setenv(name, value)
    assert sharding.maybe_initialize_distributed(initialize=lambda **kw: calls.append(kw), detect_cluster=lambda: False)
    assert calls == [{"num_processes": 2, "process_id": 1}]
    plain_host.setenv("JAX_PROCESS_ID", "one")
    with pytest.raises(ValueError, match=r"^JAX_COORDINATOR_ADDRESS is set: JAX_NUM_PROCESSES and JAX_PROCESS_ID must "
                                         r"both be set to integers, got '2' and 'one'$"):
        sharding.maybe_initialize_distributed(initialize=lambda **kw: None)


# Rules, parameter shardings and the guard


@pytest.mark.parametrize("variant", ["tiny", "1.3B"])
def test_rules_table_names_every_logical_axis_of_the_model(variant):
    names = sharding.logical_names(abstract_params(variant))
    assert {"layers", "embed", "heads", "mlp"} <= names <= {name for name, _ in sharding.DEFAULT_RULES}


def test_logical_names_skip_plain_arrays_and_read_every_variable():
    params = abstract_params("tiny")
    state = {"count": jax.ShapeDtypeStruct((), jnp.int32), "params": params}  # an optimizer count comes first
    assert sharding.logical_names(state) == sharding.logical_names(params) != set()


def test_a_rules_table_missing_a_logical_axis_of_the_params_is_refused():
    without_mlp = tuple(rule for rule in sharding.DEFAULT_RULES if rule[0] != "mlp")
    with pytest.raises(ValueError, match=r"\['mlp'\] are not in the rules table"):
        sharding.param_specs(abstract_params("tiny"), without_mlp)


def test_unknown_logical_name_is_an_error_not_a_mesh_axis():
    with nnx.logical_axis_rules(sharding.DEFAULT_RULES), pytest.raises(ValueError, match="act_time"):
        sharding.logical_to_spec(("act_batch", "act_time"))


def test_constrain_shards_by_the_rules_inside_a_mesh_and_is_a_no_op_outside():
    x = jnp.arange(32.0).reshape(8, 4)
    assert sharding.constrain(x, ("act_batch", None)) is x  # no mesh: single device
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with jax.set_mesh(mesh):
        assert sharding.constrain(x, ("act_batch", None)) is x  # a mesh but no rules
        with nnx.logical_axis_rules(sharding.DEFAULT_RULES):
            y = jax.jit(lambda x: sharding.constrain(x + 1, ("act_batch", "act_heads")))(x)
    assert y.sharding.spec == PartitionSpec(("data", "fsdp"), "tensor")
    np.testing.assert_array_equal(y, x + 1)


def test_rule_sets_replace_only_their_rows():
    rules = dict(sharding.rules_for("tensor_only"))
    assert rules["embed"] is None and rules["heads"] == "tensor" and rules["act_batch"] == ("data", "fsdp")
    with pytest.raises(ValueError, match="unknown rule set"):
        sharding.rules_for("zero")


def test_golden_param_specs_of_the_1_3B_model():
    with open(GOLDEN) as f:
        golden = json.load(f)
    assert spec_dump(abstract_params("1.3B")) == golden, "regenerate with `JAX_PLATFORMS=cpu python -m tests.test_sharding` if intended"


def test_stacked_blocks_are_sharded_like_one_block_and_whole_along_layers():
    stacked, unrolled = spec_dump(abstract_params("tiny")), spec_dump(abstract_params("tiny", scan_layers=False))
    per_block = {key.replace("['blocks'][1]", "['blocks']"): [None, *spec]
                 for key, spec in unrolled.items() if key.startswith("['blocks'][1]")}
    assert per_block and all(stacked[key] == spec for key, spec in per_block.items())
    assert {k: v for k, v in stacked.items() if k not in per_block} == {
        k: v for k, v in unrolled.items() if not k.startswith("['blocks']")}


def test_guard_passes_default_rules_and_rejects_replicated_params():
    state = abstract_params("1.3B")
    mesh = sharding.make_mesh({"fsdp": -1, "tensor": 2})
    assert sharding.check_sufficiently_sharded(state, sharding.param_shardings(state, mesh)) < 1e-6
    replicated = sharding.param_shardings(state, mesh, sharding.rules_for("replicated"))
    with pytest.raises(ValueError, match=r"100\.0% of parameter elements are unsharded.*ffn"):
        sharding.check_sufficiently_sharded(state, replicated)


def test_optimizer_state_is_sharded_like_its_parameters():
    def make():
        model = WanDiT(dit_config("tiny", dim=64, num_heads=8), rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

    model, optimizer = nnx.eval_shape(make)
    moments = nnx.state(optimizer)["opt_state"][0]
    assert spec_dump(moments["mu"]) == spec_dump(moments["nu"]) == spec_dump(nnx.state(model, nnx.Param))


def test_fsdp_context_rules_shard_parameters_and_moments_over_context_too():
    """`sharding_rules=fsdp_context` on an fsdp × context mesh (fsdp 4 × context 2 here, 8 CPU devices,
    the tiny model with the paper's frozen backbone): every parameter and Adam moment split over fsdp
    is split over context as well, so each device holds half the bytes of it that fsdp alone leaves."""
    mesh = sharding.make_mesh({"fsdp": 4, "context": 2})

    def state_layout(rules):
        config = tiny_config(**{"sharding_rules": rules, "trainable": "camera+self_attn", "mesh.data": 1,
                                "mesh.fsdp": 4, "mesh.context": 2})
        state = jax.eval_shape(train.init_fn(config))
        held = (state.trainable, state.frozen, state.opt_state)
        shardings = train.state_shardings(state, mesh, config)
        return jax.tree.leaves(held), jax.tree.leaves((shardings.trainable, shardings.frozen, shardings.opt_state))

    arrays, before = state_layout("default")
    _, after = state_layout("fsdp_context")
    mesh_axes = lambda s: jax.tree.leaves(tuple(s.spec))
    shard_bytes = lambda a, s: int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
    over_fsdp = [i for i, s in enumerate(before) if "fsdp" in mesh_axes(s)]
    assert len(over_fsdp) > len(arrays) / 2  # the frozen and trainable weights and both Adam moments
    for i in over_fsdp:
        assert "context" in mesh_axes(after[i])
        assert shard_bytes(arrays[i], after[i]) * 2 == shard_bytes(arrays[i], before[i])


def test_global_batch_shards_the_leading_axis_over_data_and_fsdp():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "context": 2})
    local = {"latents": np.arange(4 * 3, dtype=np.float32).reshape(4, 3), "t": np.arange(4.0)}
    batch_sharding = sharding.batch_sharding(mesh)
    rows = sharding.process_rows(batch_sharding, 4)
    np.testing.assert_array_equal(rows[0], np.arange(4))  # one process loads every row
    batch = sharding.global_batch(local, batch_sharding, rows[0], 4)
    assert batch["latents"].sharding.spec == PartitionSpec(("data", "fsdp"))
    np.testing.assert_array_equal(batch["latents"], local["latents"])
    assert len(batch["t"].addressable_shards) == 8  # each of 4 batch shards on both context devices


# The tiny DiT on meshes: same forward and gradients as one device


def dit_inputs(batch, frames, height, width, seed=0):
    """Latents, timesteps, text and camera poses (one per latent frame of a half)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, frames, height, width, 16)).astype(np.float32),
            rng.uniform(0, 1000, batch).astype(np.float32),
            rng.standard_normal((batch, 5, 32)).astype(np.float32),
            rng.standard_normal((batch, frames // 2, 12)).astype(np.float32))


def random_dit(attention):
    """One-block tiny DiT (8 heads) with every parameter perturbed, so the camera modules are not a no-op."""
    cfg = dit_config("tiny", dim=64, num_heads=8, num_layers=1, dtype="float32", attention=attention)
    model = WanDiT(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    keys = jax.random.split(jax.random.key(1), len(jax.tree.leaves(state)))
    noise = jax.tree.unflatten(jax.tree.structure(state),
                               [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, jax.tree.leaves(state))])
    nnx.update(model, jax.tree.map(jnp.add, state, noise))
    return model


def loss_and_grads(graphdef, state, inputs):
    """A simple loss of the prediction, its parameter gradients, and the prediction."""
    def loss(state):
        prediction = nnx.merge(graphdef, state)(*inputs)
        return jnp.mean(jnp.sin(prediction)), prediction
    (value, prediction), grads = jax.value_and_grad(loss, has_aux=True)(state)
    return value, grads, prediction


def run_on_mesh(attention, sizes, inputs):
    """Params and inputs placed by the rules, the step jitted inside the mesh context."""
    graphdef, state = nnx.split(random_dit(attention))
    mesh = sharding.make_mesh(sizes)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        shardings = sharding.param_shardings(state, mesh)
        state = jax.device_put(state, shardings)
        step = jax.jit(loss_and_grads, static_argnums=0, out_shardings=(None, shardings, None))
        batch_sharding = sharding.batch_sharding(mesh)
        rows = np.arange(len(inputs[0]))
        return step(graphdef, state, sharding.global_batch(inputs, batch_sharding, rows, len(rows)))


def relative_error(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


GRIDS = {"even": (8, 4, 4, 6), "odd": (8, 2, 6, 6)}  # 24 tokens; 18 tokens (padded for context 4 and 8)


@pytest.fixture(scope="module")
def reference():
    """Single-device xla values per input grid."""
    cache = {}

    def get(grid):
        if grid not in cache:
            graphdef, state = nnx.split(random_dit("xla"))
            cache[grid] = jax.jit(loss_and_grads, static_argnums=0)(graphdef, state, dit_inputs(*GRIDS[grid]))
        return cache[grid]
    return get


@pytest.mark.parametrize("sizes, attention, grid", [
    ({"data": 8}, "xla", "even"),
    ({"fsdp": 8}, "xla", "even"),
    ({"data": 2, "fsdp": 2, "context": 2}, "ring", "even"),
    ({"data": 2, "fsdp": 2, "context": 2}, "ulysses", "even"),
    ({"context": 4, "tensor": 2}, "ring", "odd"),
    ({"context": 4, "tensor": 2}, "ulysses", "even"),
    ({"context": 8}, "ring", "even"),
    ({"context": 8}, "ring", "odd"),
    ({"context": 8}, "ulysses", "odd"),
    ({"fsdp": 4, "tensor": 2}, "splash", "odd"),
])
def test_dit_on_mesh_matches_single_device(sizes, attention, grid, reference):
    ref_loss, ref_grads, ref_prediction = reference(grid)
    loss, grads, prediction = run_on_mesh(attention, sizes, dit_inputs(*GRIDS[grid]))
    assert relative_error(prediction, ref_prediction) <= TOLERANCE
    assert relative_error(loss, ref_loss) <= TOLERANCE
    for (path, grad), ref in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)):
        assert relative_error(grad, ref) <= TOLERANCE, jax.tree_util.keystr(path)


if __name__ == "__main__":
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as f:
        json.dump(spec_dump(abstract_params("1.3B")), f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {GOLDEN}")
