"""Config warnings: logged on the ``jaxpref.config`` logger, one line each, and collected per load."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

logger = logging.getLogger("jaxpref.config")

_sink: ContextVar[list[str] | None] = ContextVar("jaxpref_config_warnings", default=None)


def warn(message: str) -> None:
    """Log ``message`` once per collection (see ``collect_warnings``), or every time outside one."""
    sink = _sink.get()
    if sink is not None:
        if message in sink:
            return
        sink.append(message)
    logger.warning(message)


@contextmanager
def collect_warnings() -> Iterator[list[str]]:
    """Collect (and de-duplicate) the warnings emitted while validating one config."""
    token = _sink.set([])
    try:
        yield _sink.get()  # type: ignore[misc]
    finally:
        _sink.reset(token)
