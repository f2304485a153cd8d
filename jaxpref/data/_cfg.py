"""Reading dataset entries by the names in docs/design.md "Config".

An entry is a ``DatasetConfig`` or a raw mapping (as YAML writes it): raw entries carry axolotl keys
that the schema does not model (``field_chosen``, a mapping ``type``, ...); ``None`` means "unset"
(axolotl YAMLs write `key:` with no value). Run-level settings come typed, in ``DataSettings``.
"""

from collections.abc import Mapping
from typing import Any


def opt(obj: Any, name: str, default: Any = None) -> Any:
    """``obj.name`` (``obj[name]`` for a mapping), or ``default`` when it is missing or None."""
    value = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
    return default if value is None else value
