"""Losses straight from hidden states and the LM-head weight, without materialising [N, V] logits.

``fused_kd_loss`` and ``fused_cross_entropy`` are sums of per-token terms, so they go through
``jaxpref.pallas.linear_logsumexp_gather_loss`` (on CPU: value and gradient in one pass over the
vocabulary); ``fused_token_logps`` returns per-token values for sequence-level losses (DPO & co.) and
uses ``linear_logsumexp_gather`` (log-sum-exp at the temperatures needed plus the raw logits at a few
ids). Values and gradients equal the full-logits losses (``kd_loss``, ``cross_entropy_loss``,
``token_logps``) up to float32 rounding.

Hidden states may carry leading dims ``[..., H]``; they are flattened here. Ids outside the vocabulary
(e.g. -100 label padding) are clipped into it, exactly as ``gather_logits`` does; mask those positions.

``softcap`` (every function; static float or None): final logit soft-capping as Gemma 2 applies it in the
model, ``logits = softcap * tanh(hidden @ lm_head_weight / softcap)``, *before* any temperature. The
kernels cap each vocabulary tile (the gathered logits are capped in-kernel too), so the values and
gradients equal the full-logits losses on the capped logits. Callers pass
``model.config.final_logit_softcapping``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpref.pallas import linear_logsumexp_gather, linear_logsumexp_gather_loss, linear_softmax_entropy

from ._utils import Array, ArrayLike, as_mask, metric, normaliser
from .kd import kd_loss_from_gathered, kd_trainable_positions
from .logps import cross_entropy_from_gathered, log_sum_sq_probs_from_gathered, token_logps_from_gathered


def _flat_ids(hidden: Array, ids: Array, vocab: int) -> tuple[Array, Array]:
    """hidden [..., H] -> [N, H]; ids [..., K'] -> int32 [N, K'] clipped into the vocabulary."""
    if ids.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(f"ids leading dims {ids.shape[:-1]} do not match hidden {hidden.shape}")
    ids = jnp.clip(ids.astype(jnp.int32), 0, vocab - 1)
    return hidden.reshape(-1, hidden.shape[-1]), ids.reshape(-1, ids.shape[-1])


def _lse_and_gathered(
    hidden: ArrayLike,
    lm_head_weight: ArrayLike,
    ids: Array,
    temperatures: tuple[float, ...],
    softcap: float | None,
    impl: str,
    block_n: int | None,
    block_v: int | None,
) -> tuple[Array, Array]:
    """Kernel call on flattened rows: ids [..., K'] -> (lse [T, ...], gathered [..., K'])."""
    hidden, weight = jnp.asarray(hidden), jnp.asarray(lm_head_weight)
    h, flat_ids = _flat_ids(hidden, ids, weight.shape[1])
    lse, gathered = linear_logsumexp_gather(
        h, weight, flat_ids, temperatures=temperatures, softcap=softcap, impl=impl, block_n=block_n,
        block_v=block_v,
    )  # fmt: skip
    return lse.reshape((len(temperatures),) + hidden.shape[:-1]), gathered.reshape(ids.shape)


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
    softcap: float | None = None,
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
      softcap: the student's final logit soft-cap (module docstring); None: none.
      impl, block_n, block_v: kernel choice and tile overrides (see ``linear_logsumexp_gather``).

    Returns:
      ``(loss, metrics)`` equal to ``kd_loss(logits, ...)``, ``logits = hidden @ lm_head_weight`` (capped).
    """
    t = float(temperature)
    hidden, weight = jnp.asarray(hidden), jnp.asarray(lm_head_weight)
    tt_ids = jnp.asarray(target_token_ids)
    k = tt_ids.shape[-1]
    ids = jnp.concatenate([tt_ids.astype(jnp.int32), jnp.asarray(labels).astype(jnp.int32)[..., None]], axis=-1)
    h, flat_ids = _flat_ids(hidden, ids, weight.shape[1])
    target_logprobs = jnp.asarray(target_logprobs)
    target_mask = jnp.broadcast_to(jnp.asarray(target_mask), target_logprobs.shape)
    trainable = kd_trainable_positions(target_logprobs, target_mask, loss_mask)
    n = normaliser(jnp.sum(trainable), num_items)  # over all rows: the one-pass kernel sees row chunks
    inputs = {
        "lp": target_logprobs.reshape(-1, k),
        "mask": target_mask.reshape(-1, k),
        "trainable": trainable.reshape(-1),
    }
    opts = dict(
        kd_alpha=kd_alpha, kd_ce_alpha=kd_ce_alpha, temperature=t, beta=beta, normalize_topk=normalize_topk,
        zscore_base_temp=zscore_base_temp,
    )  # fmt: skip

    def terms(lse, gathered, inp, num_items):
        return kd_loss_from_gathered(
            gathered[:, :k], lse[0], inp["lp"], inp["mask"], gathered[:, k], lse[-1],
            loss_mask=inp["trainable"], num_items=num_items, **opts,
        )  # fmt: skip

    # One kernel call: lse at T for KD and at 1 for CE (the same row when T == 1). The kernel sums the
    # per-token terms (divisor 1); dividing by N afterwards is exact.
    temps = (t,) if t == 1.0 else (t, 1.0)
    total, lse, gathered = linear_logsumexp_gather_loss(
        h, weight, flat_ids, lambda lse, g, inp: terms(lse, g, inp, 1.0)[0], inputs,
        temperatures=temps, softcap=softcap, impl=impl, block_n=block_n, block_v=block_v,
    )  # fmt: skip
    loss = total / n
    _, metrics = terms(lse, gathered, inputs, n)  # from the kernel's (gradient-free) lse and gathered
    return loss, {**metrics, "loss": metric(loss)}


