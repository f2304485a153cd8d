"""Bradley-Terry reward-model loss, as TRL 1.16's ``RewardTrainer.compute_loss``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._utils import Array, ArrayLike, as_mask, clean, f32, masked_sum, metric, normaliser
from .registry import register_loss


@register_loss("reward")
def reward_loss(
    chosen_rewards: ArrayLike,
    rejected_rewards: ArrayLike,
    *,
    margin: ArrayLike | None = None,
    center_rewards_coefficient: float | None = None,
    mask: ArrayLike | None = None,
    num_items: ArrayLike | None = None,
) -> tuple[Array, dict[str, Array]]:
    """``mean(-logsigmoid(c - r - margin)) + center_rewards_coefficient * mean((c + r)^2)``.

    Args:
      chosen_rewards, rejected_rewards: ``[B]`` scalar rewards (the reward head's outputs).
      margin: optional ``[B]`` (or scalar) desired margin, subtracted inside the sigmoid.
      center_rewards_coefficient: optional weight of the centring term (TRL's name; paper 1e-2).
      mask: ``[B]`` bool valid pairs; num_items: divisor N (default: valid pairs).

    Returns:
      ``(loss, metrics)``: ``accuracy`` (fraction with c > r), ``margin`` (mean c - r) and
      ``mean_reward`` (mean over both), TRL's names; all divided by N.
    """
    valid = as_mask(mask, jnp.shape(chosen_rewards))
    c, r = clean(chosen_rewards, valid), clean(rejected_rewards, valid)
    n = normaliser(jnp.sum(valid), num_items)
    diff = c - r if margin is None else c - r - clean(jnp.broadcast_to(f32(margin), c.shape), valid)
    loss = masked_sum(-jax.nn.log_sigmoid(diff), valid) / n
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * masked_sum((c + r) ** 2, valid) / n
    metrics = {
        "accuracy": metric(masked_sum((c > r).astype(jnp.float32), valid) / n),
        "margin": metric(masked_sum(c - r, valid) / n),
        "mean_reward": metric(masked_sum(c + r, valid) / (2.0 * n)),
    }
    return loss, metrics
