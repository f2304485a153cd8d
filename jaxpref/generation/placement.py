"""Where generation's arrays live on a (data, fsdp, tensor) mesh, and the prompts of several processes.

On a mesh (``jaxpref.sharding.make_mesh``):

* the weights stay as they were placed (the trainer's shardings, or ``sharding.shard_module``): heads,
  KV heads, MLP columns and the vocabulary split over ``tensor`` (never gathered: each device computes
  its heads and columns, the o/down projections and the LM head end in a reduction), ``embed`` over
  ``fsdp`` (gathered per layer, as in training). A model whose arrays are elsewhere is copied into the
  default rules' shardings;
* the rows of a group are split over the batch axes (``sharding.BATCH_AXES``; rows padded to a
  multiple of ``sharding.batch_divisor``), and so is the KV cache ``[layers, B, S, kv_heads, head_dim]``,
  whose KV heads go over ``tensor`` when they divide (``cache_spec``);
* token embeddings are looked up by each ``tensor`` device in its slice of the vocabulary and summed
  (``embed``): left to itself, XLA's partitioner all-gathers the table when it is smaller than the
  looked-up activations (measured: a 128 x 48 table on the (2, 2, 2) mesh);
* the new tokens ``[B, max_new_tokens]`` come back replicated (a small all-gather), so every process can
  read every row, also when the mesh spans processes.

Several processes: every process passes its own prompts. They are exchanged (``allgather_prompts``:
token ids only) and every process builds the same global group arrays, of which it puts only its
devices' shards (``global_array``), so any mesh layout works, including one whose batch axes do not
span the processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpref import sharding as shd


def batch_spec(ndim: int) -> PartitionSpec:
    """[B, ...] arrays: rows over the batch axes (data, fsdp), the other ``ndim - 1`` axes whole."""
    return PartitionSpec(shd.BATCH_AXES, *([None] * (ndim - 1)))


def cache_spec(mesh: Mesh, kv_heads: int) -> PartitionSpec:
    """The KV cache [layers, B, S, kv_heads, head_dim]: B over the batch axes, KV heads over ``tensor``
    when they divide (else whole: every tensor device then holds all KV heads)."""
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and kv_heads % tensor == 0 else None
    return PartitionSpec(None, shd.BATCH_AXES, None, heads, None)


def padded_rows(rows: int, mesh: Mesh) -> int:
    """``rows`` rounded up to a multiple of the devices along the batch axes."""
    divisor = shd.batch_divisor(mesh)
    return -(-rows // divisor) * divisor


def global_array(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The global array ``value`` (the same on every process) with each process putting only its own
    devices' shards."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def replicated_key(key: jax.Array, mesh: Mesh) -> jax.Array:
    """A PRNG key (the same on every process) as an array replicated over ``mesh``."""
    data = global_array(np.asarray(jax.random.key_data(key)), NamedSharding(mesh, PartitionSpec()))
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))


def host_value(x: jax.Array) -> np.ndarray:
    """A replicated array as numpy, read from this process's first shard (the whole value)."""
    return np.asarray(x.addressable_shards[0].data)


def on_mesh(state: Any, mesh: Mesh) -> Any:
    """``state`` (an ``nnx.State``) as it is when every array already sits on ``mesh``'s devices, else a
    copy placed by the default rules (``sharding.state_shardings``)."""
    devices = set(mesh.devices.flat)
    arrays = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
    if all(x.sharding.device_set == devices for x in arrays):
        return state
    return shd.place(state, shd.state_shardings(state, mesh))


def allgather_prompts(prompts: Sequence[Sequence[int]]) -> list[list[list[int]]]:
    """Every process's prompts (token ids), in process order: ``[this process's prompts]`` on one process.

    Two small all-gathers: the prompt counts and longest lengths, then the padded token ids with lengths.
    """
    prompts = [list(map(int, p)) for p in prompts]
    if jax.process_count() == 1:
        return [prompts]
    longest = max((len(p) for p in prompts), default=0)
    sizes = multihost_utils.process_allgather(np.array([len(prompts), longest], np.int32))
    n, width = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    ids = np.zeros((n, width + 1), np.int32)  # column 0: the length
    for i, p in enumerate(prompts):
        ids[i, 0] = len(p)
        ids[i, 1 : 1 + len(p)] = p
    everyone = multihost_utils.process_allgather(ids)  # [processes, n, width + 1]
    return [
        [row[1 : 1 + row[0]].tolist() for row in table[: int(count)]] for table, count in zip(everyone, sizes[:, 0])
    ]


def vocab_split(table: jax.Array) -> bool:
    """Whether an embedding table [V, H] (placed) has its vocabulary split over ``tensor`` alone."""
    spec = getattr(table.sharding, "spec", ())
    return len(spec) > 0 and spec[0] in ("tensor", ("tensor",))


def embed(table: jax.Array, ids: jax.Array, mesh: Mesh) -> jax.Array:
    """Token embeddings [B, T, H] (the table's dtype) of ids int [B, T] (rows over the batch axes) from a
    table [V, H] with V split over ``tensor``: each ``tensor`` device takes the ids in its slice of the
    vocabulary, zeros for the others, and the slices are summed (exact: one term is not zero). The
    table's other axes are gathered (fsdp), never its vocabulary."""

    def local(table: jax.Array, ids: jax.Array) -> jax.Array:
        rows = table.shape[0]
        local_ids = ids - jax.lax.axis_index("tensor") * rows
        mine = (local_ids >= 0) & (local_ids < rows)
        x = jnp.take(table, jnp.where(mine, local_ids, 0), axis=0)
        return jax.lax.psum(jnp.where(mine[..., None], x, jnp.zeros((), x.dtype)), "tensor")

    rows = PartitionSpec(shd.BATCH_AXES, None)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(PartitionSpec("tensor", None), rows), out_specs=PartitionSpec(shd.BATCH_AXES)
    )(table, ids)
