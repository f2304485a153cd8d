"""Helpers for config tests: a minimal valid config, and validating variations of it."""

from __future__ import annotations

from typing import Any

import pytest

from jaxpref.config import JaxprefConfig, validate_config
from jaxpref.errors import ConfigError

MINIMAL: dict[str, Any] = {
    "base_model": "org/model",
    "learning_rate": 1e-4,
    "datasets": [{"path": "org/data", "type": "chat_template"}],
}


def make(**overrides: Any) -> JaxprefConfig:
    """``MINIMAL`` updated with ``overrides``, validated."""
    return validate_config({**MINIMAL, **overrides})


def problem(**overrides: Any) -> str:
    """The ConfigError message for ``MINIMAL`` updated with ``overrides``."""
    with pytest.raises(ConfigError) as info:
        make(**overrides)
    return str(info.value)
