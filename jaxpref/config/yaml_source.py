"""Safe YAML parsing that keeps line numbers (for error messages) and reads ``1e-4`` as a number.

PyYAML implements YAML 1.1, where a float needs a dot, so ``learning_rate: 1e-4`` would be the string
"1e-4"; the loader adds YAML 1.2's float syntax. Only safe (plain data) constructors are used.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from jaxpref.errors import ConfigError


class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` plus YAML 1.2 floats (``1e-4``, ``5E3``)."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_scalar(text: str) -> Any:
    """A command-line value as YAML (``true``, ``1e-4``, ``[q_proj, v_proj]``); plain text if not YAML."""
    try:
        return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        return text


def parse(text: str, source: str) -> tuple[Any, dict[str, int], list[str]]:
    """``(data, line of each key path, duplicate-key warnings)``; ConfigError on a YAML syntax error.

    Key paths are written like error messages write them: ``mesh.fsdp``, ``datasets[1].type``.
    """
    loader = _SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        detail = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise ConfigError(f"{where}: invalid YAML: {detail}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()
    lines: dict[str, int] = {}
    duplicates: list[str] = []
    if node is not None:
        _walk(node, "", lines, duplicates, source)
    return data, lines, duplicates


def join(prefix: str, key: str | int) -> str:
    """Append a key or list index to a dotted path."""
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else str(key)


def _walk(node: yaml.Node, prefix: str, lines: dict[str, int], duplicates: list[str], source: str) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            path = join(prefix, key_node.value)
            line = key_node.start_mark.line + 1
            if path in lines:
                duplicates.append(
                    f"{source}:{line}: duplicate key {path!r} (first on line {lines[path]}); the last one is used"
                )
            lines[path] = line
            _walk(value_node, path, lines, duplicates, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = join(prefix, i)
            lines[path] = item.start_mark.line + 1
            _walk(item, path, lines, duplicates, source)
