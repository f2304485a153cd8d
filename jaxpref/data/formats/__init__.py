"""Registry of row formats, keyed by the dataset entry's ``type`` (axolotl spelling).

A format turns one raw dataset row (a dict) into a tokenized example, or raises :class:`BadRow`
with a reason; the pipeline counts and drops bad rows one at a time. Formats of kind ``"lm"``
(SFT now, KD later) return *token-aligned* arrays, shape [L] (plus trailing dims for KD targets):

* ``input_ids``: int32 token ids, BOS (if any) and EOS included exactly once;
* ``trainable``: bool, token i is a token the model should learn to produce.

The pipeline shifts these into prediction-aligned ``labels`` / ``loss_mask`` (see ``pipeline.py``).
Preference kinds (``"preference"``, ``"kto"``) register here too (issue 6) and are built by their own
pipelines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxpref.errors import DataError

Example = dict[str, np.ndarray]
RowFormatter = Callable[[dict[str, Any]], Example]


class BadRow(Exception):
    """A row that cannot be used; ``reason`` is a short snake_case key counted in the report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class FormatSpec:
    name: str
    kind: str  # "lm" | "preference" | "kto"
    needs_chat_template: bool
    build: Callable[..., RowFormatter]  # build(ds_cfg, cfg, tokenizer) -> RowFormatter


_REGISTRY: dict[str, FormatSpec] = {}


def register_format(*names: str, kind: str = "lm", needs_chat_template: bool = False):
    """Class/function decorator: register ``build(ds_cfg, cfg, tokenizer) -> formatter`` under ``names``."""

    def deco(build):
        for name in names:
            if name in _REGISTRY:
                raise ValueError(f"dataset type {name!r} is registered twice")
            _REGISTRY[name] = FormatSpec(name, kind, needs_chat_template, build)
        return build

    return deco


def known_types(kind: str | None = None) -> list[str]:
    return sorted(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind)


def get_format(type_name: str | None, *, kind: str | None = None, where: str = "datasets") -> FormatSpec:
    """The registered format for a dataset ``type``; :class:`DataError` listing the known types otherwise."""
    spec = _REGISTRY.get(type_name) if type_name is not None else None
    if spec is None or (kind is not None and spec.kind != kind):
        what = "no `type`" if type_name is None else f"unknown type {type_name!r}"
        known = known_types(kind)
        raise DataError(f"{where}: {what}; known types{f' for {kind}' if kind else ''}: {', '.join(known)}")
    return spec


def needs_chat_template(type_name: str | None) -> bool:
    spec = _REGISTRY.get(type_name) if type_name is not None else None
    return bool(spec and spec.needs_chat_template)


from jaxpref.data.formats import sft  # noqa: E402,F401  (registers the SFT formats)
