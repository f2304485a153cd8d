"""Name -> loss function registry, so a plugin can add a loss without touching the trainer.

>>> from jaxpref.losses import register_loss, get_loss
>>> @register_loss("my_loss")
... def my_loss(x, *, scale=1.0):
...     return scale * x.mean(), {}
>>> get_loss("my_loss") is my_loss
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

_REGISTRY: dict[str, Callable] = {}


class UnknownLossError(KeyError):
    """Raised by :func:`get_loss` for a name that is not registered (a ``KeyError``)."""

    def __str__(self) -> str:  # KeyError would show the message with quotes around it
        return str(self.args[0]) if self.args else ""


def register_loss(name: str, *, overwrite: bool = False) -> Callable[[F], F]:
    """Decorator registering ``fn`` under ``name``; returns ``fn`` unchanged.

    Registering a name twice is an error unless ``overwrite=True`` (a plugin replacing a built-in
    must say so).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"Loss name must be a non-empty string, got {name!r}.")

    def decorator(fn: F) -> F:
        if name in _REGISTRY and _REGISTRY[name] is not fn and not overwrite:
            raise ValueError(
                f"A loss named {name!r} is already registered ({_REGISTRY[name].__module__}."
                f"{_REGISTRY[name].__qualname__}); pass overwrite=True to replace it."
            )
        _REGISTRY[name] = fn
        return fn

    return decorator


def get_loss(name: str) -> Callable:
    """The loss function registered under ``name``; :class:`UnknownLossError` lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        raise UnknownLossError(
            f"Unknown loss {name!r}. Registered losses: {known}. Add one with @jaxpref.losses.register_loss('name')."
        ) from None


def list_losses() -> list[str]:
    """Sorted names of all registered losses."""
    return sorted(_REGISTRY)
