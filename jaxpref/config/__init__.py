"""The jaxpref config: YAML (axolotl key names) -> validated ``JaxprefConfig``.

``load_config(path, overrides)`` is the entry point; docs/config.md is the generated reference.
"""

from jaxpref.config.loader import load_config, validate_config
from jaxpref.config.nested import DatasetConfig, FusedKernelConfig, MeshConfig, SpecialTokensConfig
from jaxpref.config.overrides import apply_overrides, parse_override
from jaxpref.config.schema import JaxprefConfig


def __getattr__(name: str):  # noqa: ANN202 - lazy, so `python -m jaxpref.config.reference` runs cleanly
    if name == "config_reference_markdown":
        from jaxpref.config.reference import config_reference_markdown

        return config_reference_markdown
    raise AttributeError(f"module 'jaxpref.config' has no attribute {name!r}")


__all__ = [
    "DatasetConfig",
    "FusedKernelConfig",
    "JaxprefConfig",
    "MeshConfig",
    "SpecialTokensConfig",
    "apply_overrides",
    "config_reference_markdown",
    "load_config",
    "parse_override",
    "validate_config",
]
