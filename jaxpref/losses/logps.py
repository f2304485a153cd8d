"""Per-token and per-sequence log-probabilities, and the cross-entropy (SFT) loss.

Inputs are *prediction-aligned*: ``labels[..., t]`` is the token the model should predict from
``logits[..., t, :]``. Nothing here shifts.

Each function exists twice: on full logits ``[..., V]`` and on *gathered* inputs (the label's raw
logit and the log-sum-exp over the vocabulary), which is what the fused LM-head kernel
(``jaxpref.losses.fused``) produces without ever materialising ``[..., V]``. The full-logits versions
only compute the log-sum-exp, gather, and call the gathered ones, so both give identical numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._utils import Array, ArrayLike, as_mask, f32, masked_sum, metric, normaliser
from .registry import register_loss


def gather_logits(logits: ArrayLike, ids: ArrayLike) -> Array:
    """``logits[..., ids]`` as float32: logits ``[..., V]``, ids ``[..., K]`` -> ``[..., K]``.

    Out-of-range ids (e.g. -100 padding) are clipped into the vocabulary; callers mask those entries.
    """
    logits = f32(logits)
    ids = jnp.clip(jnp.asarray(ids).astype(jnp.int32), 0, logits.shape[-1] - 1)
    return jnp.take_along_axis(logits, ids, axis=-1)


def token_logps_from_gathered(
    label_logits: ArrayLike,
    logsumexp: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    temperature: float = 1.0,
) -> Array:
    """Per-token log-probability of the label, from gathered inputs.

    Args:
      label_logits: ``[...]`` raw (unscaled) logit of the label.
      logsumexp: ``[...]`` ``logsumexp(logits / temperature)`` over the full vocabulary.
      mask: optional ``[...]`` bool; masked positions return 0.
      temperature: the label logit is divided by it (must match the one used for ``logsumexp``).

    Returns:
      ``[...]`` float32 ``label_logit / temperature - logsumexp`` in nats (<= 0).
    """
    lp = f32(label_logits) / temperature - f32(logsumexp)
    if mask is not None:
        lp = jnp.where(jnp.asarray(mask).astype(bool), lp, 0.0)
    return lp


def token_logps(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    temperature: float = 1.0,
) -> Array:
    """Per-token log-probability ``log softmax(logits / T)[label]``.

    Args:
      logits: ``[..., V]`` any float dtype (computed in float32).
      labels: ``[...]`` int token ids; ids outside ``[0, V)`` (e.g. -100) must be masked.
      mask: optional ``[...]`` bool; masked positions return 0.
      temperature: softmax temperature T.

    Returns:
      ``[...]`` float32 log-probabilities in nats.
    """
    z = f32(logits)
    lse = jax.nn.logsumexp(z / temperature, axis=-1)
    label_logits = gather_logits(z, jnp.asarray(labels)[..., None])[..., 0]
    return token_logps_from_gathered(label_logits, lse, mask=mask, temperature=temperature)


def log_sum_sq_probs_from_gathered(
    logsumexp: ArrayLike,
    logsumexp_half_temperature: ArrayLike,
    *,
    mask: ArrayLike | None = None,
) -> Array:
    """``log sum_v p_v^2`` of the next-token distribution ``p = softmax(z / T)``, from two log-sum-exps.

    ``log sum_v exp(2 z_v / T - 2 lse(z / T)) = lse(z / (T / 2)) - 2 lse(z / T)``: the kernel's
    log-sum-exp at temperatures ``T`` and ``T / 2`` give it without the [..., V] probabilities. WPO
    (TRL's ``use_weighting``) uses it; TRL's fused LM head returns it as ``log_sum_sq_probs``.

    Args:
      logsumexp: ``[...]`` ``logsumexp(z / T)``; logsumexp_half_temperature: ``[...]`` ``logsumexp(2 z / T)``.
      mask: optional ``[...]`` bool; masked positions return 0.

    Returns:
      ``[...]`` float32, <= 0 (the log of the probability that two draws from p agree).
    """
    out = f32(logsumexp_half_temperature) - 2.0 * f32(logsumexp)
    if mask is not None:
        out = jnp.where(jnp.asarray(mask).astype(bool), out, 0.0)
    return out


def log_sum_sq_probs(logits: ArrayLike, *, mask: ArrayLike | None = None, temperature: float = 1.0) -> Array:
    """``log sum_v softmax(logits / T)_v^2`` per position (full-logits form of
    :func:`log_sum_sq_probs_from_gathered`); ``logits`` ``[..., V]`` -> ``[...]`` float32."""
    z = f32(logits)
    lse = jax.nn.logsumexp(z / temperature, axis=-1)
    lse_half = jax.nn.logsumexp(z / (temperature / 2.0), axis=-1)
    return log_sum_sq_probs_from_gathered(lse, lse_half, mask=mask)


def _reduce_sequence(lp: Array, mask: Array) -> tuple[Array, Array]:
    total = masked_sum(lp, mask, axis=-1)
    count = jnp.sum(mask.astype(jnp.float32), axis=-1)
    return total, total / jnp.maximum(count, 1.0)


def sequence_logps_from_gathered(
    label_logits: ArrayLike,
    logsumexp: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    temperature: float = 1.0,
) -> tuple[Array, Array]:
    """Sum and mean of the per-token log-probs over the last (time) axis, from gathered inputs.

    Args:
      label_logits, logsumexp: ``[..., T]`` as in :func:`token_logps_from_gathered`.
      mask: optional ``[..., T]`` completion mask (which tokens count).

    Returns:
      ``(sum [...], mean [...])`` float32; the mean divides by ``max(#tokens, 1)`` as TRL does.
      DPO uses the sum; IPO inputs, ORPO and SimPO use the mean.
    """
    lp = token_logps_from_gathered(label_logits, logsumexp, temperature=temperature)
    return _reduce_sequence(lp, as_mask(mask, lp.shape))


def sequence_logps(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    temperature: float = 1.0,
) -> tuple[Array, Array]:
    """Sum and mean of per-token log-probs over completion tokens.

    Args:
      logits: ``[..., T, V]``; labels: ``[..., T]``; mask: optional ``[..., T]`` completion mask.

    Returns:
      ``(sum [...], mean [...])`` float32 in nats (mean = sum / max(#tokens, 1)).
    """
    lp = token_logps(logits, labels, temperature=temperature)
    return _reduce_sequence(lp, as_mask(mask, lp.shape))


def cross_entropy_from_gathered(
    label_logits: ArrayLike,
    logsumexp: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    num_items: ArrayLike | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Token-level cross-entropy from gathered inputs (temperature 1).

    Args:
      label_logits: ``[...]`` raw logit of the label; logsumexp: ``[...]`` ``logsumexp(logits)``.
      mask: optional ``[...]`` bool, trainable tokens.
      num_items: divisor N; default = number of trainable tokens here. Pass the count over the whole
        optimizer step (all micro-batches and devices) to make the result a summable contribution.

    Returns:
      ``(loss, {"ce_loss": loss})``: ``sum_t -log p(label_t) / N`` in nats per token (0 when N = 0).
    """
    nll = -token_logps_from_gathered(label_logits, logsumexp)
    m = as_mask(mask, nll.shape)
    loss = masked_sum(nll, m) / normaliser(jnp.sum(m), num_items)
    return loss, {"ce_loss": metric(loss)}


@register_loss("cross_entropy")
def cross_entropy_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    num_items: ArrayLike | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Token-level cross-entropy (the SFT loss) on full logits.

    Args:
      logits: ``[..., V]``; labels: ``[...]`` int; mask: optional ``[...]`` bool trainable tokens.
      num_items: divisor N (default: number of trainable tokens).

    Returns:
      ``(loss, {"ce_loss": loss})`` with ``loss = sum_t -log p(label_t) / N`` (float32, nats/token).
    """
    z = f32(logits)
    lse = jax.nn.logsumexp(z, axis=-1)
    label_logits = gather_logits(z, jnp.asarray(labels)[..., None])[..., 0]
    return cross_entropy_from_gathered(label_logits, lse, mask=mask, num_items=num_items)
