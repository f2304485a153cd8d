"""Importing the user's own functions named in a config (reward functions, dataset transforms, metrics).

``module.function`` (axolotl's spelling) or ``package.module:function``; the module is looked up on
``sys.path`` with the working directory first, as axolotl's ``importlib.import_module`` under its CLI
finds ``rewards.py`` next to the config's run directory, and as ``python -m`` does.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any


def import_attribute(path: str) -> Any:
    """The object ``path`` names; ImportError, AttributeError or ValueError when it cannot be found."""
    module_name, _, attr = path.rpartition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{path!r} is not module.function or package.module:function")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    return getattr(importlib.import_module(module_name), attr)