def fused_cross_entropy(
    hidden: ArrayLike,
    lm_head_weight: ArrayLike,
    labels: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    num_items: ArrayLike | None = None,
    softcap: float | None = None,
    impl: str = "auto",
    block_n: int | None = None,
    block_v: int | None = None,
) -> tuple[Array, dict[str, Array]]:
    """``cross_entropy_loss(hidden @ lm_head_weight, labels, ...)`` without the [..., V] logits (the SFT loss).

    Args:
      hidden: ``[..., H]``; lm_head_weight: ``[H, V]``; labels: ``[...]`` int.
      mask: optional ``[...]`` bool trainable tokens; num_items: divisor N (default: their number).
      softcap: final logit soft-cap (module docstring); None: none.
      impl, block_n, block_v: see ``linear_logsumexp_gather_loss``.

    Returns:
      ``(loss, {"ce_loss": loss})``, ``loss = sum_t -log p(label_t) / N`` (float32, nats per token).
    """
    hidden, weight = jnp.asarray(hidden), jnp.asarray(lm_head_weight)
    h, flat_ids = _flat_ids(hidden, jnp.asarray(labels)[..., None], weight.shape[1])
    m = as_mask(mask, hidden.shape[:-1])
    n = normaliser(jnp.sum(m), num_items)

    def nll_sum(lse, gathered, row_mask):
        return cross_entropy_from_gathered(gathered[:, 0], lse[0], mask=row_mask, num_items=1.0)[0]

    total, _, _ = linear_logsumexp_gather_loss(
        h, weight, flat_ids, nll_sum, m.reshape(-1), softcap=softcap, impl=impl, block_n=block_n, block_v=block_v
    )
    loss = total / n
    return loss, {"ce_loss": metric(loss)}


