"""jaxpref.losses: pure JAX loss functions for distillation, preference training and GRPO.

Every loss takes arrays, computes in float32 whatever the input dtype, masks with ``where`` and returns
``(loss, metrics)`` with ``metrics`` a dict of float32 scalars; everything is jit/grad/vmap-safe.
Of the rest of jaxpref the losses import only ``jaxpref.pallas``: the fused losses (``fused.py``) run
its LM-head kernels. See docs/losses.md for one example per loss.
"""

from .dpo import DPO_LOSS_TYPES, F_DIVERGENCE_TYPES, dpo_loss, f_divergence_scores, wpo_weights
from .fused import (
    fused_cross_entropy,
    fused_kd_loss,
    fused_token_entropy,
    fused_token_logps,
    fused_token_logps_and_log_sum_sq_probs,
)
from .grpo import GRPO_LOSS_TYPES, IMPORTANCE_SAMPLING_LEVELS, grpo_count, grpo_loss
from .kd import kd_loss, kd_loss_from_gathered, kd_topk_loss, kd_topk_loss_from_gathered
from .kto import KTO_LOSS_TYPES, kto_loss
from .logps import (
    cross_entropy_from_gathered,
    cross_entropy_loss,
    gather_logits,
    log_sum_sq_probs,
    log_sum_sq_probs_from_gathered,
    sequence_logps,
    sequence_logps_from_gathered,
    token_logps,
    token_logps_from_gathered,
)
from .orpo import log1mexp, orpo_loss
from .registry import UnknownLossError, get_loss, list_losses, register_loss
from .reward import reward_loss
from .simpo import CPO_LOSS_TYPES, cpo_loss, simpo_loss

__all__ = [
    "CPO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "GRPO_LOSS_TYPES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "KTO_LOSS_TYPES",
    "UnknownLossError",
    "cpo_loss",
    "cross_entropy_from_gathered",
    "cross_entropy_loss",
    "dpo_loss",
    "f_divergence_scores",
    "fused_cross_entropy",
    "fused_kd_loss",
    "fused_token_entropy",
    "fused_token_logps",
    "fused_token_logps_and_log_sum_sq_probs",
    "gather_logits",
    "get_loss",
    "grpo_count",
    "grpo_loss",
    "kd_loss",
    "kd_loss_from_gathered",
    "kd_topk_loss",
    "kd_topk_loss_from_gathered",
    "kto_loss",
    "list_losses",
    "log1mexp",
    "log_sum_sq_probs",
    "log_sum_sq_probs_from_gathered",
    "orpo_loss",
    "register_loss",
    "reward_loss",
    "sequence_logps",
    "sequence_logps_from_gathered",
    "simpo_loss",
    "token_logps",
    "token_logps_from_gathered",
    "wpo_weights",
]
