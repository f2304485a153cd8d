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

from jaxpref.pallas import soft_cap


def topk_logprobs(
    hidden: ArrayLike,
    lm_head_weight: ArrayLike,
    k: int,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    block_rows: int = 256,
) -> tuple[Array, Array]:
    """Top-k ids and log-probs of ``softmax(logits / temperature)``, ``logits = hidden @ lm_head_weight``
    soft-capped first when ``softcap`` is set (``cap * tanh(logits / cap)``, the model's
    ``config.final_logit_softcapping``).

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
        z = soft_cap(jnp.dot(h.astype(dtype), w, preferred_element_type=jnp.float32), softcap) / temperature
        values, ids = jax.lax.top_k(z, k)
        return ids.astype(jnp.int32), values - jax.nn.logsumexp(z, axis=-1, keepdims=True)

    ids, logprobs = jax.lax.map(one, blocks)
    ids = ids.reshape(-1, k)[:n].reshape(lead + (k,))
    logprobs = logprobs.reshape(-1, k)[:n].reshape(lead + (k,))
    return ids, logprobs


def topk_and_token_logprobs(
    hidden: ArrayLike,
    lm_head_weight: ArrayLike,
    next_ids: ArrayLike,
    k: int,
    *,
    softcap: float | None = None,
    block_rows: int = 256,
) -> tuple[Array, Array, Array, Array]:
    """:func:`topk_logprobs` at temperature 1 plus the log-prob and rank of a given next token.

    What an inference server returns for a scored prompt (vLLM ``prompt_logprobs``): per position the
    top-k and the actual next token, which may be outside the top-k.

    Args:
      hidden: ``[..., H]``; lm_head_weight: ``[H, V]``; next_ids: ``[...]`` int, the token each position
        is scored against (clipped into the vocabulary); k, softcap, block_rows: as :func:`topk_logprobs`.

    Returns:
      ``(ids [..., k] int32, logprobs [..., k] f32, next_logprob [...] f32, next_rank [...] int32)``;
      rank 1 is the most likely token (``1 + #{v: z_v > z_next}``, so ties share the better rank).
    """
    hidden = jnp.asarray(hidden)
    weight = jnp.asarray(lm_head_weight)
    lead = hidden.shape[:-1]
    vocab = weight.shape[1]
    if not 0 < k <= vocab:
        raise ValueError(f"k={k} must be in [1, vocab size {vocab}]")
    rows = hidden.reshape(-1, hidden.shape[-1])
    nxt = jnp.clip(jnp.asarray(next_ids).reshape(-1).astype(jnp.int32), 0, vocab - 1)
    n = rows.shape[0]
    block = max(1, min(block_rows, n))
    pad = (-n) % block
    blocks = jnp.pad(rows, ((0, pad), (0, 0))).reshape(-1, block, rows.shape[-1])
    next_blocks = jnp.pad(nxt, (0, pad)).reshape(-1, block)
    dtype = jnp.promote_types(rows.dtype, weight.dtype)
    w = weight.astype(dtype)

    def one(args: tuple[Array, Array]) -> tuple[Array, Array, Array, Array]:
        h, t = args
        z = soft_cap(jnp.dot(h.astype(dtype), w, preferred_element_type=jnp.float32), softcap)
        values, ids = jax.lax.top_k(z, k)
        lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
        z_next = jnp.take_along_axis(z, t[:, None], axis=-1)
        rank = 1 + jnp.sum(z > z_next, axis=-1, dtype=jnp.int32)
        return ids.astype(jnp.int32), values - lse, (z_next - lse)[:, 0], rank

    ids, logprobs, next_lp, rank = jax.lax.map(one, (blocks, next_blocks))
    cut = lambda a, tail: a.reshape((-1,) + tail)[:n].reshape(lead + tail)
    return cut(ids, (k,)), cut(logprobs, (k,)), cut(next_lp, ()), cut(rank, ())


__all__ = ["topk_and_token_logprobs", "topk_logprobs"]
