"""KTO (Kahneman-Tversky optimisation), as TRL 1.16's ``KTOTrainer._compute_loss``.

Unpaired examples, each desirable (``desirable=True``) or undesirable. With summed completion log-probs,
``z = policy_logps - ref_logps`` and the KL estimate

    kl = max(0, mean(policy_kl_logps - ref_kl_logps))        (stop-gradient)

taken over the *mismatched* pairs (completions rotated by one within the batch, built by the data
pipeline) and averaged over devices when ``axis_name`` is given, the per-example losses are

    desirable:    desirable_weight   * (1 - sigmoid(beta * (z - kl)))
    undesirable:  undesirable_weight * (1 - sigmoid(beta * (kl - z)))

(``loss_type="apo_zero_unpaired"``: ``1 - sigmoid(beta z)`` and ``sigmoid(beta z)``, no KL) and the
loss is their sum divided by N (the number of examples: TRL's ``nanmean`` over both groups together).

Differences from TRL, both for robustness: across devices the KL is ``psum(sum) / psum(count)`` (TRL
averages per-device means; equal when every device has the same number of examples), and a batch with
no valid example gives loss 0 (TRL: NaN).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._utils import Array, ArrayLike, as_mask, clean, masked_sum, metric, normaliser
from .registry import register_loss

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def _psum(x: Array, axis_name) -> Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _safe_div(x: Array, count: Array) -> Array:
    return x / jnp.where(count > 0, count, 1.0)


@register_loss("kto")
def kto_loss(
    policy_logps: ArrayLike,
    ref_logps: ArrayLike,
    policy_kl_logps: ArrayLike | None,
    ref_kl_logps: ArrayLike | None,
    desirable: ArrayLike,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    mask: ArrayLike | None = None,
    num_items: ArrayLike | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> tuple[Array, dict[str, Array]]:
    """KTO loss (see the module docstring for the formula).

    Args:
      policy_logps, ref_logps: ``[B]`` completion log-probs (summed over completion tokens).
      policy_kl_logps, ref_kl_logps: ``[B]`` log-probs of the mismatched (prompt, other completion)
        pairs; may be ``None`` for ``apo_zero_unpaired``.
      desirable: ``[B]`` bool label (TRL ``label``).
      beta, desirable_weight, undesirable_weight, loss_type: TRL ``KTOConfig`` names and defaults.
      mask: ``[B]`` bool valid examples (padding); num_items: divisor N (default: valid examples here).
      axis_name: a mapped axis name (``shard_map``/``pmap``): the KL estimate and the metrics are
        then computed over all devices of that axis. The loss stays this device's share.

    Returns:
      ``(loss, metrics)`` with TRL's names: ``kl``; ``rewards/chosen`` and ``logps/chosen`` (means over
      desirable examples), ``rewards/rejected`` and ``logps/rejected`` (over undesirable ones),
      ``rewards/margins`` (their difference when both groups exist). A group without examples
      reports 0 (TRL omits the metric).
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"Unknown KTO loss_type {loss_type!r}; expected one of {list(KTO_LOSS_TYPES)}.")
    valid = as_mask(mask, jnp.shape(policy_logps))
    pl, rl = clean(policy_logps, valid), clean(ref_logps, valid)
    des = jnp.asarray(desirable).astype(bool) & valid
    und = ~jnp.asarray(desirable).astype(bool) & valid
    b = float(beta)

    if loss_type == "kto":
        if policy_kl_logps is None or ref_kl_logps is None:
            raise ValueError("loss_type='kto' needs policy_kl_logps and ref_kl_logps (mismatched pairs).")
        kl_terms = clean(policy_kl_logps, valid) - clean(ref_kl_logps, valid)
        kl_sum = _psum(masked_sum(kl_terms, valid), axis_name)
        kl_count = _psum(jnp.sum(valid).astype(jnp.float32), axis_name)
        kl = jax.lax.stop_gradient(jnp.maximum(_safe_div(kl_sum, kl_count), 0.0))
    else:
        kl = jnp.zeros((), jnp.float32)

    z = pl - rl
    if loss_type == "kto":
        chosen = 1.0 - jax.nn.sigmoid(b * (z - kl))
        rejected = 1.0 - jax.nn.sigmoid(b * (kl - z))
    else:
        chosen = 1.0 - jax.nn.sigmoid(b * z)
        rejected = jax.nn.sigmoid(b * z)
    per_example = jnp.where(des, desirable_weight * chosen, undesirable_weight * rejected)
    n = normaliser(jnp.sum(valid), num_items)
    loss = masked_sum(per_example, valid) / n

    n_des = _psum(jnp.sum(des).astype(jnp.float32), axis_name)
    n_und = _psum(jnp.sum(und).astype(jnp.float32), axis_name)
    rewards = b * z
    rc = _safe_div(_psum(masked_sum(rewards, des), axis_name), n_des)
    rr = _safe_div(_psum(masked_sum(rewards, und), axis_name), n_und)
    metrics = {
        "kl": metric(kl),
        "rewards/chosen": metric(rc),
        "rewards/rejected": metric(rr),
        "rewards/margins": metric(jnp.where((n_des > 0) & (n_und > 0), rc - rr, 0.0)),
        "logps/chosen": metric(_safe_div(_psum(masked_sum(pl, des), axis_name), n_des)),
        "logps/rejected": metric(_safe_div(_psum(masked_sum(pl, und), axis_name), n_und)),
    }
    return loss, metrics
