"""Knowledge distillation from a teacher's top-k log-probabilities.

Conventions (shared with SPEC.md "KD semantics"; inputs are prediction-aligned, nothing shifts):

* **Teacher.** ``target_logprobs`` ``[..., K]`` (already temperature-rescaled by the data pipeline) are
  renormalised by a log-softmax over the *valid* entries: ``a_k = lp_k - logsumexp_{valid}(lp)``,
  ``p_k = exp(a_k)``. Entries with ``target_mask`` False, or with a ``-inf`` log-prob, are invalid and
  never touch the value or the gradient (masked with ``where``; their content may be -inf, -1e9, NaN).
* **Student.** From raw logits ``z`` at the teacher ids and temperature T:
  ``log q_k = z_k / T - logsumexp(z / T)`` over the **full vocabulary** (mass outside the top-k is
  simply not part of the sum). With ``normalize_topk`` (axolotl ``kd_normalize_topk`` /
  ``kd_top_k_before_softmax``) the student is instead renormalised over the valid K ids:
  ``log q_k = log_softmax_{valid}(z / T)``.
* **Z-score** (``zscore_base_temp`` = b, "Logit Standardization in KD", as axolotl's
  ``topk_kd_loss_with_zscore``): over the valid entries of each row, ``std(x) = sqrt(max(var(x), 1e-9))``
  with the population variance, ``zs(x) = (x - mean(x)) / std(x)``; then
  ``a = log_softmax_{valid}(zs(lp) / b)`` (teacher: its raw log-probs; a per-row shift does not matter)
  and ``log q = log_softmax_{valid}(zs(z / T) / b)``. The student is therefore always normalised over
  the top-k in this mode (``normalize_topk`` is ignored), and T only enters through the T^2 factor.
* **Divergence** (``beta``, TRL ``GKDTrainer.generalized_jsd_loss`` convention), per position summed
  over the valid k:

  - ``beta = 0``: forward KL(teacher || student) = ``sum_k p_k (a_k - log q_k)``;
  - ``beta = 1``: reverse KL(student || teacher) = ``sum_k q_k (log q_k - a_k)``;
  - ``0 < beta < 1``: generalized JSD with mixture ``m = beta * p + (1 - beta) * q``:
    ``beta * KL(p || m) + (1 - beta) * KL(q || m)`` (``beta = 0.5`` is the symmetric JSD).
    Note the JSD goes to 0 (not to forward KL) as beta -> 0; TRL special-cases the endpoints the same way.

* **Scale.** ``value = T^2 * sum_{t,k} div / N`` with ``N = num_items`` (trainable tokens of the whole
  optimizer step) or, by default, the number of positions with at least one valid entry. jaxpref
  multiplies the *loss* by T^2, so the gradient is the gradient of exactly the logged value (axolotl's
  current trainer, its Liger path, scales only the logged value, so its gradient is 1 / T^2 of
  jaxpref's at the same ``kd_alpha``; its plain ``forward_kl.loss`` has no T^2 at all and, without
  ``num_items_in_batch``, divides by valid (t, k) entries rather than positions — jaxpref uses
  positions, as SPEC.md decides; docs/kd_vs_axolotl.md).

Metrics (float32 scalars, each a sum over positions divided by the same N, so they add up across
micro-batches when ``num_items`` is the step total):

* ``kd_loss``: the value above.
* ``teacher_entropy``: entropy (nats) of the renormalised teacher over its valid top-k.
* ``student_topk_mass``: probability mass of the full-vocabulary student at temperature T on the
  teacher's valid ids (1.0 means the student puts nothing outside the teacher's top-k).
* ``top1_agreement``: 1 when the student's highest logit *among the teacher's valid ids* is at the
  same entry as the teacher's highest log-prob (ties: first entry), else 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._utils import Array, ArrayLike, f32, masked_log_softmax, metric, normaliser
from .logps import cross_entropy_from_gathered, gather_logits
from .registry import register_loss

_ZSCORE_EPS = 1e-9  # variance floor, as axolotl


def _check_beta(beta: float) -> float:
    try:
        beta = float(beta)
    except TypeError as e:  # a tracer
        raise TypeError("kd beta must be a Python float (it selects the divergence at trace time).") from e
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"kd beta must be in [0, 1], got {beta}.")
    return beta


def _entry_mask(target_logprobs: Array, target_mask: ArrayLike) -> Array:
    """[..., K] validity: the given mask (a [...] mask broadcasts over K) and a non -inf log-prob."""
    m = jnp.asarray(target_mask).astype(bool)
    if m.ndim == target_logprobs.ndim - 1:
        m = m[..., None]
    m = jnp.broadcast_to(m, target_logprobs.shape)
    return m & (target_logprobs != -jnp.inf)


def _zscore(x: Array, m: Array) -> Array:
    count = jnp.maximum(jnp.sum(m, axis=-1, keepdims=True).astype(jnp.float32), 1.0)
    x = jnp.where(m, x, 0.0)
    mean = jnp.sum(x, axis=-1, keepdims=True) / count
    dev = jnp.where(m, x - mean, 0.0)
    var = jnp.sum(dev * dev, axis=-1, keepdims=True) / count
    return dev / jnp.sqrt(jnp.maximum(var, _ZSCORE_EPS))


def _divergence(a: Array, logq: Array, m: Array, beta: float) -> Array:
    """Per-entry divergence [..., K] (0 at invalid entries); a, logq are log-probs (0 where invalid)."""
    p = jnp.where(m, jnp.exp(a), 0.0)
    q = jnp.where(m, jnp.exp(logq), 0.0)
    if beta == 0.0:
        d = p * (a - logq)
    elif beta == 1.0:
        d = q * (logq - a)
    else:
        log_mix = jnp.logaddexp(jnp.log(beta) + a, jnp.log1p(-beta) + logq)
        d = beta * p * (a - log_mix) + (1.0 - beta) * q * (logq - log_mix)
    return jnp.where(m, d, 0.0)


def kd_topk_loss_from_gathered(
    student_topk_logits: ArrayLike,
    student_logsumexp: ArrayLike,
    target_logprobs: ArrayLike,
    target_mask: ArrayLike,
    *,
    temperature: float = 1.0,
    beta: float = 0.0,
    normalize_topk: bool = False,
    zscore_base_temp: float | None = None,
    num_items: ArrayLike | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Top-k KD loss from gathered student logits (the form the fused LM-head kernel calls).

    Args:
      student_topk_logits: ``[..., K]`` RAW (unscaled) student logits at ``target_token_ids``.
      student_logsumexp: ``[...]`` ``logsumexp(z / temperature)`` over the full vocabulary (unused
        when ``normalize_topk`` or ``zscore_base_temp`` is set).
      target_logprobs: ``[..., K]`` teacher log-probs (nats), renormalised here over valid entries.
      target_mask: ``[..., K]`` or ``[...]`` bool (a ``[...]`` mask broadcasts over K).
      temperature: KD temperature T (> 0); the loss is multiplied by T^2.
      beta: 0 forward KL, 1 reverse KL, in between generalized JSD (module docstring). Python float.
      normalize_topk: renormalise the student over the valid K ids.
      zscore_base_temp: if set, z-score standardise both sides over the valid K (module docstring).
      num_items: divisor N (default: positions with any valid entry).

    Returns:
      ``(loss, metrics)``: float32 scalar ``T^2 * sum_{t,k} div / N`` and the metrics described in the
      module docstring (``kd_loss``, ``teacher_entropy``, ``student_topk_mass``, ``top1_agreement``).
    """
    beta = _check_beta(beta)
    t = float(temperature)
    s = f32(student_topk_logits)
    lp = f32(target_logprobs)
    m = _entry_mask(lp, target_mask)

    # Full-vocabulary student log-probs at the ids (for the plain loss and the mass metric).
    full_logq = s / t - f32(student_logsumexp)[..., None]
    if zscore_base_temp is not None:
        b = float(zscore_base_temp)
        a = masked_log_softmax(_zscore(lp, m) / b, m)
        logq = masked_log_softmax(_zscore(s / t, m) / b, m)
    else:
        a = masked_log_softmax(lp, m)
        logq = masked_log_softmax(s / t, m) if normalize_topk else jnp.where(m, full_logq, 0.0)

    div = _divergence(a, logq, m, beta)
    pos_valid = jnp.any(m, axis=-1)
    n = normaliser(jnp.sum(pos_valid), num_items)
    loss = (t * t) * jnp.sum(div) / n

    p = jnp.where(m, jnp.exp(a), 0.0)
    entropy = -jnp.sum(p * a)
    mass = jnp.sum(jnp.where(m, jnp.exp(jnp.where(m, full_logq, 0.0)), 0.0))
    s_top = jnp.argmax(jnp.where(m, s, -jnp.inf), axis=-1)
    t_top = jnp.argmax(jnp.where(m, lp, -jnp.inf), axis=-1)
    agree = jnp.sum((s_top == t_top) & pos_valid)
    metrics = {
        "kd_loss": metric(loss),
        "teacher_entropy": metric(entropy / n),
        "student_topk_mass": metric(mass / n),
        "top1_agreement": metric(agree / n),
    }
    return loss, metrics


