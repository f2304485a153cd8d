"""Reference implementation: full [N, V] logits, gradients by autodiff. For tests only."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from .softcap import soft_cap


def linear_logsumexp_gather_reference(
    hidden: jax.Array,
    weight: jax.Array,
    ids: jax.Array,
    *,
    bias: jax.Array | None = None,
    temperatures: Sequence[float] = (1.0,),
    softcap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Log-sum-exp of ``hidden @ weight (+ bias)`` (soft-capped) at each temperature, and the logits at ``ids``.

    Args:
      hidden: [N, H]. weight: [H, V]. ids: int [N, K'] in [0, V). bias: [V] or None.
      temperatures: static positive floats; lse row t is logsumexp(logits / temperatures[t]).
      softcap: static cap: logits = softcap * tanh(raw / softcap) before everything else; None: none.

    Returns:
      (lse [len(temperatures), N] float32, gathered [N, K'] float32 (capped) logits at ids).
    """
    logits = jnp.dot(hidden, weight, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    logits = soft_cap(logits, softcap)
    lse = jnp.stack([jax.nn.logsumexp(logits / t, axis=-1) for t in temperatures])
    gathered = jnp.take_along_axis(logits, ids.astype(jnp.int32), axis=-1)
    return lse, gathered
