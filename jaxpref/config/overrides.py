"""``key=value`` command-line overrides with dotted paths, applied to the raw YAML data.

``mesh.fsdp=4``, ``datasets.0.path=data/x.jsonl`` (or ``datasets[0].path=...``),
``lora_target_modules=[q_proj,v_proj]``. Values are parsed as YAML (``true``, ``1e-4``, lists); an empty
value (``wandb_project=``) unsets the key.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any

from jaxpref.config.yaml_source import join, load_scalar
from jaxpref.errors import ConfigError

_INDEX = re.compile(r"\[(\d+)\]")
_PART = re.compile(r"^(?:[A-Za-z_][\w-]*|\d+)$")


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """``"a.b.0.c=value"`` -> ``(["a", "b", 0, "c"], parsed value)``."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. learning_rate=1e-4 or mesh.fsdp=4")
    parts = _INDEX.sub(r".\1", key).split(".")
    if not all(_PART.match(p) for p in parts):
        raise ConfigError(f"override {text!r}: {key!r} is not a key path like mesh.fsdp or datasets.0.path")
    path: list[str | int] = [int(p) if p.isdigit() else p for p in parts]
    value = load_scalar(raw) if raw.strip() else None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
    """A copy of ``data`` with the overrides applied, and the key paths they set (for messages)."""
    data = copy.deepcopy(data)
    touched: list[str] = []
    for text in overrides:
        path, value = parse_override(text)
        _set(data, path, value, text)
        where = ""
        for part in path:
            where = join(where, part)
        touched.append(where)
    return data, touched


def _set(data: dict[str, Any], path: list[str | int], value: Any, text: str) -> None:
    node: Any = data
    where = ""
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            if not isinstance(part, int):
                raise ConfigError(f"override {text!r}: {where} is a list; index it, e.g. {where}.0.{part}")
            if part >= len(node):
                raise ConfigError(
                    f"override {text!r}: {where} has {len(node)} entries (indexes 0-{len(node) - 1}); "
                    f"overrides can change entries, not add them"
                    if node
                    else f"override {text!r}: {where} is empty; add entries in the YAML file"
                )
        elif isinstance(node, dict):
            part = str(part)
        else:
            raise ConfigError(f"override {text!r}: {where} is {node!r}, not a mapping or a list")
        if last:
            node[part] = value
            return
        child = node[part] if isinstance(node, list) else node.get(part)
        if child is None:
            if isinstance(path[i + 1], int):
                raise ConfigError(
                    f"override {text!r}: {join(where, part)} is not set; add its entries in the YAML file"
                )
            child = {}
            node[part] = child
        node, where = child, join(where, part)
