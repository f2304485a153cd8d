"""Device mesh, logical-axis rules and placement of parameters and batches.

Parameters carry logical axis names (``vocab``, ``embed``, ``heads``, ...) in their ``out_sharding``
metadata; a rule table maps each logical name to a mesh axis (or to none = replicated). Batches are
split along the leading batch dimension over the ``data`` and ``fsdp`` axes. Every process feeds its
own slice of the batch and the global array is assembled with
``jax.make_array_from_process_local_data``, so single-host and multi-host runs share one code path.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxpref.errors import ConfigError

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# The logical axis names model parameters carry.
LOGICAL_AXES = (
    "vocab", "embed", "heads", "kv_heads", "qkv_heads", "head_dim", "mlp", "gate_up", "layers", "norm", "lora_rank",
    "nf4",
)

Rules = Sequence[Sequence[Any]]
"""(logical name, mesh axis | tuple/list of mesh axes | None) pairs; they override the defaults by name."""

# logical name -> mesh axis (or tuple of axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    # Phi-3's fused qkv_proj output [N + 2K heads, head_dim]: an even split over `tensor` would cut
    # across the q/k/v boundaries (device 0 would hold only query heads), so it stays whole there
    # (still split over fsdp by its input axis). gate_up_proj's [2, I] output shards by I ("mlp").
    ("qkv_heads", None),
    ("gate_up", None),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),
    ("nf4", "fsdp"),  # flat NF4 codes and block scales of a quantized (QLoRA) weight
)


def mesh_shape(sizes: Mapping[str, int] | None, num_devices: int) -> tuple[int, int, int]:
    """Resolve ``{data, fsdp, tensor}`` sizes (-1 = all remaining devices) to a full shape.

    Missing axes default to 1, except that with no ``-1`` anywhere and a product smaller than the
    device count, ``data`` absorbs the rest (plain data parallelism is the safe default).
    """
    sizes = dict(sizes or {})
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ConfigError(f"mesh: unknown axis {sorted(unknown)}; the axes are {list(MESH_AXES)}.")
    if not any(v == -1 for v in sizes.values()) and "data" not in sizes:
        sizes["data"] = -1
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    if sum(1 for s in shape if s == -1) > 1:
        raise ConfigError("mesh: at most one axis may be -1 (meaning: all remaining devices).")
    fixed = math.prod(s for s in shape if s != -1)
    if num_devices % fixed:
        raise ConfigError(
            f"mesh: the fixed axis sizes {dict(zip(MESH_AXES, shape))} multiply to {fixed}, which does "
            f"not divide the {num_devices} available devices; change the sizes or use -1 for one axis."
        )
    shape = [num_devices // fixed if s == -1 else s for s in shape]
    if math.prod(shape) != num_devices:
        raise ConfigError(
            f"mesh: axis sizes {dict(zip(MESH_AXES, shape))} use {math.prod(shape)} devices but "
            f"{num_devices} are available; set one axis to -1 to use the rest."
        )
    return tuple(shape)  # type: ignore[return-value]


def make_mesh(sizes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all global devices, in GSPMD (auto) mode."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _rule_table(rules: Rules | None) -> dict[str, Any]:
    table = dict(DEFAULT_RULES)
    for name, axis in rules or ():
        table[name] = tuple(axis) if isinstance(axis, list) else axis
    return table


def logical_to_spec(
    names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh, rules: Rules | None = None
) -> PartitionSpec:
    """Map one array's logical axis names to a PartitionSpec for ``mesh``.

    A dimension that the mapped mesh axes do not divide, or a mesh axis already used by an earlier
    dimension, stays replicated (so small test models and odd head counts still work).
    """
    if not names:
        return PartitionSpec()
    table = _rule_table(rules)
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(names, shape, strict=True):
        axes = table.get(name) if name is not None else None
        if axes is None:
            spec.append(None)
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        axes_t = tuple(a for a in axes_t if a not in used and mesh.shape.get(a, 1) > 1)
        size = math.prod(mesh.shape[a] for a in axes_t)
        if not axes_t or dim % size:
            spec.append(None)
            continue
        used.update(axes_t)
        spec.append(axes_t[0] if len(axes_t) == 1 else axes_t)
    return PartitionSpec(*spec)


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules: Rules | None = None) -> NamedSharding:
    """NamedSharding for one variable from its ``out_sharding`` metadata (replicated without it)."""
    names = var.get_metadata().get("out_sharding")
    return NamedSharding(mesh, logical_to_spec(names, var.get_value().shape, mesh, rules))


def reduced_axis_names(
    names: Sequence[str | None], param_shape: Sequence[int], shape: Sequence[int]
) -> tuple[str | None, ...] | None:
    """Logical names of an array derived from a parameter by dropping one axis (Adafactor's factored
    row/column moments), or None when ``shape`` is not such a reduction of ``param_shape``.

    When several dropped axes give ``shape`` (equal sizes), a dimension keeps its name only if every
    candidate agrees on it; the others stay unnamed (replicated).
    """
    if len(shape) != len(param_shape) - 1 or len(names) != len(param_shape):
        return None
    candidates = [
        tuple(names[:i]) + tuple(names[i + 1 :])
        for i in range(len(param_shape))
        if tuple(param_shape[:i]) + tuple(param_shape[i + 1 :]) == tuple(shape)
    ]
    if not candidates:
        return None
    return tuple(c[0] if all(x == c[0] for x in c) else None for c in zip(*candidates))


def _param_shapes_by_path(params: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


def _spec_fn(mesh: Any, rules: Rules | None, like: Any) -> Any:
    """``spec(path, leaf) -> PartitionSpec`` for the leaves of a state (see :func:`state_shardings`)."""
    param_shapes = _param_shapes_by_path(like) if like is not None else {}

    def param_shape(path: Any) -> tuple[int, ...] | None:
        # The optimizer state nests parameter-shaped trees: a state path ends with its parameter's.
        key = jax.tree_util.keystr(path)
        matches = [p for p in param_shapes if key.endswith(p)]
        return param_shapes[max(matches, key=len)] if matches else None

    def spec(path: Any, leaf: Any) -> PartitionSpec:
        if not isinstance(leaf, nnx.Variable):
            return PartitionSpec()
        names = leaf.get_metadata().get("out_sharding")
        shape = leaf.get_value().shape
        if names and len(names) != len(shape):
            full = param_shape(path)
            names = reduced_axis_names(names, full, shape) if full is not None else None
        return logical_to_spec(names, shape, mesh, rules)

    return spec


def state_shardings(state: Any, mesh: Mesh, rules: Rules | None = None, *, like: Any = None) -> Any:
    """NamedShardings for every array in an ``nnx.State`` (or optimizer state built from one).

    The result has the structure of ``state`` (variables keep their metadata, holding a sharding as
    value), so it serves as ``jax.jit`` in/out shardings and for ``jax.device_put``. Arrays without
    logical names (optimizer step counters, RNG keys) are replicated.

    ``like``: the parameters an optimizer ``state`` was built from. A state array whose shape is its
    parameter's with one axis dropped (Adafactor's factored moments) is then sharded by the names of
    the remaining axes; one of another shape (a placeholder) is replicated.
    """
    spec = _spec_fn(mesh, rules, like)

    def one(path: Any, leaf: Any) -> Any:
        sharding = NamedSharding(mesh, spec(path, leaf))
        return leaf.replace(sharding) if isinstance(leaf, nnx.Variable) else sharding

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def place(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)``; abstract leaves (``jax.ShapeDtypeStruct``, from
    ``nnx.eval_shape``) become structs carrying their sharding, so a state can be lowered unbuilt."""
    leaves = jax.tree.leaves(tree)
    if leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
    return jax.device_put(tree, shardings)


