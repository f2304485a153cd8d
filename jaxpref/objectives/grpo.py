"""GRPO (``rl: grpo``): the policy-gradient step on sampled completions, as TRL 1.16's ``GRPOTrainer``.

A micro-batch (``batch_keys.GRPO``) holds one prompt + sampled completion per row, its advantage [B]
(computed on the host by ``jaxpref.rewards.group_advantages``) and, when completions are reused
(``trl.num_iterations`` > 1), the sampling policy's per-token log-probs ``old_logps`` [B, T]. The loss:

* one forward pass of the policy (adapters on); per-token log-probs of the labels at the sampling
  temperature ``trl.temperature`` (TRL divides the logits by it in training too) from the fused kernel
  (``fused_token_logps``: no [tokens, vocab] logits);
* the per-token entropy at that temperature for the ``entropy`` metric, from a separate blocked forward
  pass over the vocabulary under ``stop_gradient`` (``fused_token_entropy``: one more LM-head matmul,
  at most [block_n, block_v] logits at a time; the fused kernels' custom VJPs stay as they are);
* the reference's log-probs (same temperature, no gradient) when ``trl.beta`` != 0, per
  :func:`reference_mode`: the policy with its LoRA adapters off (``adapter_off``) or a frozen copy
  (``model``, the trainer companion "reference"). GRPO's completions are new every step, so nothing can
  be precomputed;
* ``old_logps`` = the batch's when ``trl.num_iterations`` > 1, else ``stop_gradient`` of the current
  log-probs (importance ratio 1, as TRL when ``old_per_token_logps`` is None);
* ``jaxpref.losses.grpo_loss`` with the ``trl`` section's loss type, clipping, delta and KL settings.

``count`` is :func:`jaxpref.losses.grpo_count`: real rows (``grpo``), completion tokens (``dapo``,
``bnpo``) or real rows x ``max_completion_length`` (``dr_grpo``); a row is real when any of its
``segment_ids`` is non-zero. Loss and metrics are contributions (``objectives/base.py``); the metric
semantics across micro-batches are in ``jaxpref/losses/grpo.py``.

The builder reads ``cfg.trl``, ``cfg.adapter``, ``cfg.rl_adapter_ref_model`` and ``cfg.fused_kernel`` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxpref import batch_keys as keys
from jaxpref.losses import grpo_count, grpo_loss
from jaxpref.losses.fused import fused_token_entropy, fused_token_logps
from jaxpref.objectives.base import Batch, Objective
from jaxpref.objectives.registry import register_objective
from jaxpref.objectives.sft import kernel_options


def reference_mode(cfg: Any) -> str:
    """Where GRPO's reference log-probs come from: "none" (``trl.beta`` 0: no KL term), "adapter_off"
    (``adapter: lora`` without ``rl_adapter_ref_model``) or "model" (a frozen copy of the base model)."""
    if float(cfg.trl.beta) == 0.0:
        return "none"
    if cfg.adapter == "lora" and not cfg.rl_adapter_ref_model:
        return "adapter_off"
    return "model"


def real_rows(batch: Batch) -> jax.Array:
    """[B] bool: rows holding a sequence (any ``segment_ids`` > 0); padding rows are all zeros."""
    return jnp.any(batch["segment_ids"] > 0, axis=-1)


def _hidden(model: Any, batch: Batch, *, use_adapters: bool, train: bool) -> jax.Array:
    return model(
        batch["input_ids"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        use_adapters=use_adapters,
        deterministic=not train,
    )


def token_logps(
    model: Any,
    batch: Batch,
    *,
    temperature: float,
    use_adapters: bool = True,
    kopts: Mapping[str, Any] | None = None,
) -> jax.Array:
    """Per-token log-probs [B, T] float32 of ``batch["labels"]`` at ``temperature`` (0 outside
    ``loss_mask``), no gradient: the sampling policy's ``old_logps`` for ``trl.num_iterations`` > 1, or
    a reference's. Reads ``input_ids``, ``positions``, ``segment_ids``, ``labels``, ``loss_mask``.

    ``kopts``: the fused kernel's options (``objectives.sft.kernel_options(cfg)``); default: its defaults.
    """
    hidden = _hidden(model, batch, use_adapters=use_adapters, train=False)
    weight = model.lm_head_weight(use_adapters=use_adapters)
    logps = fused_token_logps(
        hidden, weight, batch["labels"], mask=batch["loss_mask"], temperature=temperature,
        softcap=model.config.final_logit_softcapping, **dict(kopts or {}),
    )  # fmt: skip
    return jax.lax.stop_gradient(logps)


@register_objective("grpo")
def build_grpo(cfg: Any) -> Objective:
    """GRPO from the ``trl`` section (TRL 1.16 ``GRPOConfig`` names; module docstring)."""
    trl = cfg.trl
    kopts = kernel_options(cfg)
    mode = reference_mode(cfg)
    temperature = float(trl.temperature)
    reuse_old = int(trl.num_iterations) > 1
    options = dict(
        loss_type=trl.loss_type,
        importance_sampling_level=trl.importance_sampling_level,
        epsilon_low=float(trl.epsilon),
        epsilon_high=None if trl.epsilon_high is None else float(trl.epsilon_high),
        delta=None if trl.delta is None else float(trl.delta),
        beta=float(trl.beta),
        use_bias_correction_kl=bool(trl.use_bias_correction_kl),
        max_completion_length=int(trl.max_completion_length),
    )

    def count(batch: Batch) -> jax.Array:
        return grpo_count(
            batch["loss_mask"], real_rows(batch), loss_type=options["loss_type"],
            max_completion_length=options["max_completion_length"],
        )  # fmt: skip

    def loss(model: Any, batch: Batch, num_items: jax.Array, *, train: bool, companions: Any = None):
        mask = batch["loss_mask"].astype(bool)
        hidden = _hidden(model, batch, use_adapters=True, train=train)
        weight = model.lm_head_weight(use_adapters=True)
        softcap = model.config.final_logit_softcapping
        logps = fused_token_logps(
            hidden, weight, batch["labels"], mask=mask, temperature=temperature, softcap=softcap, **kopts
        )
        entropies = fused_token_entropy(
            jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(weight), mask=mask, temperature=temperature,
            softcap=softcap, **kopts,
        )  # fmt: skip
        ref = None
        if mode == "adapter_off":
            ref = token_logps(model, batch, temperature=temperature, use_adapters=False, kopts=kopts)
        elif mode == "model":
            if not companions or "reference" not in companions:
                raise ValueError("GRPO with reference mode 'model' needs the trainer companion 'reference'")
            ref = token_logps(companions["reference"], batch, temperature=temperature, kopts=kopts)
        old = batch["old_logps"] if reuse_old else None
        return grpo_loss(
            logps, old, ref, batch["advantages"], mask, rows=real_rows(batch), entropies=entropies,
            num_items=num_items, **options,
        )  # fmt: skip

    return Objective(
        name="grpo",
        count=count,
        loss=loss,
        batch_keys=keys.GRPO,
        reference=mode,
        companions=("reference",) if mode == "model" else (),
        data="prompts",
    )
