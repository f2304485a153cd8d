"""Knowledge distillation: top-k KD (+ optional CE) from hidden states through the fused kernel.

Teacher targets come from the batch (``target_token_ids``, ``target_logprobs``, ``target_mask``,
prediction-aligned by the data pipeline) or, with ``kd_teacher_model``, from a frozen teacher run
in the same step: its top-k at ``kd_temperature`` is computed in row blocks and renormalised over
the kept k entries, which is exactly what the pipeline does to stored targets, so both paths feed
the same loss. N = trainable tokens over the whole optimizer step (``loss_mask``), so gradient
accumulation and data parallelism do not change the scale.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxpref import batch_keys as keys
from jaxpref.losses.fused import fused_cross_entropy, fused_kd_loss
from jaxpref.losses.kd import kd_trainable_positions
from jaxpref.objectives.base import Batch, Objective
from jaxpref.objectives.registry import register_objective
from jaxpref.objectives.sft import forward_hidden, kernel_options, trainable_tokens
from jaxpref.teacher_topk import topk_logprobs

KD_TEMPERATURE = "kd_temperature"  # the step input of the temperature schedule (kd_temperature_min)


def kd_options(cfg: Any) -> dict[str, Any]:
    """Keyword arguments of :func:`fused_kd_loss` from the config's ``kd_*`` keys."""
    return {
        "kd_alpha": float(cfg.kd_alpha),
        "kd_ce_alpha": float(cfg.kd_ce_alpha),
        "temperature": float(cfg.kd_temperature),
        "beta": float(cfg.kd_beta),
        "normalize_topk": bool(cfg.kd_normalize_topk),
        "zscore_base_temp": None if cfg.kd_zscore_base_temp is None else float(cfg.kd_zscore_base_temp),
    }


def online_teacher_targets(
    teacher: Any, batch: Batch, k: int, temperature: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(ids [B, T, k], log-probs [B, T, k], mask [B, T, k]) from a frozen teacher's forward pass.

    The log-probs are ``log_softmax`` over the kept k at ``temperature``: the same targets the data
    pipeline makes from a stored top-k generated at that temperature.
    """
    hidden = forward_hidden(teacher, batch, train=False)
    ids, logprobs = topk_logprobs(
        hidden, teacher.lm_head_weight(), k, temperature=temperature, softcap=teacher.config.final_logit_softcapping
    )
    logprobs = jax.nn.log_softmax(logprobs, axis=-1)
    mask = jnp.broadcast_to(batch["loss_mask"][..., None], ids.shape)
    return jax.lax.stop_gradient(ids), jax.lax.stop_gradient(logprobs), mask


def kd_temperature_schedule(start: float, minimum: float, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """axolotl's cosine decay of the KD temperature: step s trains at
    ``T = start - (start - minimum) * (1 - cos(pi * s / total_steps)) / 2`` (``start`` at step 0)."""

    def temperature(step: jax.Array) -> jax.Array:
        progress = jnp.asarray(step, jnp.float32) / max(int(total_steps), 1)
        return start - (start - minimum) * (1.0 - 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))

    return temperature


def scheduled_kd_loss(
    hidden: jax.Array,
    weight: jax.Array,
    ids: jax.Array,
    logprobs: jax.Array,
    mask: jax.Array,
    batch: Batch,
    num_items: jax.Array,
    temperature: jax.Array,
    options: dict[str, Any],
    kopts: dict[str, Any],
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``fused_kd_loss`` at a traced temperature T (the kernel takes static temperatures only).

    The student's logits at T are those of ``hidden / T`` at temperature 1; the targets, log-probs at
    temperature 1 normalised over the kept entries, become ``log_softmax(logprobs / T)`` (the loss
    renormalises): the same values as the static path at that T, times T^2. The CE term (temperature
    1) is a second pass over the vocabulary when ``kd_ce_alpha`` > 0.
    """
    t = temperature.astype(jnp.float32)
    kd_opts = {**options, "temperature": 1.0, "kd_alpha": 1.0, "kd_ce_alpha": 0.0}
    scaled = (hidden.astype(jnp.float32) / t).astype(hidden.dtype)
    kd, metrics = fused_kd_loss(
        scaled, weight, ids, logprobs / t, mask, batch["labels"], loss_mask=batch["loss_mask"],
        num_items=num_items, **kd_opts, **kopts,
    )  # fmt: skip
    kd = kd * t * t
    loss = options["kd_alpha"] * kd
    metrics = {**metrics, "kd_loss": kd}
    metrics.pop("ce_loss", None)  # of the scaled logits: not the CE of the model
    if options["kd_ce_alpha"]:
        trainable = kd_trainable_positions(logprobs, mask, batch["loss_mask"])
        ce, _ = fused_cross_entropy(hidden, weight, batch["labels"], mask=trainable, num_items=num_items, **kopts)
        loss = loss + options["kd_ce_alpha"] * ce
        metrics["ce_loss"] = ce
    return loss, {**metrics, "loss": loss}


@register_objective("kd")
def build_kd(cfg: Any) -> Objective:
    kopts = kernel_options(cfg)
    options = kd_options(cfg)
    online = bool(cfg.kd_teacher_model)
    top_k = int(cfg.kd_teacher_top_k)
    scheduled = cfg.kd_temperature_min is not None  # targets at T = 1, rescaled in the step

    def loss(model: Any, batch: Batch, num_items: jax.Array, *, train: bool, companions: Any = None):
        hidden = forward_hidden(model, batch, train=train)
        if online:
            at = 1.0 if scheduled else options["temperature"]
            ids, logprobs, mask = online_teacher_targets(companions["teacher"], batch, top_k, at)
        else:
            ids, logprobs, mask = (batch[k] for k in keys.KD_TARGETS)
        weight = model.lm_head_weight()
        softcap = model.config.final_logit_softcapping
        if scheduled:
            if softcap is not None:
                # The scheduled path scales hidden by 1/T, exact only for logits linear in hidden.
                raise ValueError(
                    "kd_temperature_min (a scheduled KD temperature) does not support a student with "
                    f"final_logit_softcapping ({softcap}); set kd_temperature_min: null (a fixed kd_temperature)"
                )
            t = batch[KD_TEMPERATURE]
            return scheduled_kd_loss(hidden, weight, ids, logprobs, mask, batch, num_items, t, options, kopts)
        return fused_kd_loss(
            hidden,
            weight,
            ids,
            logprobs,
            mask,
            batch["labels"],
            loss_mask=batch["loss_mask"],
            num_items=num_items,
            softcap=softcap,
            **options,
            **kopts,
        )

    def schedules(total_steps: int) -> dict[str, Callable[[jax.Array], jax.Array]]:
        start, minimum = float(cfg.kd_temperature), float(cfg.kd_temperature_min)
        return {KD_TEMPERATURE: kd_temperature_schedule(start, minimum, total_steps)}

    return Objective(
        name="kd",
        count=trainable_tokens,
        loss=loss,
        batch_keys=keys.SEQUENCE if online else keys.SEQUENCE + keys.KD_TARGETS,
        companions=("teacher",) if online else (),
        schedules=schedules if scheduled else None,
    )
