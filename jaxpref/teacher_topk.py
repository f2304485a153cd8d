"""A teacher's top-k log-probabilities straight from hidden states, in row blocks.

The teacher side of KD (the online teacher in the train step, and ``python -m jaxpref.teacher``)
needs the k most likely next tokens and their log-probabilities under the full-vocabulary softmax.
Rows are processed ``block_rows`` at a time with ``lax.map``, so at most [block_rows, V] logits exist
at once, never [N, V].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike


def topk_logprobs(
    hidden: ArrayLike,
    lm_head_weight: ArrayLike,
    k: int,
    *,
    temperature: float = 1.0,
    block_rows: int = 256,
) -> tuple[Array, Array]:
    """Top-k ids and log-probs of ``softmax(hidden @ lm_head_weight / temperature)``.

    Args:
      hidden: ``[..., H]`` final hidden states; lm_head_weight: ``[H, V]``.
      k: entries per position (static); temperature: softmax temperature (static, > 0).
      block_rows: rows per block (static); memory is ``block_rows * V`` float32 logits.

    Returns:
      ``(ids [..., k] int32, logprobs [..., k] float32)``, highest log-prob first. The log-probs are
      normalised over the whole vocabulary (their exponentials sum to at most 1); logits are
      accumulated and normalised in float32 whatever the input dtypes.
    """
    hidden = jnp.asarray(hidden)
    weight = jnp.asarray(lm_head_weight)
    lead = hidden.shape[:-1]
    if not 0 < k <= weight.shape[1]:
        raise ValueError(f"k={k} must be in [1, vocab size {weight.shape[1]}]")
    rows = hidden.reshape(-1, hidden.shape[-1])
    n = rows.shape[0]
    block = max(1, min(block_rows, n))
    pad = (-n) % block
    blocks = jnp.pad(rows, ((0, pad), (0, 0))).reshape(-1, block, rows.shape[-1])
    # Products in the inputs' common dtype, accumulated in float32: a bfloat16 teacher's [H, V] weight
    # is not copied to float32 (bf16 x bf16 products are exact in float32, so the logits are the same).
    dtype = jnp.promote_types(rows.dtype, weight.dtype)
    w = weight.astype(dtype)

    def one(h: Array) -> tuple[Array, Array]:
        z = jnp.dot(h.astype(dtype), w, preferred_element_type=jnp.float32) / temperature
        values, ids = jax.lax.top_k(z, k)
        return ids.astype(jnp.int32), values - jax.nn.logsumexp(z, axis=-1, keepdims=True)

    ids, logprobs = jax.lax.map(one, blocks)
    ids = ids.reshape(-1, k)[:n].reshape(lead + (k,))
    logprobs = logprobs.reshape(-1, k)[:n].reshape(lead + (k,))
    return ids, logprobs


__all__ = ["topk_logprobs"]
