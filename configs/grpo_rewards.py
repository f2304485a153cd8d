"""Reward functions of the GRPO demo (``configs/grpo.yaml``), written as for TRL's ``GRPOTrainer``.

jaxpref imports them by the config's ``trl.reward_funcs`` (``configs.grpo_rewards.exact_answer``: run from
the repository root, as axolotl imports reward modules from the working directory). Completions are
conversations (``[{"role": "assistant", "content": text}]``) because the prompts are.
"""

from __future__ import annotations

import re
from typing import Any


def _text(completion: Any) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def exact_answer(completions: list[Any], answer: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the completion is the reference answer (surrounding whitespace ignored), else 0.0."""
    return [float(_text(c).strip() == a.strip()) for c, a in zip(completions, answer)]


def integer_format(completions: list[Any], **kwargs: Any) -> list[float]:
    """1.0 when the completion is a bare integer (the count task's answer format), else 0.0."""
    return [float(re.fullmatch(r"\d+", _text(c).strip()) is not None) for c in completions]