@register_loss("kd_topk")
def kd_topk_loss(
    student_logits: ArrayLike,
    target_token_ids: ArrayLike,
    target_logprobs: ArrayLike,
    target_mask: ArrayLike,
    *,
    temperature: float = 1.0,
    beta: float = 0.0,
    normalize_topk: bool = False,
    zscore_base_temp: float | None = None,
    num_items: ArrayLike | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Top-k KD loss on full student logits.

    Args:
      student_logits: ``[..., V]`` any float dtype (float32 math).
      target_token_ids: ``[..., K]`` int teacher top-k ids (any id where masked).
      target_logprobs, target_mask, keywords: as :func:`kd_topk_loss_from_gathered`.

    Returns:
      ``(loss, metrics)``, see :func:`kd_topk_loss_from_gathered` and the module docstring.
    """
    z = f32(student_logits)
    lse = jax.nn.logsumexp(z / float(temperature), axis=-1)
    return kd_topk_loss_from_gathered(
        gather_logits(z, target_token_ids),
        lse,
        target_logprobs,
        target_mask,
        temperature=temperature,
        beta=beta,
        normalize_topk=normalize_topk,
        zscore_base_temp=zscore_base_temp,
        num_items=num_items,
    )


def kd_trainable_positions(
    target_logprobs: ArrayLike, target_mask: ArrayLike, loss_mask: ArrayLike | None = None
) -> Array:
    """``[...]`` bool positions the KD + CE loss trains on: ``loss_mask``, or by default the positions
    with at least one valid teacher entry (``target_mask`` and a finite log-prob)."""
    lp = f32(target_logprobs)
    if loss_mask is None:
        return jnp.any(_entry_mask(lp, target_mask), axis=-1)
    return jnp.broadcast_to(jnp.asarray(loss_mask).astype(bool), lp.shape[:-1])


def kd_loss_from_gathered(
    student_topk_logits: ArrayLike,
    student_logsumexp: ArrayLike,
    target_logprobs: ArrayLike,
    target_mask: ArrayLike,
    label_logits: ArrayLike,
    ce_logsumexp: ArrayLike,
    *,
    kd_alpha: float = 1.0,
    kd_ce_alpha: float = 0.0,
    loss_mask: ArrayLike | None = None,
    temperature: float = 1.0,
    beta: float = 0.0,
    normalize_topk: bool = False,
    zscore_base_temp: float | None = None,
    num_items: ArrayLike | None = None,
) -> tuple[Array, dict[str, Array]]:
    """``kd_alpha * KD + kd_ce_alpha * CE`` from gathered inputs, both divided by the same N.

    Args:
      student_topk_logits, student_logsumexp, target_logprobs, target_mask: as
        :func:`kd_topk_loss_from_gathered` (``student_logsumexp`` at temperature T).
      label_logits: ``[...]`` raw logit of the label (the next token).
      ce_logsumexp: ``[...]`` ``logsumexp(z)`` at temperature 1 (CE uses unscaled logits).
      loss_mask: ``[...]`` bool trainable positions. Default: positions with any valid KD entry.
        KD entries outside the trainable positions are ignored.
      num_items: N; default the number of trainable positions.

    Returns:
      ``(loss, metrics)``: the KD metrics plus ``ce_loss`` and ``loss``.
    """
    lp = f32(target_logprobs)
    m = _entry_mask(lp, target_mask)
    trainable = kd_trainable_positions(lp, target_mask, loss_mask)
    n = normaliser(jnp.sum(trainable), num_items)
    kd, metrics = kd_topk_loss_from_gathered(
        student_topk_logits,
        student_logsumexp,
        lp,
        m & trainable[..., None],
        temperature=temperature,
        beta=beta,
        normalize_topk=normalize_topk,
        zscore_base_temp=zscore_base_temp,
        num_items=n,
    )
    ce, ce_metrics = cross_entropy_from_gathered(label_logits, ce_logsumexp, mask=trainable, num_items=n)
    loss = kd_alpha * kd + kd_ce_alpha * ce
    return loss, {**metrics, **ce_metrics, "loss": metric(loss)}


@register_loss("kd")
def kd_loss(
    student_logits: ArrayLike,
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
) -> tuple[Array, dict[str, Array]]:
    """KD + CE on full logits: ``kd_alpha * KD + kd_ce_alpha * CE`` over the same trainable tokens.

    Args:
      student_logits: ``[..., V]``; target_token_ids/target_logprobs: ``[..., K]``;
      target_mask: ``[..., K]`` or ``[...]``; labels: ``[...]`` int next tokens (prediction-aligned).
      loss_mask: ``[...]`` trainable positions (default: positions with any valid KD entry).
      Other keywords: as :func:`kd_topk_loss_from_gathered`. The KD term uses logits / T and is
        scaled by T^2; the CE term uses the unscaled logits. Both are divided by the same N.

    Returns:
      ``(loss, metrics)`` with ``kd_loss``, ``ce_loss``, ``loss`` and the KD diagnostics.
    """
    z = f32(student_logits)
    t = float(temperature)
    lse_1 = jax.nn.logsumexp(z, axis=-1)
    lse_t = lse_1 if t == 1.0 else jax.nn.logsumexp(z / t, axis=-1)
    return kd_loss_from_gathered(
        gather_logits(z, target_token_ids),
        lse_t,
        target_logprobs,
        target_mask,
        gather_logits(z, jnp.asarray(labels)[..., None])[..., 0],
        lse_1,
        kd_alpha=kd_alpha,
        kd_ce_alpha=kd_ce_alpha,
        loss_mask=loss_mask,
        temperature=temperature,
        beta=beta,
        normalize_topk=normalize_topk,
        zscore_base_temp=zscore_base_temp,
        num_items=num_items,
    )
