"""``load_config``: YAML file + ``key=value`` overrides -> validated ``JaxprefConfig``."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from jaxpref.config import axolotl, yaml_source
from jaxpref.config.messages import Problem, format_problems, problems_from_validation
from jaxpref.config.nested import DatasetConfig
from jaxpref.config.notes import collect_warnings, warn
from jaxpref.config.overrides import apply_overrides
from jaxpref.config.paths import resolve_config_paths
from jaxpref.config.schema import JaxprefConfig
from jaxpref.errors import ConfigError


def load_config(path: str | Path, overrides: Iterable[str] = (), *, require_datasets: bool = True) -> JaxprefConfig:
    """Read, override, translate (axolotl keys), validate and resolve paths; ConfigError on any problem.

    Warnings (ignored axolotl keys, mapped values) are logged on ``jaxpref.config`` and kept in
    ``cfg.warnings``. ``require_datasets=False`` is for commands that do not train (export, ...).
    """
    path = Path(path)
    text = _read(path)
    data, lines, duplicates = yaml_source.parse(text, str(path))
    if data is None:
        raise ConfigError(f"{path}: the config file is empty; it needs key: value lines (see docs/config.md)")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a config must be a mapping of key: value lines, not a {type(data).__name__} "
            "(check the indentation of the first lines)"
        )
    data, touched = apply_overrides(data, overrides)
    origin: dict[str, int | str] = dict(lines)
    for key_path in touched:
        for known in [k for k in origin if k == key_path or k.startswith((key_path + ".", key_path + "["))]:
            del origin[known]
        origin[key_path] = "command-line override"
    return validate_config(
        data, config_path=path, lines=origin, require_datasets=require_datasets, preamble_warnings=duplicates
    )


def validate_config(
    data: Mapping[str, Any],
    *,
    config_path: str | Path | None = None,
    lines: Mapping[str, int | str] | None = None,
    require_datasets: bool = True,
    preamble_warnings: Iterable[str] = (),
) -> JaxprefConfig:
    """Validate a config mapping (parsed YAML), reporting every problem in one ConfigError.

    ``config_path`` names the file in messages and is the second place relative paths are looked up;
    ``lines`` maps key paths (``datasets[0].type``) to their line numbers for messages.
    """
    config_path = Path(config_path) if config_path is not None else None
    source = str(config_path) if config_path is not None else "config"
    with collect_warnings() as warnings:
        for message in preamble_warnings:
            warn(message)
        raw = axolotl.drop_empty(copy.deepcopy(dict(data)))
        problems: list[Problem] = [
            ("", line) for line in axolotl.translate(raw, JaxprefConfig.model_fields, DatasetConfig.model_fields)
        ]
        cfg = None
        try:
            cfg = JaxprefConfig.model_validate(raw, context={"require_datasets": require_datasets})
        except ValidationError as exc:
            problems += problems_from_validation(exc, JaxprefConfig)
        if problems or cfg is None:
            raise ConfigError(format_problems(problems, source, lines or {}))
        resolve_config_paths(cfg, config_path.resolve().parent if config_path is not None else None)
        cfg._warnings = tuple(warnings)
    cfg._config_path = config_path
    return cfg


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (current directory: {Path.cwd()})") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; give the config's YAML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc})") from None
