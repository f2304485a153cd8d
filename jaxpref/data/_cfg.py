"""Reading config attributes by the names in docs/design.md "Config".

The pipeline reads `JaxprefConfig` / `DatasetConfig` attributes, and tests may pass stand-in objects
that lack optional keys; ``None`` means "unset" (axolotl YAMLs write `key:` with no value). Raw dataset
entries (plain mappings, as YAML writes them) are read by key: they carry axolotl keys that the schema
does not model (``field_chosen``, a mapping ``type``, ...).
"""

from collections.abc import Mapping
from typing import Any


def opt(obj: Any, name: str, default: Any = None) -> Any:
    """``obj.name`` (``obj[name]`` for a mapping), or ``default`` when it is missing or None."""
    value = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
    return default if value is None else value
