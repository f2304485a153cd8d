"""A model's final logit soft-cap (Gemma 2 ``final_logit_softcapping``), read in one place.

Every consumer of the LM head (objectives, teachers, the sampler, ``CausalLM.logits``) asks
:func:`final_softcap` and passes the value to the fused kernels or to ``jaxpref.pallas.soft_cap``.
"""

from __future__ import annotations

from typing import Any

from jaxpref.pallas import check_softcap


def final_softcap(model: Any) -> float | None:
    """``model.config.final_logit_softcapping`` as a static positive float, or None (no capping).

    Logits are then ``cap * tanh(raw / cap)``, applied before any temperature (as transformers does).
    Reads the field with ``getattr`` so configs without it (and models without a config) mean no cap.
    """
    return check_softcap(getattr(getattr(model, "config", None), "final_logit_softcapping", None))
