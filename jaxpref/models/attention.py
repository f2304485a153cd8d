"""Causal (packed) self-attention behind one function, one implementation per platform.

``impl="auto"`` chooses by the platform kernels are chosen for (``jaxpref.platform``: the default
backend, or the platform a step is lowered for):

* CPU: ``blocked_attention`` (query blocks, causal key ranges, a flash-style custom VJP: no
  [B, heads, T, T] buffer).
* TPU: splash attention (``splash_attention.py``: Pallas Mosaic, causal + segment ids + GQA).
* GPU: cuDNN flash attention through ``jax.nn.dot_product_attention(implementation="cudnn")`` when
  the dtype (bfloat16/float16) and head_dim (a multiple of 8, at most 128) allow it, else
  ``blocked`` (float32 compute, or Gemma's head_dim 256: plain XLA ops without a [B, heads, T, T]
  buffer, where XLA's own attention would keep the whole score matrix for the backward).
  Sliding windows go to cuDNN as ``local_window_size=(window - 1, 0)``, the scale as ``scale``.
  Logit soft-capping (Gemma 2) cannot be expressed through jax's cuDNN attention, so with a
  ``softcap`` auto chooses ``blocked`` on GPU too (plain XLA ops, no [B, heads, T, T] buffer).

Every implementation takes ``window``, ``softcap`` and ``scale``. "xla" is
``jax.nn.dot_product_attention`` (full scores; windows through ``local_window_size``); with a soft
cap, which it cannot express, it computes the masked [B, K, G, T, T] scores itself.

On a GPU, cuDNN's own trace-time checks (library version, layout) failing falls back to blocked
attention with a warning; when lowering for a platform (``--lower_for``) any kernel that cannot be built is an error.
"""

from __future__ import annotations

import math
import warnings
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxpref import platform
from jaxpref.pallas import soft_cap
from jaxpref.sharding import BATCH_AXES

from .blocked_attention import blocked_attention
from .splash_attention import splash_attention

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "blocked", "splash")


def segment_mask(segment_ids: jax.Array, window: int | None = None) -> jax.Array:
    """Boolean mask [B, 1, T, T]: causal, within the same segment and, with a ``window``, key j
    visible from query i only when ``i - window < j``.

    Padding (segment 0) attends to earlier padding, so every query row has at least itself and the
    softmax stays finite.
    """
    t = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    if window is not None:
        causal = causal & ~jnp.tril(jnp.ones((t, t), dtype=bool), -window)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal[None])[:, None]


def cudnn_applies(q: jax.Array) -> bool:
    """Whether cuDNN flash attention takes queries like ``q`` [B, T, N, D]: bfloat16/float16, D a
    multiple of 8 and at most 128."""
    head_dim = q.shape[-1]
    return q.dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128


def resolve_impl(impl: str, q: jax.Array, *, softcap: float | None = None) -> str:
    """The implementation ``impl`` means for queries ``q`` (and a soft cap) on the platform kernels are
    chosen for."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    target = platform.kernel_platform()
    if target == "tpu":
        return "splash"
    if target == "gpu":
        if softcap is not None:
            return "blocked"  # cuDNN through jax has no soft cap; blocked is plain XLA without a TxT buffer
        return "cudnn" if cudnn_applies(q) else "blocked"
    return "blocked"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    impl: str = "auto",
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Causal attention with grouped KV heads; softmax in float32.

    Args:
      q: [B, T, N, D] queries (RoPE applied).
      k, v: [B, T, K, D] keys and values, N a multiple of K.
      segment_ids: int [B, T] packed-sequence ids (0 = padding) or None for one sequence per row.
      impl: "auto" (see the module docstring), "blocked", "splash", "cudnn" or "xla".
      window: sliding window, static: query i sees keys ``i - window < j <= i`` (None: all ``j <= i``).
      softcap: static c; scores become ``c * tanh(s / c)`` after scaling, before masking (Gemma 2).
      scale: static factor on q.k; None means ``1 / sqrt(D)``.
    Returns:
      [B, T, N, D] in q's dtype.
    """
    _check_variant(window, softcap, scale)
    if window is not None and window >= q.shape[1]:
        window = None  # every causal key is inside the window
    name = resolve_impl(impl, q, softcap=softcap)
    opts = dict(window=window, softcap=softcap, scale=scale)
    if name == "blocked":
        return blocked_attention(q, k, v, segment_ids=segment_ids, **opts)
    if name == "splash":
        return splash_attention(q, k, v, segment_ids=segment_ids, **opts)
    if name == "xla":
        if softcap is not None:
            return _masked_attention(q, k, v, segment_ids, window, softcap, scale)
        return _dot_product_attention(q, k, v, segment_ids, "xla", window, scale)
    if softcap is not None:
        raise ValueError(
            "attention impl 'cudnn' has no logit soft-capping (jax's cuDNN attention takes none): use "
            "attention_impl: auto (blocked on GPU) or blocked"
        )
    if platform.lowering_target() is not None and not cudnn_applies(q):
        raise platform.KernelLoweringError(
            "cuDNN attention", "gpu", f"it takes bfloat16/float16 with head_dim a multiple of 8 and at most "
            f"128, got {q.dtype} with head_dim {q.shape[-1]} (set compute_dtype: bfloat16)"
        )
    try:
        return _cudnn(q, k, v, segment_ids, window, scale)
    except (ValueError, NotImplementedError, RuntimeError) as e:
        if impl != "auto" or platform.lowering_target() is not None:
            raise
        # cuDNN's trace-time checks (library version, layout) failed on this machine.
        warnings.warn(
            f"jaxpref attention: cuDNN unavailable ({e}); using blocked attention", RuntimeWarning, stacklevel=2
        )
        return blocked_attention(q, k, v, segment_ids=segment_ids, **opts)