def shard_module(module: nnx.Module, mesh: Mesh, rules: Rules | None = None) -> None:
    """Move every array variable of ``module`` (in place) into the sharding its logical axes give."""
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Variable) and hasattr(node.get_value(), "shape"):
            node.set_value(jax.device_put(node.get_value(), variable_sharding(node, mesh, rules)))


def batch_sharding(mesh: Mesh, *, leading_dims: int = 0) -> NamedSharding:
    """Sharding of a batch array: ``leading_dims`` unsharded axes, then the batch axis over data+fsdp."""
    return NamedSharding(mesh, PartitionSpec(*([None] * leading_dims), BATCH_AXES))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, *, leading_dims: int = 0) -> dict[str, jax.Array]:
    """Assemble per-process numpy arrays into global jax arrays sharded along the batch axis."""
    sharding = batch_sharding(mesh, leading_dims=leading_dims)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def batch_divisor(mesh: Mesh) -> int:
    """The global batch must be a multiple of this (devices along the batch axes)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def abstract_mesh(sizes: Mapping[str, int] | None, num_devices: int) -> jax.sharding.AbstractMesh:
    """The (data, fsdp, tensor) mesh ``sizes`` give on ``num_devices`` devices, without the devices.

    For planning (``--dry_run``): shardings and per-device sizes for a machine this process is not on.
    """
    shape = mesh_shape(sizes, num_devices)
    return jax.sharding.AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def shard_shape(shape: Sequence[int], spec: PartitionSpec, mesh: Any) -> tuple[int, ...]:
    """The per-device block of an array of ``shape`` split by ``spec`` over ``mesh``'s axis sizes."""
    out = []
    for i, dim in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        axes_t = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        out.append(dim // math.prod(mesh.shape[a] for a in axes_t))
    return tuple(out)


def per_device_bytes(state: Any, mesh: Any, rules: Rules | None = None, *, like: Any = None) -> int:
    """Bytes one device holds of ``state`` (concrete or ``eval_shape``'d) when sharded by the rules.

    Every array is counted by its shard (the spec :func:`state_shardings` gives it, ``like`` as there);
    arrays without names (step counters, RNG keys) are replicated. ``mesh`` may be an :func:`abstract_mesh`.
    """
    spec = _spec_fn(mesh, rules, like)
    total = 0
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    for path, leaf in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_var)[0]:
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        if not hasattr(value, "shape"):
            continue
        itemsize = 8 if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key) else np.dtype(value.dtype).itemsize
        total += math.prod(shard_shape(value.shape, spec(path, leaf), mesh)) * itemsize
    return total
