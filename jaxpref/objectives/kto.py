"""KTO (unpaired preference): the objective over KTO batches, as TRL 1.16's ``KTOTrainer``.

A KTO micro-batch holds the matched sequences (prompt + own completion) and the ``kl_`` mismatched
ones (prompt i + completion of row i - 1, rotated by the pipeline), both [B, T]. Both go through one
forward pass ([2B, T]); completion log-probs are sums over completion tokens. The KL estimate
``max(0, mean(policy_kl_logps - ref_kl_logps))`` is detached and taken over the micro-batch's real
rows. The step runs as one jit over *global* arrays, so that mean already covers every device of the
micro-batch (TRL averages per-device means; equal when devices hold equally many rows). With
gradient accumulation it is per micro-batch, as TRL computes it per forward call.

``count`` = real examples (``example_mask``). The loss is ``sum(weighted per-example losses) /
num_items`` (TRL: ``nanmean`` over the batch). Metrics are TRL's (``kl``, ``rewards/chosen``,
``rewards/rejected``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` as group means over
desirable / undesirable rows, ``logits/chosen``, ``logits/rejected``), computed per micro-batch and
weighted by its share of the step's examples (exact with one micro-batch per step). The reference is
chosen as for DPO (``preference.reference_mode``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp

from jaxpref import batch_keys as keys
from jaxpref.losses import kto_loss
from jaxpref.objectives.base import Batch, Objective
from jaxpref.objectives.preference import (
    concat_sides,
    reference_logps,
    reference_mode,
    sequence_stats,
    share,
    token_mean,
)
from jaxpref.objectives.registry import register_objective
from jaxpref.objectives.sft import kernel_options

log = logging.getLogger(__name__)


def example_count(batch: Batch) -> jax.Array:
    """Real examples of a KTO micro-batch."""
    return jnp.sum(batch["example_mask"].astype(jnp.float32))


def kto_weight_advice(
    num_desirable: int, num_undesirable: int, desirable_weight: float, undesirable_weight: float
) -> str | None:
    """TRL's check (KTO paper, Eq. 8): with unequal counts, ``desirable_weight * n_d / (undesirable_weight
    * n_u)`` should lie in [1, 4/3]. Returns TRL's advice (ranges rounded as TRL does) or None."""
    n_d, n_u = max(num_desirable, 1), max(num_undesirable, 1)
    if n_d == n_u:
        return None
    des_lo = round(n_u * undesirable_weight / n_d, 2)
    des_hi = round(n_u * undesirable_weight / n_d * 1.33, 2)
    und_lo = round(n_d * desirable_weight / n_u / 1.33, 2)
    und_hi = round(n_d * desirable_weight / n_u, 2)
    if des_lo <= desirable_weight <= des_hi or und_lo <= undesirable_weight <= und_hi:
        return None
    return (
        f"KTO: the training data has {num_desirable} desirable and {num_undesirable} undesirable examples, and "
        f"kto_desirable_weight={desirable_weight} / kto_undesirable_weight={undesirable_weight} are outside the "
        f"KTO paper's recommended range (desirable_weight * {n_d} / (undesirable_weight * {n_u}) in [1, 4/3]); "
        f"set EITHER kto_desirable_weight in [{des_lo}, {des_hi}] OR kto_undesirable_weight in "
        f"[{und_lo}, {und_hi}] (not both)."
    )


def check_kto_balance(cfg: Any, examples: Iterable[Any]) -> str | None:
    """Log TRL's desirable/undesirable weight warning for the training examples; returns the message."""
    flags = [bool(e["desirable"]) for e in examples]
    message = kto_weight_advice(
        sum(flags), len(flags) - sum(flags), float(cfg.kto_desirable_weight), float(cfg.kto_undesirable_weight)
    )
    if message:
        log.warning(message)
    return message


@register_objective("kto")
def build_kto(cfg: Any) -> Objective:
    kopts = kernel_options(cfg)
    mode = reference_mode(cfg)
    options = {
        "beta": float(cfg.rl_beta),
        "desirable_weight": float(cfg.kto_desirable_weight),
        "undesirable_weight": float(cfg.kto_undesirable_weight),
    }

    def loss(model: Any, batch: Batch, num_items: jax.Array, *, train: bool, companions: Any = None):
        seqs = concat_sides(batch, ("", keys.KTO_KL_PREFIX))
        n = batch["example_mask"].shape[0]
        mask = batch["example_mask"].astype(bool)
        stats = sequence_stats(model, seqs, train=train, kopts=kopts)
        if mode == "precomputed":
            ref, ref_kl = (batch[k] for k in keys.REF_KTO)
        else:
            both = reference_logps(mode, model, companions, seqs, kopts=kopts)
            ref, ref_kl = both[:n], both[n:]
        value, means = kto_loss(
            stats.logps[:n],
            ref,
            jax.lax.stop_gradient(stats.logps[n:]),  # TRL: the policy's KL pass runs under no_grad
            ref_kl,
            batch["desirable"],
            mask=mask,
            num_items=num_items,
            **options,
        )
        frac = share(jnp.sum(mask).astype(jnp.float32), num_items)
        metrics = {k: v * frac for k, v in means.items()}  # per-micro-batch means -> contributions
        des = mask & batch["desirable"].astype(bool)
        und = mask & ~batch["desirable"].astype(bool)
        metrics["logits/chosen"] = token_mean(stats.logit_sums[:n], stats.lengths[:n], des) * frac
        metrics["logits/rejected"] = token_mean(stats.logit_sums[:n], stats.lengths[:n], und) * frac
        return value, jax.lax.stop_gradient(metrics)  # dict of scalars

    return Objective(
        name="kto",
        count=example_count,
        loss=loss,
        batch_keys=keys.KTO + (keys.REF_KTO if mode == "precomputed" else ()),
        companions=("reference",) if mode == "model" else (),
        data="preference",
        reference=mode,
    )
