"""ORPO (odds-ratio preference optimisation), as TRL 1.16's ``trl.experimental.orpo.ORPOTrainer``.

With per-token **average** log-probs ``c`` (chosen) and ``r`` (rejected), ``log_odds(x) = x - log(1 - e^x)``:

    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    ratio    = logsigmoid(log_odds)
    loss     = chosen_nll - beta * mean(ratio)

``chosen_nll`` is the supervised NLL of the chosen completions (TRL: token-mean cross-entropy over the
chosen sequences, prompt included unless masked). Deviation from TRL: the average log-probs are clamped
at ``-1e-6`` before ``log1mexp`` so that a sequence with average log-prob exactly 0 (possible in float32)
gives a large finite loss and gradient instead of inf / NaN; values below the clamp are unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._utils import (
    Array,
    ArrayLike,
    as_mask,
    clean,
    f32,
    masked_sum,
    metric,
    normaliser,
    preference_metrics,
    reduce_nll,
)
from .registry import register_loss

_MAX_MEAN_LOGP = -1e-6


def log1mexp(x: ArrayLike) -> Array:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-log 2`` (as TRL's ``log1mexp``)."""
    x = f32(x)
    low = x < -0.6931471805599453
    # Each branch only sees inputs where it is accurate and finite (double-where for safe gradients).
    x_low = jnp.where(low, x, -1.0)
    x_high = jnp.where(low, -0.5, x)
    return jnp.where(low, jnp.log1p(-jnp.exp(x_low)), jnp.log(-jnp.expm1(x_high)))


@register_loss("orpo")
def orpo_loss(
    chosen_mean_logps: ArrayLike,
    rejected_mean_logps: ArrayLike,
    chosen_nll: ArrayLike,
    *,
    beta: float = 0.1,
    mask: ArrayLike | None = None,
    num_items: ArrayLike | None = None,
) -> tuple[Array, dict[str, Array]]:
    """ORPO loss ``chosen_nll - beta * mean(logsigmoid(log_odds))``.

    Args:
      chosen_mean_logps, rejected_mean_logps: ``[B]`` per-token **average** completion log-probs (< 0).
      chosen_nll: scalar chosen NLL (already reduced, e.g. :func:`cross_entropy_loss` of the chosen
        sequences), or ``[B]`` per-pair NLLs (summed over valid pairs and divided by N).
      beta: ORPO lambda (TRL ``beta``, axolotl ``orpo_alpha``).
      mask: ``[B]`` bool valid pairs; num_items: divisor N (default: valid pairs).

    Returns:
      ``(loss, metrics)`` with TRL's names: ``nll_loss``, ``log_odds_ratio`` (= mean logsigmoid(log_odds),
      TRL's naming), ``log_odds_chosen`` (= mean log_odds), ``rewards/chosen`` (``beta * c``),
      ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``.
    """
    valid = as_mask(mask, jnp.shape(chosen_mean_logps))
    pc, pr = clean(chosen_mean_logps, valid, -1.0), clean(rejected_mean_logps, valid, -1.0)
    n = normaliser(jnp.sum(valid), num_items)
    b = float(beta)
    c = jnp.minimum(pc, _MAX_MEAN_LOGP)
    r = jnp.minimum(pr, _MAX_MEAN_LOGP)
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    ratio = jax.nn.log_sigmoid(log_odds)
    nll = reduce_nll(chosen_nll, valid, n)
    loss = nll - b * masked_sum(ratio, valid) / n
    metrics = preference_metrics(b * pc, b * pr, pc, pr, valid, n)
    metrics.update(
        {
            "nll_loss": metric(nll),
            "log_odds_ratio": metric(masked_sum(ratio, valid) / n),
            "log_odds_chosen": metric(masked_sum(log_odds, valid) / n),
        }
    )
    return loss, metrics
