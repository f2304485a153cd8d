"""TPU attention: Pallas splash attention with the causal mask, packed segments and grouped KV heads.

``jax.experimental.pallas.ops.tpu.splash_attention`` is a Mosaic flash-attention kernel that skips
the blocks the mask rules out (above the diagonal: about half of the score matrix) and keeps only
``out`` and the log-sum-exp for the backward. Here:

* GQA: one MQA kernel per KV head (``make_splash_mqa``: G query heads share one K/V), vmapped over
  the KV heads and the batch.
* Packed sequences: ``SegmentIds(q=segment_ids, kv=segment_ids)``; padding (segment 0) attends to
  earlier padding, as in ``blocked_attention``.
* Lengths that are not a multiple of the block are padded with segment -1 (which nothing real
  attends to) and cut off again.
* Queries are scaled by ``scale`` (default ``1/sqrt(D)``) before the kernel (splash does not scale).
* Sliding windows: ``LocalMask`` with ``window_size=(window - 1, 0)`` (causal, and key j visible
  from query i iff ``i - window < j``), whose block tables let the kernel skip key blocks outside
  every query's window. Soft-capping: the kernel's ``attn_logits_soft_cap`` (``c * tanh(s / c)`` on
  the scaled scores, before masking; its backward differentiates through the cap).
* On a mesh of more than one device the kernel runs under ``shard_map`` (Mosaic kernels cannot be
  partitioned by XLA): batch over the mesh's batch axes, heads over ``tensor`` where they divide.

On CPU it runs in Pallas's interpret mode (tests compare it with ``blocked_attention``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from jaxpref import platform
from jaxpref.sharding import BATCH_AXES

# Query/key block of the kernel on TPU (MaxText's default is 512); interpret mode uses 128 to stay quick.
BLOCK_TPU = 512
BLOCK_INTERPRET = 128
_LANES = 128  # splash blocks are multiples of the TPU lane width


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Causal attention with splash attention; same contract as ``attention.attention``.

    Args:
      q: [B, T, N, D] queries (RoPE applied); k, v: [B, T, K, D], N a multiple of K.
      segment_ids: int [B, T] packed-sequence ids (0 = padding) or None.
      window: static; query i sees keys ``i - window < j <= i`` (None: all ``j <= i``).
      softcap: static c; scores become ``c * tanh(s / c)`` after scaling, before masking.
      scale: static factor on q.k; None means ``1 / sqrt(D)``.
    Returns:
      [B, T, N, D] in q's dtype.
    """
    b, t, n, _ = q.shape
    kv = k.shape[2]
    if n % kv:
        raise ValueError(f"query heads {n} must be a multiple of key/value heads {kv}")
    seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    local = functools.partial(
        _splash_local,
        window=None if window is None or window >= t else int(window),
        softcap=None if softcap is None else float(softcap),
        scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
    )
    mesh = platform.mesh_for_kernels()
    if mesh is None:
        return local(q, k, v, seg)
    batch = platform.spec_entry(platform.dividing_axes(mesh, BATCH_AXES, b))
    heads = platform.spec_entry(platform.dividing_axes(mesh, ("tensor",), math.gcd(n, kv)))
    qkv_spec = PartitionSpec(batch, None, heads, None)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, PartitionSpec(batch, None)),
        out_specs=qkv_spec,
        check_vma=False,  # the Pallas kernel's outputs carry no varying-axis types
    )(q, k, v, seg)


def _splash_local(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    seg: jax.Array,
    *,
    window: int | None,
    softcap: float | None,
    scale: float,
) -> jax.Array:
    """Splash attention on one device's [B, T, N, D] / [B, T, K, D] blocks."""
    b, t, n, d = q.shape
    kv = k.shape[2]
    interpret = platform.interpret_kernels()
    block = min(BLOCK_INTERPRET if interpret else BLOCK_TPU, _round_up(t, _LANES))
    t_pad = _round_up(t, block)
    if t_pad != t:
        pad = ((0, 0), (0, t_pad - t), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
        seg = jnp.pad(seg, ((0, 0), (0, t_pad - t)), constant_values=-1)
    kernel = _kernel(t_pad, n // kv, block, interpret, window, softcap)
    # [B, T, N, D] -> [B, K, G, T, D]; [B, T, K, D] -> [B, K, T, D]
    qh = (q * jnp.asarray(scale, q.dtype)).reshape(b, t_pad, kv, n // kv, d).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def one_kv_head(q_g, k_h, v_h, s):  # [G, T, D], [T, D], [T, D], [T]
        return kernel(q_g, k_h, v_h, segment_ids=splash.SegmentIds(q=s, kv=s))

    per_batch = jax.vmap(one_kv_head, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_batch)(qh, kh, vh, seg)  # [B, K, G, T, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t_pad, n, d)[:, :t]


@functools.lru_cache(maxsize=32)
def _kernel(t: int, groups: int, block: int, interpret: bool, window: int | None, softcap: float | None):
    """A splash MQA kernel for ``groups`` query heads per KV head over ``t`` positions (the causal or
    sliding-window mask is static; segments come per call)."""
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    if window is None:
        head_mask = splash.CausalMask((t, t))
    else:  # keys i - (window - 1) .. i + 0
        head_mask = splash.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
    mask = splash.MultiHeadMask([head_mask for _ in range(groups)])
    with jax.ensure_compile_time_eval():  # called while tracing a step: build the tables concretely
        kernel = splash.make_splash_mqa_single_device(
            mask, block_sizes=sizes, attn_logits_soft_cap=softcap, interpret=interpret
        )
    # The block-mask tables as numpy: they are embedded in the module as literals. As jax arrays they
    # would be captured constants, which XLA takes as extra arguments and jax.export cannot carry.
    return jax.tree.map(np.asarray, kernel)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple
