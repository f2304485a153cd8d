"""Knowledge distillation: top-k KD (+ optional CE) from hidden states through the fused kernel.

Teacher targets come from the batch (``target_token_ids``, ``target_logprobs``, ``target_mask``,
prediction-aligned by the data pipeline) or, with ``kd_teacher_model``, from a frozen teacher run
in the same step: its top-k at ``kd_temperature`` is computed in row blocks and renormalised over
the kept k entries, which is exactly what the pipeline does to stored targets, so both paths feed
the same loss. N = trainable tokens over the whole optimizer step (``loss_mask``), so gradient
accumulation and data parallelism do not change the scale.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxpref import batch_keys as keys
from jaxpref.losses.fused import fused_kd_loss
from jaxpref.objectives.base import Batch, Objective
from jaxpref.objectives.registry import register_objective
from jaxpref.objectives.sft import forward_hidden, kernel_options, trainable_tokens
from jaxpref.teacher_topk import topk_logprobs


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
    ids, logprobs = topk_logprobs(hidden, teacher.lm_head_weight(), k, temperature=temperature)
    logprobs = jax.nn.log_softmax(logprobs, axis=-1)
    mask = jnp.broadcast_to(batch["loss_mask"][..., None], ids.shape)
    return jax.lax.stop_gradient(ids), jax.lax.stop_gradient(logprobs), mask


@register_objective("kd")
def build_kd(cfg: Any) -> Objective:
    kopts = kernel_options(cfg)
    options = kd_options(cfg)
    online = bool(cfg.kd_teacher_model)
    top_k = int(cfg.kd_teacher_top_k)

    def loss(model: Any, batch: Batch, num_items: jax.Array, *, train: bool, companions: Any = None):
        hidden = forward_hidden(model, batch, train=train)
        if online:
            ids, logprobs, mask = online_teacher_targets(companions["teacher"], batch, top_k, options["temperature"])
        else:
            ids, logprobs, mask = (batch[k] for k in keys.KD_TARGETS)
        return fused_kd_loss(
            hidden,
            model.lm_head_weight(),
            ids,
            logprobs,
            mask,
            batch["labels"],
            loss_mask=batch["loss_mask"],
            num_items=num_items,
            **options,
            **kopts,
        )

    return Objective(
        name="kd",
        count=trainable_tokens,
        loss=loss,
        batch_keys=keys.SEQUENCE if online else keys.SEQUENCE + keys.KD_TARGETS,
        companions=("teacher",) if online else (),
    )
