"""Shared plumbing of the ``python -m jaxpref.<command>`` entry points."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from jaxpref.errors import UserError

NOISY_LOGGERS = ("absl", "jax", "orbax", "urllib3", "httpx", "datasets", "filelock")


def setup_logging() -> None:
    """jaxpref's messages at INFO (or ``JAXPREF_LOG_LEVEL``) as plain lines; libraries at WARNING."""
    # force: importing orbax has already run absl's logging.basicConfig() with its own format.
    logging.basicConfig(level=os.environ.get("JAXPREF_LOG_LEVEL", "INFO"), format="%(message)s", force=True)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def run_command(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Call ``fn``; a UserError becomes one paragraph on stderr and exit code 2 (no traceback)."""
    try:
        fn(*args, **kwargs)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
