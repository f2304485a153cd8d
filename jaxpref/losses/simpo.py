"""CPO and SimPO (reference-free preference losses), as TRL 1.16's ``trl.experimental.cpo.CPOTrainer``.

With policy log-probs ``c`` and ``r`` (TRL: **summed** over completion tokens for ``sigmoid``/``hinge``,
**averaged** for ``ipo``/``simpo``; the caller chooses which to pass), ``x = c - r`` (or, for AlphaPO
``alpha != 0``, ``x = R(c) - R(r)`` with ``R(l) = (1 - exp(-alpha l)) / alpha``), beta = b,
label_smoothing = e:

========  ================================================================
sigmoid   -(1 - e) logsigmoid(b x) - e logsigmoid(-b x)
hinge     relu(1 - b x)
ipo       (x - 1 / (2 b))^2
simpo     -(1 - e) logsigmoid(b x - gamma) - e logsigmoid(-(b x - gamma))
========  ================================================================

``loss = mean(per_pair) + cpo_alpha * chosen_nll`` (TRL: the behaviour-cloning NLL of the chosen
completions; SimPO proper uses ``cpo_alpha = 0``, CPO-SimPO a positive one).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ._utils import (
    Array,
    ArrayLike,
    as_mask,
    clean,
    masked_sum,
    metric,
    normaliser,
    preference_metrics,
    reduce_nll,
)
from .registry import register_loss

CPO_LOSS_TYPES: Sequence[str] = ("sigmoid", "hinge", "ipo", "simpo")


@register_loss("cpo")
def cpo_loss(
    chosen_logps: ArrayLike,
    rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    alpha: float = 0.0,
    chosen_nll: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    num_items: ArrayLike | None = None,
) -> tuple[Array, dict[str, Array]]:
    """CPO-family loss (TRL ``CPOTrainer.cpo_loss`` plus its ``cpo_alpha * nll`` term).

    Args:
      chosen_logps, rejected_logps: ``[B]`` policy sequence log-probs (sum or mean, see module doc).
      beta, loss_type, label_smoothing, simpo_gamma, cpo_alpha, alpha: TRL ``CPOConfig`` names and
        defaults (``alpha`` is AlphaPO's reward shape; 0 = plain log-probs). ``label_smoothing`` only
        affects ``sigmoid`` and ``simpo``, as in TRL.
      chosen_nll: scalar (or ``[B]``) NLL of the chosen completions; required when ``cpo_alpha != 0``.
      mask: ``[B]`` bool valid pairs; num_items: divisor N (default: valid pairs).

    Returns:
      ``(loss, metrics)`` with TRL's names: ``rewards/chosen`` (``beta * c``, or ``beta * R(c)`` with
      AlphaPO), ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
      ``logps/rejected``, ``nll_loss`` (0 when ``cpo_alpha == 0`` and no NLL is given).
    """
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"Unknown CPO loss_type {loss_type!r}; expected one of {list(CPO_LOSS_TYPES)}.")
    if cpo_alpha != 0.0 and chosen_nll is None:
        raise ValueError(
            f"cpo_alpha={cpo_alpha} adds cpo_alpha * NLL(chosen) (TRL's default cpo_alpha is 1.0): pass "
            "chosen_nll, or cpo_alpha=0.0 for the preference term alone."
        )
    valid = as_mask(mask, jnp.shape(chosen_logps))
    pc, pr = clean(chosen_logps, valid), clean(rejected_logps, valid)
    n = normaliser(jnp.sum(valid), num_items)
    b, e, a = float(beta), float(label_smoothing), float(alpha)

    if a != 0.0:
        rc, rr = (1.0 - jnp.exp(-a * pc)) / a, (1.0 - jnp.exp(-a * pr)) / a
    else:
        rc, rr = pc, pr
    x = rc - rr
    logsig = jax.nn.log_sigmoid
    if loss_type == "simpo":
        y = b * (x - simpo_gamma / b)
        per_pair = -logsig(y) * (1.0 - e) - logsig(-y) * e
    elif loss_type == "sigmoid":
        per_pair = -logsig(b * x) * (1.0 - e) - logsig(-b * x) * e
    elif loss_type == "hinge":
        per_pair = jax.nn.relu(1.0 - b * x)
    else:  # ipo
        per_pair = (x - 1.0 / (2.0 * b)) ** 2

    nll = jnp.zeros((), jnp.float32) if chosen_nll is None else reduce_nll(chosen_nll, valid, n)
    loss = masked_sum(per_pair, valid) / n + cpo_alpha * nll
    metrics = preference_metrics(b * rc, b * rr, pc, pr, valid, n)
    metrics["nll_loss"] = metric(nll)
    return loss, metrics


@register_loss("simpo")
def simpo_loss(
    chosen_mean_logps: ArrayLike,
    rejected_mean_logps: ArrayLike,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
    chosen_nll: ArrayLike | None = None,
    cpo_alpha: float = 0.0,
    mask: ArrayLike | None = None,
    num_items: ArrayLike | None = None,
) -> tuple[Array, dict[str, Array]]:
    """SimPO: ``-logsigmoid(beta * (c - r) - gamma)`` on per-token **average** log-probs.

    Same as ``cpo_loss(..., loss_type="simpo", simpo_gamma=gamma)`` (TRL's SimPO lives in the CPO
    trainer; axolotl ``rl: simpo`` with ``simpo_gamma`` and ``cpo_alpha``). ``gamma`` is the target reward
    margin (TRL ``simpo_gamma``). Shapes, metrics and the other arguments as :func:`cpo_loss`.
    """
    return cpo_loss(
        chosen_mean_logps,
        rejected_mean_logps,
        beta=beta,
        loss_type="simpo",
        label_smoothing=label_smoothing,
        simpo_gamma=gamma,
        cpo_alpha=cpo_alpha,
        chosen_nll=chosen_nll,
        mask=mask,
        num_items=num_items,
    )
