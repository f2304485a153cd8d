"""Before-validators for config values that accept more than one YAML shape.

Each turns the accepted shapes into one canonical value, or raises ``ValueError`` with a message that
says what is allowed, so a bad value gives one clear error instead of one per union member.
"""

from __future__ import annotations

import re
from typing import Any

from jaxpref.config.notes import warn


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _maybe_number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` as a string; accept numeric strings like pydantic does for floats."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def str_list(value: Any) -> Any:
    """A string or a list of strings -> list of strings (None passes through)."""
    if isinstance(value, str):
        return [value]
    return value


def count_or_fraction(value: Any) -> Any:
    """``val_set_size``: a fraction in [0, 1) or a whole number of rows >= 1."""
    value = _maybe_number(value)
    if not _is_number(value) or value < 0 or (value >= 1 and not float(value).is_integer()):
        raise ValueError(f"expected a fraction in [0, 1) or a whole number of rows >= 1, got {value!r}")
    return float(value) if value < 1 else int(value)


def steps_or_fraction(value: Any) -> Any:
    """``eval_steps``/``save_steps``: every N steps (whole N >= 1) or a fraction (0, 1) of the run.

    0 passes as 0 (axolotl reads a zero cadence as not set; the schema says what it means for each key).
    """
    if value is None:
        return None
    value = _maybe_number(value)
    if _is_number(value) and value == 0:
        return 0
    if not _is_number(value) or value < 0 or (value >= 1 and not float(value).is_integer()):
        raise ValueError(f"expected a whole number of steps >= 1 or a fraction in (0, 1), got {value!r}")
    return float(value) if value < 1 else int(value)


def zero_is_unset(value: Any) -> Any:
    """A count whose 0 axolotl reads as not set (``if cfg.max_steps:``): 0 -> None (the default)."""
    return None if _is_number(value) and value == 0 else value


def gradient_checkpointing(value: Any) -> Any:
    """axolotl's ``offload``/``offload_disk`` variants -> plain rematerialisation, with a warning."""
    if isinstance(value, str) and value.strip().lower() in ("offload", "offload_disk", "unsloth"):
        warn(
            f"gradient_checkpointing: {value} -> true (activation offloading is not implemented; "
            "activations are rematerialised)"
        )
        return True
    return value


def adapter(value: Any) -> Any:
    """``lora`` or empty (``qlora`` becomes ``lora`` + ``load_in_4bit`` before validation: axolotl.translate)."""
    if isinstance(value, str):
        if not value.strip():
            return None
        if value.strip().lower() != "lora":
            raise ValueError(f"must be lora or qlora, or empty for full fine-tuning, got {value!r}")
        return "lora"
    return value


def bnb_4bit_quant_type(value: Any) -> Any:
    """``nf4`` (any case); ``fp4`` gets its own message."""
    if isinstance(value, str) and value.strip().lower() == "fp4":
        raise ValueError(
            "fp4 is not supported: jaxpref quantizes QLoRA base weights to nf4 (4-bit NormalFloat, what "
            "QLoRA and axolotl use); set bnb_4bit_quant_type: nf4 or remove it"
        )
    return value.strip().lower() if isinstance(value, str) else value


def torch_dtype_name(value: Any) -> Any:
    """``torch.bfloat16`` / ``bf16`` / ``float32`` / ... -> ``bfloat16`` or ``float32`` (float16 -> bfloat16,
    with a warning: float16 compute is not implemented)."""
    if not isinstance(value, str):
        return value
    name = value.strip().lower().removeprefix("torch.")
    names = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32", "float": "float32"}
    if name in ("float16", "fp16", "half"):
        warn(f"{value}: float16 compute is not implemented; using bfloat16")
        return "bfloat16"
    return names.get(name, value)


def dpo_loss_type(value: Any) -> Any:
    """A DPO loss type or a list of them (TRL's ``loss_type``, MPO) -> a non-empty list of TRL names."""
    # The losses module is the one list of TRL's loss types (imported here, only when the key is set).
    from jaxpref.losses.dpo import DPO_LOSS_TYPES

    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return value  # the list[str] type check reports it
    if not value:
        raise ValueError("an empty list; give at least one DPO loss type (TRL's default is sigmoid)")
    for name in value:
        if isinstance(name, str) and name not in DPO_LOSS_TYPES:
            raise ValueError(f"unknown DPO loss {name!r}; TRL's loss types are {', '.join(DPO_LOSS_TYPES)}")
    return value


_NAME = r"[A-Za-z_]\w*"
_OBJECTIVE = re.compile(rf"^{_NAME}$|^{_NAME}(\.{_NAME})*:{_NAME}(\.{_NAME})*$")


def objective(value: Any) -> Any:
    """A registered objective name, or ``package.module:builder`` (checked for shape only here)."""
    if isinstance(value, str) and not _OBJECTIVE.match(value.strip()):
        raise ValueError(
            f"expected a registered objective name (e.g. sft, kd, dpo) or 'package.module:builder', got {value!r}"
        )
    return value.strip() if isinstance(value, str) else value


MESH_AXES = ("data", "fsdp", "tensor")


def logical_axis_rules(value: Any) -> Any:
    """A list of ``[logical_name, mesh_axis | null | [mesh_axis, ...]]`` pairs -> list of tuples."""
    if value is None:
        return None
    shape = "a list of [logical_name, mesh_axis | null | [mesh_axis, ...]] pairs"
    if not isinstance(value, list):
        raise ValueError(f"expected {shape}, got {value!r}")
    rules = []
    for i, rule in enumerate(value):
        if not (isinstance(rule, list | tuple) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(f"entry {i}: expected {shape}, got {rule!r}")
        name, axes = rule
        names = axes if isinstance(axes, list | tuple) else [] if axes is None else [axes]
        bad = [a for a in names if a not in MESH_AXES]
        if bad:
            raise ValueError(f"entry {i} ({name}): mesh axes are {', '.join(MESH_AXES)} (or null), got {bad!r}")
        rules.append((name, tuple(axes) if isinstance(axes, list | tuple) else axes))
    return rules
