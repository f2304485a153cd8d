"""Shared plumbing of the ``python -m jaxpref.<command>`` entry points."""

from __future__ import annotations

import logging
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

from jaxpref.errors import UserError

NOISY_LOGGERS = ("absl", "jax", "orbax", "urllib3", "httpx", "datasets", "filelock")

# glibc malloc settings for the commands (Linux only). XLA on CPU allocates its large temporaries (weight
# gradients, logits blocks) fresh every step; with glibc's defaults each one is a new mmap whose pages
# fault in 4 KiB at a time. Transparent huge pages for malloc (hugetlb=1: madvise(MADV_HUGEPAGE)) cut a
# KD train step on 2 CPU cores by about a sixth (docs/kernels.md "Allocator"). Read once at process start,
# hence the re-exec.
MALLOC_TUNABLES = "glibc.malloc.hugetlb=1"
NO_MALLOC_TUNING = "JAXPREF_NO_MALLOC_TUNING"


def reexec_with_malloc_tuning() -> None:
    """Re-run this command with ``GLIBC_TUNABLES=MALLOC_TUNABLES`` if it is not set yet.

    Called at the top of a command module run as ``__main__`` (never on import), on glibc Linux only; a
    no-op when ``GLIBC_TUNABLES`` is already set (the user's choice wins) or ``JAXPREF_NO_MALLOC_TUNING=1``.
    The process keeps its PID.
    """
    if (
        sys.platform != "linux"
        or platform.libc_ver()[0] != "glibc"
        or "GLIBC_TUNABLES" in os.environ
        or os.environ.get(NO_MALLOC_TUNING, "") not in ("", "0")
        or len(sys.orig_argv) < 2
    ):
        return
    env = {**os.environ, "GLIBC_TUNABLES": MALLOC_TUNABLES}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


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
