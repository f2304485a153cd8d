"""Supervised fine-tuning: token cross-entropy over trainable (``loss_mask``) positions.

Hidden states go straight into the fused kernel with the LM-head weight, so [tokens, vocab] logits
are never materialised. N = trainable tokens over the whole optimizer step.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxpref.losses.fused import fused_cross_entropy
from jaxpref.objectives.base import Batch, Objective
from jaxpref.objectives.registry import register_objective


def kernel_options(cfg: Any) -> dict[str, Any]:
    """Keyword arguments for the fused kernel from the config's ``fused_kernel`` block."""
    fk = cfg.fused_kernel
    if fk is None:
        return {}
    return {"impl": fk.impl, "block_n": fk.block_n, "block_v": fk.block_v}


def trainable_tokens(batch: Batch) -> jnp.ndarray:
    return jnp.sum(batch["loss_mask"].astype(jnp.float32))


def forward_hidden(model: Any, batch: Batch, *, train: bool) -> jnp.ndarray:
    """Final hidden states [B, T, H] for an LM batch."""
    return model(
        batch["input_ids"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        deterministic=not train,
    )


@register_objective("sft")
def build_sft(cfg: Any) -> Objective:
    kopts = kernel_options(cfg)

    def loss(model: Any, batch: Batch, num_items: jnp.ndarray, *, train: bool):
        hidden = forward_hidden(model, batch, train=train)
        nll, _ = fused_cross_entropy(
            hidden, model.lm_head_weight(), batch["labels"], mask=batch["loss_mask"], num_items=num_items,
            softcap=model.config.final_logit_softcapping, **kopts,
        )  # fmt: skip
        return nll, {}

    return Objective(name="sft", count=trainable_tokens, loss=loss)
