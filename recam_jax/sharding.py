"""Logical axis names → mesh axes.

Model code speaks only logical names. Parameters: `embed` (model width), `heads` (the flattened
heads × head_dim width of q/k/v), `mlp` (FFN and embedding-MLP hidden width), `layers`.
Activations: `act_batch`, `act_length` (tokens), `act_embed`, `act_heads`, `act_kv`. One rules table
(`DEFAULT_RULES`, overridable from the config) maps them onto the mesh axes
`data`, `fsdp`, `context`, `tensor`; a name mapped to None is replicated.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax.core import spmd
from jax.sharding import PartitionSpec

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: LogicalRules = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("act_batch", ("data", "fsdp")),
    ("act_length", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
)


def param_axes(*names: str | None) -> dict:
    """Variable metadata naming each axis; the mesh layout is decided later from the rules table.

    Eager sharding is off: parameters are created inside a jitted init with `out_shardings`.
    """
    return {"out_sharding": tuple(names), "eager_sharding": False}


def logical_to_spec(names: Sequence[str | None]) -> PartitionSpec:
    """The mesh PartitionSpec of logical axis names under the active rules."""
    return spmd.get_pspec(PartitionSpec(*names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh context (single device)."""
    if jax.sharding.get_abstract_mesh().empty or not spmd.get_logical_axis_rules():
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))
