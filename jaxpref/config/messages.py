"""Turn pydantic validation errors into one line per problem: the key path, what is allowed, the
value given, and a "did you mean" for unknown keys; then into one ConfigError message."""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Collection, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from jaxpref.config import axolotl
from jaxpref.config.yaml_source import join

# (key path or "" for a whole-config problem, message)
Problem = tuple[str, str]

_EXPECTED = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected a whole number",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "finite_number": "expected a finite number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "tuple_type": "expected a list",
    "dict_type": "expected a mapping (key: value)",
    "model_type": "expected a mapping (key: value)",
    "model_attributes_type": "expected a mapping (key: value)",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def problems_from_validation(exc: ValidationError, root: type[BaseModel]) -> list[Problem]:
    """One problem per pydantic error, with clean key paths (union tags dropped)."""
    out: list[Problem] = []
    for err in exc.errors(include_url=False):
        path, parent = _clean_path(err["loc"], root, err["type"] == "extra_forbidden")
        if err["type"] == "extra_forbidden":
            out.append((path, _unknown_key(path, parent, root)))
            continue
        for message in _describe(err).split("\n"):
            out.append((path, message))
    return out


def format_problems(problems: list[Problem], source: str, lines: Mapping[str, int | str]) -> str:
    """``source:LINE: path: message`` for one problem; a list for several (sorted by line)."""
    rendered = []
    for path, message in _dedupe(problems):
        where = lines.get(path) if path else lines.get(_leading_key(message), None)
        text = f"{path}: {message}" if path and not message.startswith("unknown key") else message
        rendered.append((where, text))
    rendered.sort(key=lambda item: (not isinstance(item[0], int), item[0] if isinstance(item[0], int) else 0))
    if len(rendered) == 1:
        where, text = rendered[0]
        return f"{source}:{where}: {text}" if isinstance(where, int) else _with_origin(f"{source}: {text}", where)
    items = "\n".join(
        _with_origin(f"  line {where}: {text}" if isinstance(where, int) else f"  {text}", where)
        for where, text in rendered
    )
    return f"{source}: {len(rendered)} problems:\n{items}"


def _with_origin(text: str, where: int | str | None) -> str:
    return f"{text} ({where})" if isinstance(where, str) else text


def _dedupe(problems: list[Problem]) -> list[Problem]:
    return list(dict.fromkeys(problems))


def _leading_key(message: str) -> str:
    match = re.match(r"^([\w.\[\]]+):", message)
    return match.group(1) if match else ""


def _clean_path(loc: tuple[Any, ...], root: type[BaseModel], unknown: bool) -> tuple[str, type[BaseModel] | None]:
    """The key path of an error location, and the model that owns its last key."""
    path, model, parent = "", root, root
    for i, item in enumerate(loc):
        if isinstance(item, int):
            path = join(path, item)
        elif model is not None and item in model.model_fields:
            parent = model
            path = join(path, item)
            model = _model_in(model.model_fields[item].annotation)
        elif unknown and i == len(loc) - 1:
            parent = model
            path = join(path, item)
    return path, parent


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``X | None``, ``list[X]``, ... (None if there is none)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _unknown_key(path: str, parent: type[BaseModel] | None, root: type[BaseModel]) -> str:
    key = re.split(r"[.\]]", path)[-1] or path
    candidates: Collection[str] = list(parent.model_fields) if parent is not None else []
    if parent is root:
        candidates = [*candidates, *axolotl.MAPPED_KEYS]
    elif parent is not None and "path" in parent.model_fields:  # a dataset entry
        candidates = [*candidates, *axolotl.MAPPED_DATASET_KEYS]
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f"did you mean {match[0]!r}?" if match else "not a jaxpref or axolotl key; see docs/config.md"
    return f"unknown key {path!r} ({hint})"


def _describe(err: Mapping[str, Any]) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    got = f", got {_short(err.get('input'))}"
    if kind == "missing":
        return "required, no default"
    if kind in _EXPECTED:
        return _EXPECTED[kind] + got
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return (
            f"must be {_BOUNDS[kind]} {bound:g}{got}"
            if isinstance(bound, float)
            else f"must be {_BOUNDS[kind]} {bound}{got}"
        )
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}{got}"
    if kind == "too_short":
        return "must not be empty"
    message = str(err.get("msg", kind))
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
