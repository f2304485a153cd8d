"""Causal (packed) self-attention behind one function, so other kernels can be slotted in.

On CPU the default is ``blocked_attention`` (query blocks, causal key ranges, a flash-style custom VJP:
no [B, heads, T, T] buffer). Elsewhere it is ``jax.nn.dot_product_attention``: cuDNN on GPU where it
applies, XLA otherwise. A TPU splash-attention path would be one more branch in ``attention``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .blocked_attention import blocked_attention

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "blocked")


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """Boolean mask [B, 1, T, T]: causal and within the same segment.

    Padding (segment 0) attends to earlier padding, so every query row has at least itself and the
    softmax stays finite.
    """
    t = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal[None])[:, None]


def _cudnn_applies(q: jax.Array) -> bool:
    head_dim = q.shape[-1]
    return (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 128
    )


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Causal attention with grouped KV heads; softmax in float32.

    Args:
      q: [B, T, N, D] queries (RoPE applied).
      k, v: [B, T, K, D] keys and values, N a multiple of K.
      segment_ids: int [B, T] packed-sequence ids (0 = padding) or None for one sequence per row.
      impl: "auto" (blocked on CPU; cuDNN on GPU when dtype and head_dim allow; else XLA), "xla",
        "cudnn" or "blocked".
    Returns:
      [B, T, N, D] in q's dtype.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "blocked" or (impl == "auto" and jax.default_backend() == "cpu"):
        return blocked_attention(q, k, v, segment_ids=segment_ids)
    if segment_ids is None:
        mask, is_causal = None, True
    else:
        mask, is_causal = segment_mask(segment_ids), False
    run = partial(jax.nn.dot_product_attention, q, k, v, mask=mask, is_causal=is_causal)
    if impl == "auto":
        if not _cudnn_applies(q):
            return run(implementation="xla")
        try:
            return run(implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError):
            # cuDNN's trace-time checks (version, layout) failed: fall back rather than fail.
            return run(implementation="xla")
    return run(implementation=impl)
