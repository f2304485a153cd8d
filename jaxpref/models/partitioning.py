"""Logical axis names -> mesh shardings for model parameters.

Parameters carry logical names in their ``out_sharding`` metadata; ``rules`` map each name to a mesh
axis (or a tuple of axes, or None). The defaults here are a starting point; ``jaxpref.sharding`` may
pass its own rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

LOGICAL_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", "norm", "lora_rank")

DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),
)


def logical_to_spec(
    axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh, rules: Rules | None = None
) -> PartitionSpec:
    """PartitionSpec for an array of ``shape`` whose dims are named ``axes``.

    ``rules`` override ``DEFAULT_RULES`` name by name. A dim stays replicated when its rule names
    no axis present in the mesh, when the mesh axes do not divide it, or when an earlier dim
    already uses that mesh axis.
    """
    if not axes:
        return PartitionSpec()
    table: dict[str, Any] = dict(DEFAULT_RULES)
    table.update((name, tuple(axis) if isinstance(axis, list) else axis) for name, axis in rules or ())
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for name, size in zip(axes, shape, strict=True):
        target = table.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(a for a in names if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        total = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        if not names or size % total:
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*spec)


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules: Rules | None = None) -> NamedSharding:
    """NamedSharding for one variable from its ``out_sharding`` metadata."""
    axes = var.get_metadata().get("out_sharding")
    return NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules | None = None) -> nnx.State:
    """A pytree-prefix of ``state`` with one NamedSharding per variable."""
    return jax.tree.map(
        lambda v: variable_sharding(v, mesh, rules), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def shard_module(module: nnx.Module, mesh: Mesh, rules: Rules | None = None) -> None:
    """Move every variable of ``module`` (in place) into the sharding its logical axes give."""
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Variable) and hasattr(node.get_value(), "shape"):
            node.set_value(jax.device_put(node.get_value(), variable_sharding(node, mesh, rules)))
