"""Private helpers shared by the loss modules (float32 casting, masked reductions)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

F32 = jnp.float32


def f32(x: ArrayLike) -> Array:
    """Cast to float32 (losses compute in float32 whatever the input dtype)."""
    return jnp.asarray(x).astype(F32)


def as_mask(mask: ArrayLike | None, shape: tuple[int, ...]) -> Array:
    """A boolean mask of ``shape``; ``None`` means everything is valid."""
    if mask is None:
        return jnp.ones(shape, dtype=bool)
    return jnp.broadcast_to(jnp.asarray(mask).astype(bool), shape)


def normaliser(count: Array, num_items: ArrayLike | None) -> Array:
    """The divisor N: ``num_items`` when given, else ``count``; 1 where it would be 0 (empty batch -> 0)."""
    n = f32(count) if num_items is None else f32(num_items)
    return jnp.where(n > 0, n, 1.0)


def clean(x: ArrayLike, valid: Array, fill: float = 0.0) -> Array:
    """float32 ``x`` with invalid entries replaced by ``fill`` *before* any math, so that padding
    content (NaN, inf) can reach neither the value nor the gradient."""
    return jnp.where(valid, f32(x), fill)


def masked_sum(x: Array, mask: Array, axis=None) -> Array:
    return jnp.sum(jnp.where(mask, f32(x), 0.0), axis=axis)


def masked_mean(x: Array, mask: Array) -> Array:
    """Mean over the valid entries; 0 when there are none."""
    count = jnp.sum(mask.astype(F32))
    return masked_sum(x, mask) / jnp.where(count > 0, count, 1.0)


def masked_log_softmax(x: Array, mask: Array) -> Array:
    """log-softmax of ``x`` over the valid entries of the last axis; 0 at masked entries.

    Masked entries are replaced by the row maximum *before* any exponential, so that neither the value
    nor the gradient can see their content (-inf, -1e9, NaN): no 0 * inf anywhere. A row without any
    valid entry returns all zeros.
    """
    row_max = jnp.max(jnp.where(mask, x, -jnp.inf), axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    x_safe = jnp.where(mask, x, row_max)
    shifted = x_safe - row_max
    total = jnp.sum(jnp.where(mask, jnp.exp(shifted), 0.0), axis=-1, keepdims=True)
    total = jnp.where(total > 0, total, 1.0)
    return jnp.where(mask, shifted - jnp.log(total), 0.0)


def metric(x: ArrayLike) -> Array:
    """A scalar float32 metric that carries no gradient."""
    return jax.lax.stop_gradient(f32(x))


def check_choice(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {sorted(allowed)}.")


def preference_metrics(
    chosen_rewards: Array, rejected_rewards: Array, pc: Array, pr: Array, valid: Array, n: Array
) -> dict[str, Array]:
    """TRL's ``rewards/*`` and ``logps/*`` metrics, each a masked sum divided by N."""
    return {
        "rewards/chosen": metric(masked_sum(chosen_rewards, valid) / n),
        "rewards/rejected": metric(masked_sum(rejected_rewards, valid) / n),
        "rewards/accuracies": metric(masked_sum(chosen_rewards > rejected_rewards, valid) / n),
        "rewards/margins": metric(masked_sum(chosen_rewards - rejected_rewards, valid) / n),
        "logps/chosen": metric(masked_sum(pc, valid) / n),
        "logps/rejected": metric(masked_sum(pr, valid) / n),
    }


def reduce_nll(chosen_nll: ArrayLike, valid: Array, n: Array) -> Array:
    """A scalar NLL is used as is; a per-pair ``[B]`` NLL is summed over valid pairs and divided by N."""
    nll = f32(chosen_nll)
    return nll if nll.ndim == 0 else masked_sum(nll, valid) / n
