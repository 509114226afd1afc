"""Device mesh, logical axis names → mesh axes, and the shardings of parameters and batches.

Model code speaks only logical names. Parameters: `embed` (model width), `heads` (the flattened
heads × head_dim width of q/k/v), `mlp` (FFN and embedding-MLP hidden width), `layers`.
Activations: `act_batch`, `act_length` (video tokens), `act_kv_length` (text tokens seen by
cross-attention), `act_embed`, `act_heads`, `act_kv` (head_dim). One rules table (`DEFAULT_RULES`,
or a swap-in table from `RULE_SETS`) maps them onto the mesh axes `MESH_AXES`; a name mapped to None
is replicated.
"""

from __future__ import annotations

import collections
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# data: pure data parallelism (replicated params); fsdp: batch and parameter sharding (ZeRO-3);
# context: the token sequence of self-attention; tensor: attention heads and the FFN hidden width.
MESH_AXES = ("data", "fsdp", "context", "tensor")

DEFAULT_RULES: LogicalRules = (
    ("embed", "fsdp"),  # parameters: model width sharded over fsdp, gathered per layer
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("act_batch", ("data", "fsdp")),  # activations: batch over every data-parallel axis
    ("act_length", "context"),
    ("act_kv_length", None),  # text K/V are short: replicated, computed once per device
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    # The VAE's conv channels: replicated; the VAE runs data-parallel when pre-encoding.
    ("conv_in", None),
    ("conv_out", None),
)

# Swap-in tables: each replaces the rows it names in DEFAULT_RULES.
RULE_SETS: dict[str, LogicalRules] = {
    "default": (),
    # Pure data parallelism: every parameter replicated (small models, or a baseline).
    "replicated": (("embed", None), ("heads", None), ("mlp", None)),
    # Megatron-style tensor parallelism without fsdp parameter sharding.
    "tensor_only": (("embed", None),),
    # Parameters and Adam moments sharded over context too (as MaxDiffusion does): the context axis
    # splits only activations otherwise, so each context group would hold a whole fsdp shard. Saves
    # memory whenever context > 1, for one more (context-wide) all-gather per layer.
    "fsdp_context": (("embed", ("fsdp", "context")),),
}


def rules_for(name: str) -> LogicalRules:
    """DEFAULT_RULES with the rows of the named swap-in table replaced."""
    if name not in RULE_SETS:
        raise ValueError(f"unknown rule set {name!r}; choose one of {sorted(RULE_SETS)}")
    overrides = dict(RULE_SETS[name])
    return tuple((logical, overrides.get(logical, mesh_axes)) for logical, mesh_axes in DEFAULT_RULES)


def param_axes(*names: str | None) -> dict:
    """Variable metadata naming each axis; the mesh layout is decided later from the rules table.

    Eager sharding is off: parameters are created inside a jitted init with `out_shardings`.
    """
    return {"out_sharding": tuple(names), "eager_sharding": False}


def check_known(names, rules: LogicalRules) -> None:
    """Raises for logical names missing from the rules (flax would silently use them as mesh axes)."""
    missing = {n for n in names if n is not None} - {logical for logical, _ in rules}
    if missing:
        raise ValueError(f"logical axis names {sorted(missing)} are not in the rules table")


