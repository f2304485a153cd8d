"""Reading config attributes by the names in docs/design.md "Config".

The pipeline reads `JaxprefConfig` / `DatasetConfig` attributes, and tests may pass stand-in objects
that lack optional keys; ``None`` means "unset" (axolotl YAMLs write `key:` with no value).
"""

from typing import Any


def opt(obj: Any, name: str, default: Any = None) -> Any:
    """``obj.name``, or ``default`` when the attribute is missing or None."""
    value = getattr(obj, name, None)
    return default if value is None else value