def fused_token_logps(
    hidden: ArrayLike,
    lm_head_weight: ArrayLike,
    labels: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    impl: str = "auto",
    block_n: int | None = None,
    block_v: int | None = None,
) -> Array:
    """``token_logps(hidden @ lm_head_weight, labels)`` without the [..., V] logits.

    Args:
      hidden: ``[..., H]``; lm_head_weight: ``[H, V]``; labels: ``[...]`` int.
      mask: optional ``[...]`` bool; masked positions return 0.
      temperature: softmax temperature (static Python float); it divides the capped logits.
      softcap: final logit soft-cap (module docstring); None: none.
      impl, block_n, block_v: see ``linear_logsumexp_gather``.

    Returns:
      ``[...]`` float32 per-token log-probabilities (nats) of the labels.
    """
    t = float(temperature)
    ids = jnp.asarray(labels).astype(jnp.int32)[..., None]
    lse, gathered = _lse_and_gathered(hidden, lm_head_weight, ids, (t,), softcap, impl, block_n, block_v)
    return token_logps_from_gathered(gathered[..., 0], lse[0], mask=mask, temperature=t)


def fused_token_logps_and_log_sum_sq_probs(
    hidden: ArrayLike,
    lm_head_weight: ArrayLike,
    labels: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    impl: str = "auto",
    block_n: int | None = None,
    block_v: int | None = None,
) -> tuple[Array, Array]:
    """:func:`fused_token_logps` and, from the same sweep over the vocabulary, ``log sum_v p_v^2``.

    One kernel call with the log-sum-exp at temperatures ``T`` and ``T / 2``:
    ``log sum_v p_v^2 = lse(z / (T / 2)) - 2 lse(z / T)`` (:func:`log_sum_sq_probs_from_gathered`).
    The second output carries no gradient (TRL's ``log_sum_sq_probs``, used by WPO weights, is
    non-differentiable too).

    Returns:
      ``(logps [...], log_sum_sq_probs [...])`` float32; 0 where ``mask`` is False.
    """
    t = float(temperature)
    ids = jnp.asarray(labels).astype(jnp.int32)[..., None]
    lse, gathered = _lse_and_gathered(hidden, lm_head_weight, ids, (t, t / 2.0), softcap, impl, block_n, block_v)
    logps = token_logps_from_gathered(gathered[..., 0], lse[0], mask=mask, temperature=t)
    sq = log_sum_sq_probs_from_gathered(jax.lax.stop_gradient(lse[0]), jax.lax.stop_gradient(lse[1]), mask=mask)
    return logps, sq


def fused_token_entropy(
    hidden: ArrayLike,
    lm_head_weight: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    impl: str = "auto",
    block_n: int | None = None,
    block_v: int | None = None,
) -> Array:
    """Per-token entropy of ``softmax(hidden @ lm_head_weight / temperature)`` without the [..., V] logits.

    ``H = logsumexp(z) - sum_v softmax(z)_v z_v``, ``z = logits / temperature`` (nats), from one blocked
    forward pass over the vocabulary (``jaxpref.pallas.linear_softmax_entropy``); no gradient (a metric).
    ``impl="reference"`` uses full logits (tests); any other value the blocked XLA pass, with the
    ``block_n`` / ``block_v`` overrides applied only when ``impl`` names the XLA kernel (tiles chosen
    for a Pallas kernel mean nothing to it).

    Args:
      hidden: ``[..., H]``; lm_head_weight: ``[H, V]``; mask: optional ``[...]`` bool (0 where False).
      temperature: static Python float; softcap: final logit soft-cap (module docstring), None: none.

    Returns:
      ``[...]`` float32.
    """
    hidden, weight = jnp.asarray(hidden), jnp.asarray(lm_head_weight)
    xla = impl in ("xla", "xla_chunked")
    ent = linear_softmax_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, temperature=float(temperature), softcap=softcap,
        impl="reference" if impl == "reference" else "xla_chunked",
        block_n=block_n if xla else None, block_v=block_v if xla else None,
    ).reshape(hidden.shape[:-1])  # fmt: skip
    if mask is not None:
        ent = jnp.where(jnp.asarray(mask).astype(bool), ent, 0.0)
    return ent


__all__ = [
    "fused_cross_entropy",
    "fused_kd_loss",
    "fused_token_entropy",
    "fused_token_logps",
    "fused_token_logps_and_log_sum_sq_probs",
]
