"""DPO and its loss variants, as TRL 1.16's ``DPOTrainer._compute_loss`` defines them.

Inputs are per-sequence log-probabilities **summed** over completion tokens (policy and reference),
shape ``[B]`` (one entry per preference pair). Loss types that need per-token averages (``ipo``,
``sigmoid_norm``) or a token-level NLL (``sft``) take the completion token counts
``chosen_lengths`` / ``rejected_lengths`` and divide the summed values by ``max(length, 1)``, exactly as
TRL does with its completion mask.

With ``z_c = chosen_logps - ref_chosen_logps`` and ``z_r = rejected_logps - ref_rejected_logps``, the
f-divergence (``f_divergence_type``) maps each log-ratio to a score ``s``: ``reverse_kl`` s = z;
``forward_kl`` s = 1 - exp(-z); ``js_divergence`` s = log 2 + logsigmoid(z); ``alpha_divergence``
s = (exp((a - 1) z) - 1) / (a - 1) with ``(a - 1) z`` clamped at 80 (reverse_kl when |a - 1| < 1e-6).
``d = s_c - s_r``. Per pair (beta = b, label_smoothing = e, ``l_c``/``l_r`` the lengths):

==============  ==========================================================================
sigmoid         -logsigmoid(b d)                 (no label smoothing in TRL 1.16: use ``robust``)
hinge           relu(1 - b d)
ipo             (s_c / l_c - s_r / l_r - 1 / (2 b))^2
exo_pair        KL(softmax(b [s_c, s_r]) || [1 - e, e]),  e > 0 required
nca_pair        -logsigmoid(b z_c) - logsigmoid(-b z_c) / 2 - logsigmoid(-b z_r) / 2
robust          (-(1 - e) logsigmoid(b d) + e logsigmoid(-b d)) / (1 - 2 e)
bco_pair        -logsigmoid(b z_c) - logsigmoid(-b z_r)
sppo_hard       (z_c - 1 / (2 b))^2 + (z_r + 1 / (2 b))^2
aot             -(1 - e) logsigmoid(b D) - e logsigmoid(-b D),
                D = sort(logps_c - logps_r) - sort(ref_c - ref_r)   (sorted over the batch)
aot_unpaired    same with D = sort(z_c) - sort(z_r)
apo_zero        1 - sigmoid(b z_c) + sigmoid(b z_r)
apo_down        sigmoid(b z_c) + 1 - sigmoid(b (z_c - z_r))
discopop        x = b d, w = sigmoid(x / tau): -logsigmoid(x) (1 - w) + exp(-x) w
sft             -sum(chosen_logps) / sum(chosen_lengths)   (token-mean NLL of the chosen, per batch)
sigmoid_norm    -logsigmoid(b (s_c / l_c - s_r / l_r))
==============  ==========================================================================

``loss = sum_i loss_weights[i] * sum_pairs(w * per_pair_i) / N`` with ``N = num_items`` or the number of
valid pairs (the TRL batch mean), ``loss_weights`` 1.0 each by default (TRL's MPO combination: e.g.
``["sigmoid", "bco_pair", "sft"]`` with ``[0.8, 0.2, 1.0]``) and ``w = pair_weights`` (1 by default).
The metrics do not depend on the loss types or weights (TRL logs the same ones for any combination).

WPO (TRL's ``use_weighting``, :func:`wpo_weights`): ``w = exp(a_c / l_c) * exp(a_r / l_r)`` without
gradient, ``a = sum over completion tokens t of (log p(y_t) - log sum_v p_v(t)^2)``, the policy's
length-normalised log-probability with each token's distribution "aligned" by its own
``sum_v p_v^2``. It weights every loss type except ``aot`` / ``aot_unpaired`` (they sort the pairs, so
per-pair weights would be misaligned; TRL refuses them too). Not covered here (done where log-probs are
computed): TRL's ``ld_alpha`` (LD-DPO).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ._utils import Array, ArrayLike, as_mask, clean, f32, masked_sum, normaliser, preference_metrics
from .registry import register_loss

DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL: only losses built on the chosen - rejected score difference have an f-divergence generalization.
_F_DIVERGENCE_LOSS_TYPES = {
    "sigmoid",
    "sigmoid_norm",
    "hinge",
    "ipo",
    "exo_pair",
    "robust",
    "discopop",
    "sft",
}

logsig = jax.nn.log_sigmoid
sig = jax.nn.sigmoid


def f_divergence_scores(logratios: Array, f_divergence_type: str, alpha: float = 0.5) -> Array:
    """f'(pi / pi_ref) as a function of the log-ratio, as TRL's f-DPO."""
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1.0 - jnp.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + logsig(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        t = jnp.minimum((alpha - 1.0) * logratios, 80.0)
        return (jnp.exp(t) - 1.0) / (alpha - 1.0)
    raise ValueError(f"Unknown f_divergence_type {f_divergence_type!r}; expected {F_DIVERGENCE_TYPES}.")


def _per_token(x: Array, lengths: ArrayLike | None, what: str, loss_type: str) -> Array:
    if lengths is None:
        raise ValueError(f"loss_type={loss_type!r} needs {what} (completion token counts per sequence).")
    return x / jnp.maximum(f32(lengths), 1.0)


def _sorted_delta(a: Array, b: Array, mask: Array) -> tuple[Array, Array]:
    """``sort(a) - sort(b)`` over the valid entries, and its mask: the valid entries sort first (the
    result is in sorted order, so it is no longer aligned with the pairs)."""
    sa = jnp.sort(jnp.where(mask, a, jnp.inf))
    sb = jnp.sort(jnp.where(mask, b, jnp.inf))
    first_n = jnp.arange(a.shape[0]) < jnp.sum(mask)
    return jnp.where(first_n, sa - sb, 0.0), first_n


def _normalise_loss_types(loss_type, loss_weights) -> tuple[list[str], list[float]]:
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        raise ValueError("loss_type must name at least one DPO loss type.")
    for t in types:
        if t not in DPO_LOSS_TYPES:
            raise ValueError(f"Unknown DPO loss_type {t!r}; expected one of {list(DPO_LOSS_TYPES)}.")
    weights = [1.0] * len(types) if loss_weights is None else [float(w) for w in loss_weights]
    if len(weights) != len(types):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(types)} loss types {types}.")
    return types, weights


def wpo_weights(
    chosen_aligned_logps: ArrayLike,
    rejected_aligned_logps: ArrayLike,
    chosen_lengths: ArrayLike,
    rejected_lengths: ArrayLike,
) -> Array:
    """WPO pair weights (TRL 1.16 ``use_weighting``, Eq. 2 of the WPO paper), without gradient.

    ``w = exp(a_c / max(l_c, 1)) * exp(a_r / max(l_r, 1))`` where ``a`` is the sum over a sequence's
    completion tokens of ``log p(y_t) - log sum_v p_v(t)^2`` (per-token log-prob minus
    :func:`~jaxpref.losses.logps.log_sum_sq_probs`; the fused kernel gives both,
    ``fused_token_logps_and_log_sum_sq_probs``) and ``l`` the completion token count.

    Args:
      chosen_aligned_logps, rejected_aligned_logps: ``[B]`` the sums ``a``; chosen_lengths,
        rejected_lengths: ``[B]`` completion token counts.

    Returns:
      ``[B]`` float32 weights for ``dpo_loss(pair_weights=...)``.
    """
    mean_c = f32(chosen_aligned_logps) / jnp.maximum(f32(chosen_lengths), 1.0)
    mean_r = f32(rejected_aligned_logps) / jnp.maximum(f32(rejected_lengths), 1.0)
    return jax.lax.stop_gradient(jnp.exp(mean_c) * jnp.exp(mean_r))


@register_loss("dpo")
def dpo_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: ArrayLike | None = None,
    rejected_lengths: ArrayLike | None = None,
    loss_weights: Sequence[float] | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    pair_weights: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    num_items: ArrayLike | None = None,
) -> tuple[Array, dict[str, Array]]:
    """DPO-family preference loss (TRL 1.16 ``DPOTrainer`` definitions; see the module docstring).

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``
        sequence log-probs (nats) summed over completion tokens; the reference ones carry no gradient
        in practice (pass them through ``jax.lax.stop_gradient`` if they come from a live model).
      beta: DPO beta (IPO's tau).
      loss_type: a name or a list of names from :data:`DPO_LOSS_TYPES` (e.g. MPO
        ``["sigmoid", "bco_pair", "sft"]``), combined as a weighted sum with ``loss_weights``.
      label_smoothing: used by ``robust`` (flip probability in [0, 0.5)), ``exo_pair`` (epsilon > 0),
        ``aot`` and ``aot_unpaired``; ignored by the other types, as in TRL 1.16.
      chosen_lengths, rejected_lengths: ``[B]`` completion token counts (``ipo``, ``sigmoid_norm``,
        ``sft``).
      f_divergence_type, f_alpha_divergence_coef: the f-DPO regulariser (TRL names and defaults).
      discopop_tau: DiscoPOP temperature (TRL default 0.05).
      pair_weights: ``[B]`` per-pair weights multiplying every loss type's per-pair value (WPO:
        :func:`wpo_weights`); not with ``aot`` / ``aot_unpaired``. The metrics are unweighted (TRL).
      mask: ``[B]`` bool valid pairs (padding); num_items: divisor N (default: valid pairs).

    Returns:
      ``(loss, metrics)`` with TRL's names: ``rewards/chosen``, ``rewards/rejected`` (``beta * z``, means),
      ``rewards/accuracies`` (fraction with chosen reward > rejected), ``rewards/margins``,
      ``logps/chosen``, ``logps/rejected`` (means of the policy sums). All divided by N.
    """
    types, weights = _normalise_loss_types(loss_type, loss_weights)
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"Unknown f_divergence_type {f_divergence_type!r}; expected {F_DIVERGENCE_TYPES}.")
    if f_divergence_type != "reverse_kl" and not set(types) <= _F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} is only supported for loss types "
            f"{sorted(_F_DIVERGENCE_LOSS_TYPES)}; got {types}."
        )
    if pair_weights is not None and {"aot", "aot_unpaired"} & set(types):
        raise ValueError(
            "pair_weights (WPO) cannot be used with the 'aot' / 'aot_unpaired' losses: they sort the pairs over the "
            "batch, so per-pair weights would be misaligned (TRL refuses this too)."
        )
    ls = float(label_smoothing)
    if "exo_pair" in types and ls == 0.0:
        raise ValueError("loss_type='exo_pair' needs label_smoothing > 0 (the EXO paper recommends 1e-3).")
    if "robust" in types and not 0.0 <= ls < 0.5:
        warnings.warn(f"label_smoothing should be in [0, 0.5) for the 'robust' loss; got {ls}.", stacklevel=2)

    valid = as_mask(mask, jnp.shape(policy_chosen_logps))
    pc, pr = clean(policy_chosen_logps, valid), clean(policy_rejected_logps, valid)
    rc, rr = clean(ref_chosen_logps, valid), clean(ref_rejected_logps, valid)
    if chosen_lengths is not None:
        chosen_lengths = clean(chosen_lengths, valid, 1.0)
    if rejected_lengths is not None:
        rejected_lengths = clean(rejected_lengths, valid, 1.0)
    n = normaliser(jnp.sum(valid), num_items)
    b = float(beta)
    w_pair = None if pair_weights is None else clean(pair_weights, valid)

    z_c, z_r = pc - rc, pr - rr
    s_c = f_divergence_scores(z_c, f_divergence_type, f_alpha_divergence_coef)
    s_r = f_divergence_scores(z_r, f_divergence_type, f_alpha_divergence_coef)
    d = s_c - s_r

    def per_pair(t: str) -> Array:
        if t == "sigmoid":
            return -logsig(b * d)
        if t == "hinge":
            return jax.nn.relu(1.0 - b * d)
        if t == "ipo":
            delta = _per_token(s_c, chosen_lengths, "chosen_lengths", t) - _per_token(
                s_r, rejected_lengths, "rejected_lengths", t
            )
            return (delta - 1.0 / (2.0 * b)) ** 2
        if t == "exo_pair":
            x = b * d
            return sig(x) * (logsig(x) - math.log1p(-ls)) + sig(-x) * (logsig(-x) - math.log(ls))
        if t == "nca_pair":
            return -logsig(b * z_c) - 0.5 * logsig(-b * z_c) - 0.5 * logsig(-b * z_r)
        if t == "robust":
            return (-(1.0 - ls) * logsig(b * d) + ls * logsig(-b * d)) / (1.0 - 2.0 * ls)
        if t == "bco_pair":
            return -logsig(b * z_c) - logsig(-b * z_r)
        if t == "sppo_hard":
            return (z_c - 0.5 / b) ** 2 + (z_r + 0.5 / b) ** 2
        if t == "apo_zero":
            return (1.0 - sig(b * z_c)) + sig(b * z_r)
        if t == "apo_down":
            return sig(b * z_c) + (1.0 - sig(b * (z_c - z_r)))
        if t == "discopop":
            x = b * d
            w = sig(x / discopop_tau)
            # exp(-x) * w computed as exp(-x + log w): equal to TRL's product, but no inf * 0 for x << 0.
            return -logsig(x) * (1.0 - w) + jnp.exp(-x + logsig(x / discopop_tau))
        if t == "sft":
            if chosen_lengths is None:
                raise ValueError("loss_type='sft' needs chosen_lengths (completion token counts).")
            tokens = masked_sum(jnp.broadcast_to(f32(chosen_lengths), pc.shape), valid)
            nll = -masked_sum(pc, valid) / jnp.maximum(tokens, 1.0)
            return jnp.broadcast_to(nll, pc.shape)
        if t == "sigmoid_norm":
            delta = _per_token(s_c, chosen_lengths, "chosen_lengths", t) - _per_token(
                s_r, rejected_lengths, "rejected_lengths", t
            )
            return -logsig(b * delta)
        raise AssertionError(t)

    def aot(t: str) -> tuple[Array, Array]:  # sorted over the batch: no longer aligned with `valid`
        if t == "aot":
            delta, sorted_valid = _sorted_delta(pc - pr, rc - rr, valid)
        else:
            delta, sorted_valid = _sorted_delta(z_c, z_r, valid)
        return -logsig(b * delta) * (1.0 - ls) - logsig(-b * delta) * ls, sorted_valid

    loss = jnp.zeros((), jnp.float32)
    for t, w in zip(types, weights):
        values, values_valid = aot(t) if t in ("aot", "aot_unpaired") else (per_pair(t), valid)
        if w_pair is not None:
            values = values * w_pair
        loss = loss + w * masked_sum(values, values_valid) / n

    metrics = preference_metrics(b * z_c, b * z_r, pc, pr, valid, n)
    return loss, metrics
