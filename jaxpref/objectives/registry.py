"""Objectives by name, and the plugin hook (``objective: package.module:builder`` in the config)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from jaxpref.errors import ConfigError
from jaxpref.objectives.base import Objective

Builder = Callable[[Any], Objective]
_BUILDERS: dict[str, Builder] = {}


def register_objective(name: str) -> Callable[[Builder], Builder]:
    """Decorator: ``@register_objective("sft") def build(cfg) -> Objective``."""

    def deco(builder: Builder) -> Builder:
        _BUILDERS[name] = builder
        return builder

    return deco


def known_objectives() -> list[str]:
    return sorted(_BUILDERS)


def get_objective_builder(name: str) -> Builder:
    """A registered name, or ``package.module:attribute`` naming a builder ``cfg -> Objective``."""
    if name in _BUILDERS:
        return _BUILDERS[name]
    if ":" not in name:
        raise ConfigError(
            f"objective: unknown objective {name!r}; known: {', '.join(known_objectives())}, or give "
            "a plugin as 'package.module:builder' (a function taking the config, returning an Objective)."
        )
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"objective: cannot import plugin module {module_name!r}: {exc}") from exc
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise ConfigError(f"objective: {module_name!r} has no callable {attr!r}.")
    return builder


def build_objective(cfg: Any, name: str) -> Objective:
    objective = get_objective_builder(name)(cfg)
    if not isinstance(objective, Objective):
        raise ConfigError(f"objective: builder for {name!r} returned {type(objective).__name__}, not an Objective.")
    return objective
