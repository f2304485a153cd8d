"""Losses straight from hidden states and the LM-head weight, without materialising [N, V] logits.

Each function makes one call to ``jaxpref.pallas.linear_logsumexp_gather`` (log-sum-exp over the
vocabulary at the temperatures it needs, plus the raw logits at a few ids per position) and hands the
result to the ``*_from_gathered`` loss, so values and gradients equal the full-logits losses
(``kd_loss``, ``token_logps``) up to float32 rounding.

Hidden states may carry leading dims ``[..., H]``; they are flattened here. Ids outside the vocabulary
(e.g. -100 label padding) are clipped into it, exactly as ``gather_logits`` does; mask those positions.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxpref.pallas import linear_logsumexp_gather

from ._utils import Array, ArrayLike
from .kd import kd_loss_from_gathered
from .logps import token_logps_from_gathered


def _lse_and_gathered(
    hidden: ArrayLike,
    lm_head_weight: ArrayLike,
    ids: Array,
    temperatures: tuple[float, ...],
    impl: str,
    block_n: int | None,
    block_v: int | None,
) -> tuple[Array, Array]:
    """Kernel call on flattened rows: ids [..., K'] -> (lse [T, ...], gathered [..., K'])."""
    hidden = jnp.asarray(hidden)
    weight = jnp.asarray(lm_head_weight)
    lead = hidden.shape[:-1]
    if ids.shape[:-1] != lead:
        raise ValueError(f"ids leading dims {ids.shape[:-1]} do not match hidden {hidden.shape}")
    ids = jnp.clip(ids.astype(jnp.int32), 0, weight.shape[1] - 1)
    lse, gathered = linear_logsumexp_gather(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        ids.reshape(-1, ids.shape[-1]),
        temperatures=temperatures,
        impl=impl,
        block_n=block_n,
        block_v=block_v,
    )
    return lse.reshape((len(temperatures),) + lead), gathered.reshape(ids.shape)


def fused_kd_loss(
    hidden: ArrayLike,
    lm_head_weight: ArrayLike,
    target_token_ids: ArrayLike,
    target_logprobs: ArrayLike,
    target_mask: ArrayLike,
    labels: ArrayLike,
    *,
    kd_alpha: float = 1.0,
    kd_ce_alpha: float = 0.0,
    loss_mask: ArrayLike | None = None,
    temperature: float = 1.0,
    beta: float = 0.0,
    normalize_topk: bool = False,
    zscore_base_temp: float | None = None,
    num_items: ArrayLike | None = None,
    impl: str = "auto",
    block_n: int | None = None,
    block_v: int | None = None,
) -> tuple[Array, dict[str, Array]]:
    """``kd_loss`` (``kd_alpha * KD + kd_ce_alpha * CE``) computed from hidden states.

    Args:
      hidden: ``[..., H]`` final hidden states (after the final norm), any float dtype.
      lm_head_weight: ``[H, V]``.
      target_token_ids: ``[..., K]`` int teacher top-k ids; target_logprobs: ``[..., K]``;
        target_mask: ``[..., K]`` or ``[...]``; labels: ``[...]`` int next tokens.
      kd_alpha, kd_ce_alpha, loss_mask, temperature, beta, normalize_topk, zscore_base_temp, num_items:
        as :func:`jaxpref.losses.kd_loss` (temperature is a static Python float).
      impl, block_n, block_v: kernel choice and tile overrides (see ``linear_logsumexp_gather``).

    Returns:
      ``(loss, metrics)`` equal to ``kd_loss(hidden @ lm_head_weight, ...)``.
    """
    t = float(temperature)
    tt_ids = jnp.asarray(target_token_ids)
    lbl = jnp.asarray(labels)
    ids = jnp.concatenate([tt_ids.astype(jnp.int32), lbl.astype(jnp.int32)[..., None]], axis=-1)
    # One kernel call: lse at T for KD and at 1 for CE (the same row when T == 1).
    temps = (t,) if t == 1.0 else (t, 1.0)
    lse, gathered = _lse_and_gathered(hidden, lm_head_weight, ids, temps, impl, block_n, block_v)
    k = tt_ids.shape[-1]
    return kd_loss_from_gathered(
        gathered[..., :k],
        lse[0],
        target_logprobs,
        target_mask,
        gathered[..., k],
        lse[-1],
        kd_alpha=kd_alpha,
        kd_ce_alpha=kd_ce_alpha,
        loss_mask=loss_mask,
        temperature=t,
        beta=beta,
        normalize_topk=normalize_topk,
        zscore_base_temp=zscore_base_temp,
        num_items=num_items,
    )


def fused_token_logps(
    hidden: ArrayLike,
    lm_head_weight: ArrayLike,
    labels: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    temperature: float = 1.0,
    impl: str = "auto",
    block_n: int | None = None,
    block_v: int | None = None,
) -> Array:
    """``token_logps(hidden @ lm_head_weight, labels)`` without the [..., V] logits.

    Args:
      hidden: ``[..., H]``; lm_head_weight: ``[H, V]``; labels: ``[...]`` int.
      mask: optional ``[...]`` bool; masked positions return 0.
      temperature: softmax temperature (static Python float).
      impl, block_n, block_v: see ``linear_logsumexp_gather``.

    Returns:
      ``[...]`` float32 per-token log-probabilities (nats) of the labels.
    """
    t = float(temperature)
    ids = jnp.asarray(labels).astype(jnp.int32)[..., None]
    lse, gathered = _lse_and_gathered(hidden, lm_head_weight, ids, (t,), impl, block_n, block_v)
    return token_logps_from_gathered(gathered[..., 0], lse[0], mask=mask, temperature=t)


__all__ = ["fused_kd_loss", "fused_token_logps"]
