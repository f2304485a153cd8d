"""Final logit soft-capping (Gemma 2): ``z = cap * tanh(z_raw / cap)``, applied per logits tile.

Every implementation calls :func:`soft_cap` on each raw logits tile (after the bias, before the
temperature, the online log-sum-exp and the gather at ``ids``), so the log-sum-exp *and* the gathered
logits are those of the capped logits, and :func:`soft_cap_grad` on the same tile in the backward:
``d z / d z_raw = 1 - tanh^2 = 1 - (z / cap)^2``. ``None`` means no cap (the ops vanish at trace time).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def check_softcap(softcap: float | None) -> float | None:
    """``softcap`` as a static positive finite float, or None; a clear error otherwise."""
    if softcap is None:
        return None
    try:
        cap = float(softcap)
    except TypeError as e:  # a tracer: the cap shapes the kernel at trace time
        raise TypeError("softcap must be a static Python float (or None)") from e
    if not (cap > 0 and math.isfinite(cap)):
        raise ValueError(f"softcap must be a positive finite float or None (no capping), got {softcap!r}")
    return cap


def soft_cap(z: jax.Array, softcap: float | None) -> jax.Array:
    """``softcap * tanh(z / softcap)`` (``z`` unchanged for None); apply before any -inf masking."""
    return z if softcap is None else softcap * jnp.tanh(z / softcap)


def soft_cap_grad(z_capped: jax.Array, softcap: float) -> jax.Array:
    """``d soft_cap / d z_raw`` from the *capped* logits: ``1 - (z / cap)^2``, clamped at 0 (so a masked
    -inf column gives 0, not -inf, and rounding never makes it negative)."""
    return jnp.maximum(1.0 - jnp.square(z_capped / softcap), 0.0)
