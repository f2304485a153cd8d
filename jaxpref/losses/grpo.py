"""GRPO's policy loss (and DAPO, Dr. GRPO, BNPO, GSPO), as TRL 1.16's ``GRPOTrainer._compute_loss``.

One sampled completion per row. Inputs are prediction-aligned ``[B, T]`` float32 arrays (position t
scores the token at t + 1; ``mask`` marks the completion tokens): the policy's log-probs ``logps``
(at the sampling temperature), the sampling policy's ``old_logps`` (None: ``stop_gradient(logps)``,
as TRL when ``old_per_token_logps`` is None, i.e. ``num_iterations`` 1), the reference's ``ref_logps``
(only read when ``beta`` != 0) and the per-row ``advantages`` ``[B]``. With ``m`` the mask,
``n_i = sum_t m_it`` and ``A_i`` the advantage:

    importance ratio    r_it = exp(logps_it - old_it)                                  (token level)
                        r_i  = exp(sum_t m_it (logps_it - old_it) / max(n_i, 1))      (sequence level, GSPO)
    clipped ratio       c = clip(r, 1 - epsilon_low, 1 + epsilon_high)
    two-sided clipping  r <- min(r, delta)                                             (when delta is set)
    k3 KL estimate      k_it = exp(ref_it - logps_it) - (ref_it - logps_it) - 1   (x r when use_bias_correction_kl)
    per-token loss      l_it = -min(r A_i, c A_i) + beta k_it

and the loss type says how the masked ``l`` are averaged. jaxpref returns each micro-batch's
*contribution* ``sum / num_items`` (``jaxpref/objectives/base.py``), ``num_items`` being the step's summed
:func:`grpo_count`, so accumulation and data parallelism give one big batch's loss:

    loss_type  count (per micro-batch)            summed term                    TRL 1.16
    grpo       real rows                          sum_i sum_t m l / max(n_i, 1)  mean over rows of row token means
    dapo       completion tokens                  sum_it m l                     sum / the step's completion tokens
    bnpo       completion tokens                  sum_it m l                     (see below)
    dr_grpo    real rows x max_completion_length  sum_it m l                     sum / (rows x max_completion_length)

TRL's ``bnpo`` divides each micro-batch's sum by *that micro-batch's* tokens and averages micro-batches
(and processes); jaxpref's bnpo equals TRL's for one micro-batch per step and equals ``dapo`` (the
step-wide token mean) across accumulation and devices. TRL's ``grpo`` and ``dr_grpo`` divide per
micro-batch and average, which is jaxpref's number whenever micro-batches hold equally many real rows
(always, for GRPO batches). A "real row" is one given by ``rows`` (default: every row), counted even
when its mask is empty (TRL's ``mask_truncated_completions`` rows count in ``grpo``'s row mean too).

Metrics, TRL's names, each a contribution: the micro-batch's value times its share of the step's count
(``count_here / num_items``). Summed over micro-batches that is the count-weighted mean of the
micro-batch values: for ``grpo`` and ``dr_grpo`` (equal rows per micro-batch) exactly TRL's logged
mean over micro-batches; for ``dapo``/``bnpo`` token-weighted, i.e. the token mean over the whole step
(TRL averages the micro-batch values unweighted: equal for one micro-batch per step).

* ``kl`` (``beta`` != 0): token mean of ``k`` (after the bias correction), over completion tokens.
* ``entropy`` (``entropies`` given): token mean of the per-token entropy.
* ``clip_ratio/low_mean``: fraction with ``r < 1 - epsilon_low`` and ``A < 0``; ``clip_ratio/high_mean``:
  ``r > 1 + epsilon_high`` and ``A > 0``; ``clip_ratio/region_mean``: either. Token means at token
  level; at sequence level means over real rows (TRL's ``global_masked_mean`` of a [B, 1] tensor), ``r``
  being the ratio after ``delta`` as in TRL.
* ``clip_ratio/low_min`` / ``clip_ratio/high_max``: min / max over rows of the per-row fraction
  (token level: rows with completion tokens; sequence level: real rows), as TRL's ``nanmin``/``nanmax``
  of ``masked_seq_mean``; 0 where TRL reports NaN (no such row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._utils import Array, ArrayLike, as_mask, check_choice, f32, metric, normaliser
from .registry import register_loss

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def _rows(rows: ArrayLike | None, batch: int) -> Array:
    return as_mask(rows, (batch,))


def grpo_count(
    mask: ArrayLike, rows: ArrayLike | None = None, *, loss_type: str, max_completion_length: int | None = None
) -> Array:
    """The micro-batch's items for ``loss_type`` (float32 scalar): real rows (``grpo``), completion tokens
    (``bnpo``, ``dapo``), real rows x ``max_completion_length`` (``dr_grpo``).

    Args:
      mask: ``[B, T]`` bool completion tokens; rows: optional ``[B]`` bool real rows (default: all).
    """
    check_choice("GRPO loss_type", loss_type, GRPO_LOSS_TYPES)
    m = jnp.asarray(mask).astype(bool)
    real = _rows(rows, m.shape[0])
    if loss_type in ("bnpo", "dapo"):
        return jnp.sum((m & real[:, None]).astype(jnp.float32))
    n_rows = jnp.sum(real.astype(jnp.float32))
    if loss_type == "grpo":
        return n_rows
    if max_completion_length is None:
        raise ValueError("loss_type dr_grpo needs max_completion_length")
    return n_rows * float(max_completion_length)


def _safe_div(x: Array, count: Array) -> Array:
    return x / jnp.where(count > 0, count, 1.0)


@register_loss("grpo")
def grpo_loss(
    logps: ArrayLike,
    old_logps: ArrayLike | None,
    ref_logps: ArrayLike | None,
    advantages: ArrayLike,
    mask: ArrayLike,
    *,
    rows: ArrayLike | None = None,
    entropies: ArrayLike | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    beta: float = 0.0,
    use_bias_correction_kl: bool = True,
    max_completion_length: int | None = None,
    num_items: ArrayLike | None = None,
) -> tuple[Array, dict[str, Array]]:
    """GRPO's clipped surrogate plus ``beta`` x the k3 KL (the module docstring has the formulas).

    Args:
      logps: ``[B, T]`` policy log-probs of the labels at the sampling temperature (differentiated).
      old_logps: ``[B, T]`` the sampling policy's, or None (``stop_gradient(logps)``: ratio 1).
      ref_logps: ``[B, T]`` the reference model's; read only when ``beta`` != 0.
      advantages: ``[B]`` per-row advantages.
      mask: ``[B, T]`` bool completion tokens (prediction-aligned).
      rows: ``[B]`` bool real rows (default: all); padding rows contribute nothing and are not counted.
      entropies: optional ``[B, T]`` per-token policy entropy (no gradient) for the ``entropy`` metric.
      loss_type, importance_sampling_level, epsilon_low, epsilon_high (None: ``epsilon_low``), delta,
        beta, use_bias_correction_kl, max_completion_length (``dr_grpo``): TRL ``GRPOConfig``'s meanings.
      num_items: the step's summed :func:`grpo_count` (default: this micro-batch's).

    Returns:
      ``(loss, metrics)``: the micro-batch's contribution and TRL's metrics as contributions.
    """
    check_choice("GRPO loss_type", loss_type, GRPO_LOSS_TYPES)
    check_choice("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    eps_low = float(epsilon_low)
    eps_high = eps_low if epsilon_high is None else float(epsilon_high)
    lp = f32(logps)
    real = _rows(rows, lp.shape[0])
    m = jnp.asarray(mask).astype(bool) & real[:, None]
    mf = m.astype(jnp.float32)
    lp = jnp.where(m, lp, 0.0)  # padding content reaches neither the value nor the gradient
    old = jax.lax.stop_gradient(lp) if old_logps is None else jnp.where(m, f32(old_logps), 0.0)
    adv = jnp.where(real, f32(advantages), 0.0)[:, None]  # [B, 1]
    n_tok = jnp.sum(mf, axis=-1)  # [B]

    log_ratio = lp - old
    if importance_sampling_level == "token":
        log_iw = log_ratio  # [B, T]
    else:
        log_iw = (jnp.sum(log_ratio * mf, axis=-1) / jnp.maximum(n_tok, 1.0))[:, None]  # [B, 1]
    coef_1 = jnp.exp(log_iw)

    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("grpo_loss: beta != 0 needs ref_logps")
        d = jnp.where(m, f32(ref_logps), 0.0) - lp
        per_token_kl = jnp.exp(d) - d - 1.0
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    coef_2 = jnp.clip(coef_1, 1.0 - eps_low, 1.0 + eps_high)
    if delta is not None:
        coef_1 = jnp.minimum(coef_1, float(delta))
    per_token_loss = -jnp.minimum(coef_1 * adv, coef_2 * adv)
    if beta != 0.0:
        per_token_loss = per_token_loss + float(beta) * per_token_kl
    per_token_loss = jnp.broadcast_to(per_token_loss, m.shape)

    count_here = grpo_count(m, real, loss_type=loss_type, max_completion_length=max_completion_length)
    n = normaliser(count_here, num_items)
    masked = jnp.where(m, per_token_loss, 0.0)
    if loss_type == "grpo":
        total = jnp.sum(jnp.sum(masked, axis=-1) / jnp.maximum(n_tok, 1.0))
    else:
        total = jnp.sum(masked)
    loss = total / n

    share = count_here / n  # this micro-batch's share of the step's count: mean -> contribution
    n_all = jnp.sum(mf)
    n_rows = jnp.sum(real.astype(jnp.float32))

    def token_mean(x: Array) -> Array:
        return metric(_safe_div(jnp.sum(jnp.where(m, jnp.broadcast_to(x, m.shape), 0.0)), n_all) * share)

    metrics: dict[str, Array] = {}
    if beta != 0.0:
        metrics["kl"] = token_mean(per_token_kl)
    if entropies is not None:
        metrics["entropy"] = token_mean(f32(entropies))

    is_low = ((coef_1 < 1.0 - eps_low) & (adv < 0)).astype(jnp.float32)
    is_high = ((coef_1 > 1.0 + eps_high) & (adv > 0)).astype(jnp.float32)
    is_region = jnp.maximum(is_low, is_high)
    if importance_sampling_level == "token":
        for name, x in (("low_mean", is_low), ("high_mean", is_high), ("region_mean", is_region)):
            metrics[f"clip_ratio/{name}"] = token_mean(x)
        low_row = _safe_div(jnp.sum(is_low * mf, axis=-1), n_tok)  # [B]; TRL: NaN for empty rows
        high_row = _safe_div(jnp.sum(is_high * mf, axis=-1), n_tok)
        has_value = real & (n_tok > 0)
    else:
        for name, x in (("low_mean", is_low), ("high_mean", is_high), ("region_mean", is_region)):
            metrics[f"clip_ratio/{name}"] = metric(_safe_div(jnp.sum(jnp.where(real, x[:, 0], 0.0)), n_rows) * share)
        low_row, high_row, has_value = is_low[:, 0], is_high[:, 0], real
    any_value = jnp.any(has_value)
    low_min = jnp.where(any_value, jnp.min(jnp.where(has_value, low_row, jnp.inf)), 0.0)
    high_max = jnp.where(any_value, jnp.max(jnp.where(has_value, high_row, -jnp.inf)), 0.0)
    metrics["clip_ratio/low_min"] = metric(low_min * share)
    metrics["clip_ratio/high_max"] = metric(high_max * share)
    return loss, metrics


__all__ = ["GRPO_LOSS_TYPES", "IMPORTANCE_SAMPLING_LEVELS", "grpo_count", "grpo_loss"]