def logical_to_spec(names: Sequence[str | None]) -> PartitionSpec:
    """The mesh PartitionSpec of logical axis names under the active rules."""
    check_known(names, spmd.get_logical_axis_rules())
    return spmd.get_pspec(PartitionSpec(*names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh context (single device)."""
    if jax.sharding.get_abstract_mesh().empty or not spmd.get_logical_axis_rules():
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


# Mesh and processes ---------------------------------------------------------------------------


def _fill_sizes(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes of MESH_AXES (missing = 1) with the one −1 filled so their product is num_devices."""
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
    shape = [sizes.get(axis, 1) for axis in MESH_AXES]
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1; got {dict(sizes)}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = num_devices // known  # a remainder fails the check below
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, shape))} do not multiply to {num_devices} devices")
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], dcn_sizes: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """The (data, fsdp, context, tensor) mesh with Auto axes; `sizes` are per slice when `dcn_sizes` is given.

    Multi-slice: the mesh is the product of ICI `sizes` within a slice and `dcn_sizes` across slices
    (one −1 fills the number of slices), so collectives of an axis with DCN size 1 never leave a
    slice. Along an axis with both, the slice is the outer index: a group of that axis spans slices.
    """
    devices = jax.devices() if devices is None else devices
    if dcn_sizes:
        dcn_shape = _fill_sizes(dcn_sizes, num_granules(devices))
        ici_shape = _fill_sizes(sizes, len(devices) // math.prod(dcn_shape))
        grid = mesh_utils.create_hybrid_device_mesh(
            ici_shape, dcn_shape, devices, process_is_granule=devices[0].platform != "tpu")
    else:
        grid = mesh_utils.create_device_mesh(_fill_sizes(sizes, len(devices)), devices)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def jax_detects_cluster() -> bool:
    """Whether JAX's own cluster detection (what `jax.distributed.initialize()` runs when given no
    arguments) recognises this process's environment: a Cloud TPU VM (slice or pod, from the VM's
    metadata server), GKE, Slurm, Open MPI, Kubernetes."""
    from jax._src import clusters  # the detectors jax.distributed.initialize() itself consults

    return any(cluster.is_env_present() for cluster in clusters.ClusterEnv._cluster_types
               if not cluster.opt_in_only_method)


def num_granules(devices) -> int:
    """How many DCN granules hold these devices: TPU slices; elsewhere (CPU, GPU nodes) processes
    (multi-process CPU devices also carry a slice_index, always 0)."""
    if devices[0].platform == "tpu":
        return len({getattr(d, "slice_index", 0) for d in devices})
    return len({d.process_index for d in devices})


def maybe_initialize_distributed(initialize: Callable[..., None] = jax.distributed.initialize,
                                 detect_cluster: Callable[[], bool] = jax_detects_cluster) -> bool:
    """Starts the JAX multi-host runtime where the job runs on a cluster; nothing to set by hand.

    On a cluster JAX recognises (a Cloud TPU VM pod, Slurm, ...) `jax.distributed.initialize()`
    finds the coordinator and the process layout itself. A hand-made launch (no cluster manager)
    sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process. Must run
    before anything touches the devices; returns whether it initialised (False on a plain host).
    """
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        try:
            layout = dict(num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
        except (KeyError, ValueError) as e:
            raise ValueError("JAX_COORDINATOR_ADDRESS is set: JAX_NUM_PROCESSES and JAX_PROCESS_ID must both be "
                             f"set to integers, got {env.get('JAX_NUM_PROCESSES')!r} and "
                             f"{env.get('JAX_PROCESS_ID')!r}") from e
        initialize(**layout)  # the coordinator address is read from the environment by JAX
        return True
    if detect_cluster():
        initialize()
        return True
    return False


# Parameter shardings ---------------------------------------------------------------------------


def param_specs(abstract_state, rules: LogicalRules = DEFAULT_RULES):
    """PartitionSpec tree of a (abstract) nnx state from each Variable's logical `out_sharding`."""
    check_known(logical_names(abstract_state), rules)
    with nnx.logical_axis_rules(rules):
        return nnx.get_partition_spec(abstract_state)


def param_shardings(abstract_state, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
    """NamedSharding tree for an nnx state, e.g. the `out_shardings` of a jitted init."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(abstract_state, rules))


def logical_names(abstract_state) -> set[str]:
    """Every logical axis name the parameters of a state use."""
    names = set()
    for variable in jax.tree.leaves(abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        if not isinstance(variable, nnx.Variable):
            continue  # a plain array (a step counter, an optimizer count): no logical axes
        names.update(n for n in variable.get_metadata().get("out_sharding") or () if n is not None)
    return names


def check_sufficiently_sharded(abstract_state, shardings, max_unsharded_fraction: float = 0.01) -> float:
    """Fraction of parameter elements replicated on every device; raises above the threshold.

    Catches a logical name missing from the rules or a rule set that leaves big matrices whole.
    Always 0 on a single device.
    """
    sizes = [math.prod(x.shape) for x in jax.tree.leaves(abstract_state)]
    sharding_leaves = jax.tree.leaves(shardings)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract_state)[0]]
    replicated = [(size, path) for size, path, s in zip(sizes, paths, sharding_leaves)
                  if s.is_fully_replicated and len(s.device_set) > 1]
    fraction = sum(size for size, _ in replicated) / max(sum(sizes), 1)
    if fraction > max_unsharded_fraction:
        largest = ", ".join(f"{path} ({size:,})" for size, path in sorted(replicated, reverse=True)[:5])
        raise ValueError(f"{fraction:.1%} of parameter elements are unsharded (limit "
                         f"{max_unsharded_fraction:.1%}); largest: {largest}")
    logging.info("unsharded parameters: %.2f%%", 100 * fraction)
    return fraction


# Batches -------------------------------------------------------------------------------------


def batch_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) axis over every data-parallel mesh axis, the rest replicated."""
    with nnx.logical_axis_rules(rules):
        return NamedSharding(mesh, logical_to_spec(("act_batch",)))


class BatchLayoutError(ValueError):
    """A mesh and batch size under which some device's share of the batch is not whole rows."""


def process_rows(data_sharding: NamedSharding, batch_size: int) -> dict[int, np.ndarray]:
    """The global batch rows each process must load: the union of the rows its devices hold.

    Devices that differ only along axes the batch is not sharded over (context, tensor, or any axis
    of a replicated batch) hold the same rows, so processes sharing such a group load the same rows
    and processes in different data-parallel groups disjoint ones. The loader feeds any layout in
    which every device holds whole rows; others raise BatchLayoutError.
    """
    spec = data_sharding.spec[0] if data_sharding.spec else None
    batch_axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    shards = math.prod(data_sharding.mesh.shape[axis] for axis in batch_axes)
    if batch_size % shards:
        raise BatchLayoutError(
            f"data.batch_size={batch_size} cannot be fed: the batch is split over mesh axes {batch_axes} "
            f"({shards} shards), so each device would hold {batch_size / shards:g} rows; use a multiple of {shards}")
    rows = collections.defaultdict(set)
    for device, index in data_sharding.devices_indices_map((batch_size,)).items():
        rows[device.process_index].update(range(batch_size)[index[0]])
    return {process: np.array(sorted(r)) for process, r in sorted(rows.items())}


def global_batch(local_batch, data_sharding: NamedSharding, rows: np.ndarray, batch_size: int):
    """Global arrays from this process's numpy batch (a pytree) holding global rows `rows`, in order.

    Each addressable device gets its rows from the local batch (`process_rows` says which rows a
    process loads), so processes sharing rows must pass identical values for them.
    """
    position = {int(row): i for i, row in enumerate(rows)}

    def assemble(x):
        x = np.asarray(x)
        shard = lambda index: x[[position[row] for row in range(batch_size)[index[0]]]][(slice(None), *index[1:])]
        return jax.make_array_from_callback((batch_size, *x.shape[1:]), data_sharding, shard)

    return jax.tree.map(assemble, local_batch)
