"""Reward-model objective (``reward_model: true``): Bradley-Terry loss on a scalar ``score`` head.

Pair batches as for DPO; chosen and rejected go through one forward pass ([2B, T]); each sequence's
reward is the score head (``jaxpref.models.reward``) at its last real token, as TRL 1.16's
``RewardTrainer`` with a transformers ``*ForSequenceClassification`` model computes it. Loss
``-logsigmoid(r_chosen - r_rejected)`` summed over real pairs / ``num_items`` (pairs of the step),
plus ``center_rewards_coefficient * (r_chosen + r_rejected)^2`` likewise when that key is set (TRL's
centring term); metrics ``accuracy``, ``margin``, ``mean_reward`` (TRL's names) plus ``rewards/chosen`` and
``rewards/rejected`` (mean rewards), all contributions. No [tokens, vocab] logits: the LM head is
not used at all.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxpref import batch_keys as keys
from jaxpref.losses import reward_loss
from jaxpref.losses._utils import masked_sum
from jaxpref.models.reward import sequence_rewards
from jaxpref.objectives.base import Batch, Objective
from jaxpref.objectives.preference import concat_sides, pair_count
from jaxpref.objectives.registry import register_objective


@register_objective("reward")
def build_reward(cfg: Any) -> Objective:
    center = cfg.center_rewards_coefficient  # None: no centring term (TRL's default)
    center = None if center is None else float(center)

    def loss(model: Any, batch: Batch, num_items: jax.Array, *, train: bool, companions: Any = None):
        seqs = concat_sides(batch)
        n = batch["pair_mask"].shape[0]
        mask = batch["pair_mask"].astype(bool)
        rewards = sequence_rewards(
            model,
            seqs["input_ids"],
            positions=seqs["positions"],
            segment_ids=seqs["segment_ids"],
            deterministic=not train,
        )
        value, metrics = reward_loss(
            rewards[:n], rewards[n:], center_rewards_coefficient=center, mask=mask, num_items=num_items
        )
        denom = jnp.where(num_items > 0, num_items, 1.0)
        metrics["rewards/chosen"] = jax.lax.stop_gradient(masked_sum(rewards[:n], mask) / denom)
        metrics["rewards/rejected"] = jax.lax.stop_gradient(masked_sum(rewards[n:], mask) / denom)
        return value, metrics

    return Objective(
        name="reward",
        count=pair_count,
        loss=loss,
        batch_keys=keys.PAIR,
        sequences=keys.PAIR_SIDES,
        data="preference",
        score_head=True,
    )