def _check_variant(window: int | None, softcap: float | None, scale: float | None) -> None:
    """Reject windows, soft caps and scales no model has (they are static: checked at trace time)."""
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise ValueError(f"attention window must be a positive int (keys visible per query) or None, got {window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"attention softcap must be positive or None, got {softcap!r}")
    if scale is not None and not scale > 0:
        raise ValueError(f"attention scale must be positive or None (1/sqrt(head_dim)), got {scale!r}")


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slots: jax.Array,
    *,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
) -> jax.Array:
    """One query per row against a KV cache (generation); softmax in float32.

    Args:
      q: [B, 1, N, D] queries (RoPE applied).
      k, v: [B, S, K, D] cached keys and values, N a multiple of K.
      slots: int [B] the last cache slot row b may see (its query's own slot); later slots are masked.
      window, softcap, scale: as in ``attention`` (a window hides slots at or before ``slot - window``).
    Returns:
      [B, 1, N, D] in q's dtype.
    """
    _check_variant(window, softcap, scale)
    slot_ids = jnp.arange(k.shape[1])[None, :]
    visible = slot_ids <= slots[:, None]
    if window is not None:
        visible = visible & (slot_ids > slots[:, None] - window)
    return _explicit_attention(q, k, v, visible[:, None, None, None, :], softcap, scale)


def _scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else scale


def _masked_attention(q, k, v, segment_ids, window, softcap, scale) -> jax.Array:
    """The "xla" implementation with a soft cap (which ``jax.nn.dot_product_attention`` cannot
    express): full [B, K, G, T, T] float32 scores, capped, then masked."""
    seg = jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids
    return _explicit_attention(q, k, v, segment_mask(seg, window)[:, :, None], softcap, scale)


def _explicit_attention(q, k, v, visible, softcap, scale) -> jax.Array:
    """Softmax attention on explicit float32 scores with GQA grouping: q [B, T, N, D], k/v [B, S, K, D],
    ``visible`` bool broadcastable to the scores [B, K, G, T, S]; scaled, capped, then masked."""
    b, t, n, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, n // kv, d)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * _scale(scale, d)
    p = jax.nn.softmax(jnp.where(visible, soft_cap(s, softcap), -jnp.inf), axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", p, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, d).astype(q.dtype)


def _dot_product_attention(q, k, v, segment_ids, implementation: str, window=None, scale=None) -> jax.Array:
    # local_window_size=(left, right): key j visible from query i iff i - left <= j <= i + right.
    local = None if window is None else (window - 1, 0)
    if segment_ids is None:
        mask, is_causal = None, True
    else:
        # cuDNN's sliding window needs its causal mask type; the segment mask is then only a bias.
        mask, is_causal = segment_mask(segment_ids), window is not None
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=is_causal, scale=scale, local_window_size=local,
        implementation=implementation,
    )  # fmt: skip


def _cudnn(q, k, v, segment_ids, window=None, scale=None) -> jax.Array:
    """cuDNN attention; on a mesh of several devices under ``shard_map`` (batch over the batch axes,
    heads over ``tensor`` where they divide), which the exported module can carry."""
    run = partial(_dot_product_attention, implementation="cudnn", window=window, scale=scale)
    mesh = platform.mesh_for_kernels()
    if mesh is None:
        return run(q, k, v, segment_ids)
    b, n, kv = q.shape[0], q.shape[2], k.shape[2]
    batch = platform.spec_entry(platform.dividing_axes(mesh, BATCH_AXES, b))
    heads = platform.spec_entry(platform.dividing_axes(mesh, ("tensor",), math.gcd(n, kv)))
    qkv = PartitionSpec(batch, None, heads, None)
    seg_spec = None if segment_ids is None else PartitionSpec(batch, None)
    return jax.shard_map(
        lambda q, k, v, s: run(q, k, v, s), mesh=mesh, in_specs=(qkv, qkv, qkv, seg_spec), out_specs=qkv,
        check_vma=False,
    )(q, k, v, segment_ids)
