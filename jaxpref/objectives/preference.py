"""Pair preference objectives: DPO (all TRL loss types, alone or as a weighted list (MPO), optionally
with WPO pair weights), IPO, ORPO and SimPO.

Batches are pair batches (docs/design.md "Batches"): ``chosen_*`` / ``rejected_*`` [B, T] and
``pair_mask`` [B]. Chosen and rejected are concatenated along the batch axis and go through **one**
forward pass ([2B, T]); per-token log-probs come from the fused kernel (``fused_token_logps``: no
[tokens, vocab] logits) and are summed over completion tokens (``loss_mask``). IPO, ORPO and SimPO
use per-token averages, as TRL 1.16 does (IPO inside ``dpo_loss`` from the lengths).

The reference model (DPO/IPO; ORPO and SimPO have none) is, per :func:`reference_mode`:

* ``precomputed`` (``precompute_ref_log_probs: true``): ``ref_chosen_logps`` / ``ref_rejected_logps``
  from the batch, computed once before training (``jaxpref.reference_pass``);
* ``adapter_off`` (``adapter: lora`` with ``rl_adapter_ref_model: false``, the default): the same
  weights with ``use_adapters=False`` under ``stop_gradient`` (no second copy in memory);
* ``model``: a frozen copy of the base model, the trainer companion ``"reference"``.

``count`` is the number of real pairs (``pair_mask``). The loss and every metric are contributions
(sums over this micro-batch's pairs divided by ``num_items``, the pairs of the whole optimizer step),
so eval and gradient accumulation average them correctly (``objectives/base.py``). Metric names are
TRL's. Three metrics are batch-level in TRL and are computed per micro-batch here, then weighted by
the micro-batch's share of pairs (exact for one micro-batch per step): ``logits/chosen`` /
``logits/rejected`` (mean over completion tokens of the mean logit over the vocabulary) and the
token-mean ``nll_loss`` of ORPO and SimPO.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxpref import batch_keys as keys
from jaxpref.losses import dpo_loss, orpo_loss, simpo_loss, wpo_weights
from jaxpref.losses.fused import fused_token_logps, fused_token_logps_and_log_sum_sq_probs
from jaxpref.objectives.base import Batch, Metrics, Objective
from jaxpref.objectives.registry import register_objective
from jaxpref.objectives.sft import kernel_options
from jaxpref.pallas import linear_mean_logit

REFERENCE_MODES = ("none", "precomputed", "adapter_off", "model")


class SequenceStats(NamedTuple):
    """Per-sequence sums of one forward pass, each [N] float32.

    ``logps``: log-prob of the completion (sum over ``loss_mask`` positions, nats); ``lengths``:
    completion tokens; ``logit_sums``: sum over completion positions of the mean logit over the
    vocabulary (no gradient); ``nll_sums`` / ``nll_tokens``: negative log-likelihood summed over every
    real next-token prediction (prompt included) and their count (ORPO's NLL; zeros unless asked);
    ``aligned_logps``: sum over completion positions of ``log p(label) - log sum_v p_v^2`` (WPO's
    weights; no gradient; zeros unless asked).
    """

    logps: jax.Array
    lengths: jax.Array
    logit_sums: jax.Array
    nll_sums: jax.Array
    nll_tokens: jax.Array
    aligned_logps: jax.Array


def reference_mode(cfg: Any, *, uses_reference: bool = True) -> str:
    """Where the reference log-probs come from (module docstring); ``none`` without a reference."""
    if not uses_reference:
        return "none"
    if cfg.precompute_ref_log_probs:
        return "precomputed"
    if cfg.adapter == "lora" and not cfg.rl_adapter_ref_model:
        return "adapter_off"
    return "model"


def concat_sides(batch: Batch, prefixes: tuple[str, ...] = keys.PAIR_SIDES) -> dict[str, jax.Array]:
    """The five sequence keys of each prefix, concatenated along the batch axis: [len(prefixes) * B, T]."""
    return {k: jnp.concatenate([batch[p + k] for p in prefixes], axis=0) for k in keys.SEQUENCE}


def _prediction_mask(segment_ids: jax.Array) -> jax.Array:
    """[N, T] bool: position t predicts a real token of its own sequence (t + 1 in the same segment)."""
    nxt = jnp.pad(segment_ids[:, 1:], ((0, 0), (0, 1)))
    return (segment_ids > 0) & (nxt == segment_ids)


def sequence_stats(
    model: Any,
    seqs: Mapping[str, jax.Array],
    *,
    train: bool,
    use_adapters: bool = True,
    kopts: Mapping[str, Any] | None = None,
    full_nll: bool = False,
    wpo: bool = False,
) -> SequenceStats:
    """One forward pass over [N, T] sequences -> :class:`SequenceStats` (see there for units).

    ``full_nll``: also the NLL over every real next-token prediction, prompt included (ORPO); that
    needs the log-probs at every position, which the same kernel call already returns. ``wpo``: also
    ``aligned_logps`` (WPO), from the same kernel call (its log-sum-exp at temperatures 1 and 1/2).
    """
    kopts = dict(kopts or {})
    hidden = model(
        seqs["input_ids"],
        positions=seqs["positions"],
        segment_ids=seqs["segment_ids"],
        use_adapters=use_adapters,
        deterministic=not train,
    )
    weight = model.lm_head_weight(use_adapters=use_adapters)
    softcap = model.config.final_logit_softcapping
    mask = seqs["loss_mask"].astype(bool)
    if wpo:
        token_logps, sq = fused_token_logps_and_log_sum_sq_probs(
            hidden, weight, seqs["labels"], softcap=softcap, **kopts
        )
        aligned_logps = jnp.sum(jnp.where(mask, jax.lax.stop_gradient(token_logps) - sq, 0.0), axis=-1)
    else:
        token_logps = fused_token_logps(hidden, weight, seqs["labels"], softcap=softcap, **kopts)  # [N, T] f32
    logps = jnp.sum(jnp.where(mask, token_logps, 0.0), axis=-1)
    lengths = jnp.sum(mask, axis=-1).astype(jnp.float32)
    # Mean (capped) logit over the vocabulary at each position, no [N, T, V] logits.
    mean_logits = linear_mean_logit(hidden.reshape(-1, hidden.shape[-1]), weight, softcap=softcap)
    mean_logits = mean_logits.reshape(hidden.shape[:-1])
    logit_sums = jnp.sum(jnp.where(mask, mean_logits, 0.0), axis=-1)
    if full_nll:
        predicts = _prediction_mask(seqs["segment_ids"])
        nll_sums = -jnp.sum(jnp.where(predicts, token_logps, 0.0), axis=-1)
        nll_tokens = jnp.sum(predicts, axis=-1).astype(jnp.float32)
    else:
        nll_sums = nll_tokens = jnp.zeros_like(logps)
    if not wpo:
        aligned_logps = jnp.zeros_like(logps)
    return SequenceStats(logps, lengths, logit_sums, nll_sums, nll_tokens, aligned_logps)


def reference_logps(
    mode: str,
    model: Any,
    companions: Mapping[str, Any] | None,
    seqs: Mapping[str, jax.Array],
    *,
    kopts: Mapping[str, Any] | None = None,
) -> jax.Array:
    """Summed completion log-probs [N] of the reference model (no gradient) for ``adapter_off`` / ``model``."""
    if mode == "adapter_off":
        ref, use_adapters = model, False
    elif mode == "model":
        if not companions or "reference" not in companions:
            raise ValueError("reference mode 'model' needs the trainer companion 'reference'")
        ref, use_adapters = companions["reference"], True
    else:
        raise ValueError(f"reference_logps: mode {mode!r} computes no reference forward pass")
    stats = sequence_stats(ref, seqs, train=False, use_adapters=use_adapters, kopts=kopts)
    return jax.lax.stop_gradient(stats.logps)


def share(n_here: jax.Array, num_items: jax.Array) -> jax.Array:
    """This micro-batch's share of the step's items: turns a per-micro-batch mean into a contribution."""
    return n_here / jnp.where(num_items > 0, num_items, 1.0)


def token_mean(values: jax.Array, tokens: jax.Array, select: jax.Array) -> jax.Array:
    """sum(values[select]) / sum(tokens[select]) (0 without tokens): a token-weighted batch mean."""
    total = jnp.sum(jnp.where(select, tokens, 0.0))
    return jnp.sum(jnp.where(select, values, 0.0)) / jnp.where(total > 0, total, 1.0)


def logits_metrics(stats: SequenceStats, n_pairs: int, mask: jax.Array, num_items: jax.Array) -> Metrics:
    """TRL's ``logits/chosen`` / ``logits/rejected`` (token-weighted means) as contributions."""
    frac = share(jnp.sum(mask).astype(jnp.float32), num_items)
    out = {}
    for name, sl in (("chosen", slice(0, n_pairs)), ("rejected", slice(n_pairs, 2 * n_pairs))):
        out[f"logits/{name}"] = jax.lax.stop_gradient(token_mean(stats.logit_sums[sl], stats.lengths[sl], mask) * frac)
    return out


def pair_count(batch: Batch) -> jax.Array:
    """Real pairs of a micro-batch."""
    return jnp.sum(batch["pair_mask"].astype(jnp.float32))


class PairView(NamedTuple):
    """What a pairwise loss sees of one micro-batch: the policy's :class:`SequenceStats` of the 2B
    sequences (chosen rows first), B, the real pairs [B] and the reference log-probs (chosen [B],
    rejected [B]) or None."""

    stats: SequenceStats
    n: int
    mask: jax.Array
    ref: tuple[jax.Array, jax.Array] | None

    @property
    def mean_logps(self) -> jax.Array:
        """Per-token average completion log-probs [2B] (IPO, ORPO, SimPO)."""
        return self.stats.logps / jnp.maximum(self.stats.lengths, 1.0)

    def nll_share(self, sums: jax.Array, tokens: jax.Array, num_items: jax.Array) -> jax.Array:
        """The token-mean NLL of the chosen rows (``sums`` / ``tokens`` over [2B]), as a contribution."""
        frac = share(jnp.sum(self.mask).astype(jnp.float32), num_items)
        return token_mean(sums[: self.n], tokens[: self.n], self.mask) * frac


PairLoss = Callable[[PairView, jax.Array], tuple[jax.Array, Metrics]]
"""``pair_loss(view, num_items) -> (loss, metrics)``: the pairwise part of a pair objective."""


def pair_objective(
    cfg: Any, name: str, pair_loss: PairLoss, *, reference: bool = False, full_nll: bool = False, wpo: bool = False
) -> Objective:
    """A pair objective from its pairwise loss: chosen and rejected in one forward pass ([2B, T]), the
    reference log-probs per :func:`reference_mode` when ``reference``, TRL's ``logits/*`` metrics.
    ``full_nll``: the stats also carry the NLL over whole sequences (ORPO); ``wpo``: WPO's
    ``aligned_logps``."""
    kopts = kernel_options(cfg)
    mode = reference_mode(cfg, uses_reference=reference)

    def loss(model: Any, batch: Batch, num_items: jax.Array, *, train: bool, companions: Any = None):
        seqs = concat_sides(batch)
        n, mask = batch["pair_mask"].shape[0], batch["pair_mask"]
        stats = sequence_stats(model, seqs, train=train, kopts=kopts, full_nll=full_nll, wpo=wpo)
        ref = None
        if mode == "precomputed":
            ref = tuple(batch[k] for k in keys.REF_PAIR)
        elif mode != "none":
            logps = reference_logps(mode, model, companions, seqs, kopts=kopts)
            ref = (logps[:n], logps[n:])
        value, metrics = pair_loss(PairView(stats, n, mask, ref), num_items)
        metrics.update(logits_metrics(stats, n, mask, num_items))
        return value, metrics

    return Objective(
        name=name,
        count=pair_count,
        loss=loss,
        batch_keys=keys.PAIR + (keys.REF_PAIR if mode == "precomputed" else ()),
        sequences=keys.PAIR_SIDES,
        companions=("reference",) if mode == "model" else (),
        data="preference",
        reference=mode if reference else None,
    )


def build_dpo_family(
    cfg: Any, name: str, loss_types: Sequence[str], loss_weights: Sequence[float] | None = None
) -> Objective:
    """DPO with TRL's ``loss_type`` list and ``loss_weights`` (MPO: a weighted sum of loss types; IPO is
    ``["ipo"]``) and, with ``dpo_use_weighting``, WPO's pair weights; reference per :func:`reference_mode`.
    Every loss type reads the stats of the one forward pass (``sft``: the chosen log-probs and lengths)."""
    options = {
        "beta": float(cfg.rl_beta),
        "loss_type": list(loss_types),
        "loss_weights": None if loss_weights is None else list(loss_weights),
        "label_smoothing": float(cfg.dpo_label_smoothing),
    }
    wpo = bool(cfg.dpo_use_weighting)

    def dpo(p: PairView, num_items: jax.Array) -> tuple[jax.Array, Metrics]:
        logps, lengths, aligned = p.stats.logps, p.stats.lengths, p.stats.aligned_logps
        chosen, rejected = slice(0, p.n), slice(p.n, 2 * p.n)
        weights = wpo_weights(aligned[chosen], aligned[rejected], lengths[chosen], lengths[rejected]) if wpo else None
        return dpo_loss(
            logps[chosen], logps[rejected], *p.ref, chosen_lengths=lengths[chosen], rejected_lengths=lengths[rejected],
            pair_weights=weights, mask=p.mask, num_items=num_items, **options,
        )  # fmt: skip

    return pair_objective(cfg, name, dpo, reference=True, wpo=wpo)


@register_objective("dpo")
def build_dpo(cfg: Any) -> Objective:
    """DPO with ``dpo_loss_type`` (a list; default ``[sigmoid]``) and ``dpo_loss_weights`` (default 1.0 each)."""
    return build_dpo_family(cfg, "dpo", cfg.dpo_loss_type, cfg.dpo_loss_weights)


@register_objective("ipo")
def build_ipo(cfg: Any) -> Objective:
    """IPO: DPO with TRL's ``ipo`` loss alone (the schema rejects other ``dpo_loss_type`` / any
    ``dpo_loss_weights`` with ``rl: ipo``)."""
    return build_dpo_family(cfg, "ipo", ["ipo"])


@register_objective("orpo")
def build_orpo(cfg: Any) -> Objective:
    """ORPO (TRL ``ORPOTrainer``): ``nll(chosen) - orpo_alpha * mean(logsigmoid(log_odds))`` on
    per-token average completion log-probs; the NLL is TRL's: token mean over the whole chosen
    sequences (prompt included), per micro-batch."""
    orpo_alpha = float(cfg.orpo_alpha)

    def orpo(p: PairView, num_items: jax.Array) -> tuple[jax.Array, Metrics]:
        mean, nll = p.mean_logps, p.nll_share(p.stats.nll_sums, p.stats.nll_tokens, num_items)
        # orpo_loss's beta is TRL's name for ORPO's weight (axolotl's orpo_alpha)
        return orpo_loss(mean[: p.n], mean[p.n :], nll, beta=orpo_alpha, mask=p.mask, num_items=num_items)

    return pair_objective(cfg, "orpo", orpo, full_nll=True)


@register_objective("simpo")
def build_simpo(cfg: Any) -> Objective:
    """SimPO (TRL ``CPOTrainer`` with ``loss_type="simpo"``): average completion log-probs, target
    margin ``simpo_gamma``, plus ``cpo_alpha`` x the token-mean NLL of the chosen completions."""
    options = dict(
        beta=float(cfg.rl_beta),
        gamma=float(cfg.simpo_gamma),
        label_smoothing=float(cfg.dpo_label_smoothing),
        cpo_alpha=float(cfg.cpo_alpha),
    )

    def simpo(p: PairView, num_items: jax.Array) -> tuple[jax.Array, Metrics]:
        mean = p.mean_logps
        nll = p.nll_share(-p.stats.logps, p.stats.lengths, num_items) if options["cpo_alpha"] else None
        # TRL reports nll_loss 0 when cpo_alpha is 0
        return simpo_loss(mean[: p.n], mean[p.n :], chosen_nll=nll, mask=p.mask, num_items=num_items, **options)

    return pair_objective(cfg, "simpo", simpo)
