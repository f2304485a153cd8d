"""Registry of row formats, keyed by the dataset entry's ``type`` (axolotl spelling).

A format turns one raw dataset row (a dict) into a tokenized example, or raises :class:`BadRow`
with a reason; the pipeline counts and drops bad rows one at a time. Formats of kind ``"lm"``
(SFT now, KD later) return *token-aligned* arrays, shape [L] (plus trailing dims for KD targets):

* ``input_ids``: int32 token ids, BOS (if any) and EOS included exactly once;
* ``trainable``: bool, token i is a token the model should learn to produce.

The pipeline shifts these into prediction-aligned ``labels`` / ``loss_mask`` (see ``pipeline.py``).
Preference kinds register here too and are built by ``jaxpref/data/preference.py``:
``"preference"`` (chosen/rejected pairs: DPO, IPO, SimPO, ORPO, reward models) returns ``prompt_ids``,
``chosen_ids``, ``rejected_ids``; ``"kto"`` returns ``prompt_ids``, ``completion_ids``, ``desirable``
(see ``formats/preference.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
    build: Callable[..., RowFormatter]  # build(ds_cfg, settings, tokenizer) -> RowFormatter


# Keyed by (kind, name): one name may be a format of several kinds (``chatml.intel`` is a DPO pair
# format and a KTO format).
_REGISTRY: dict[tuple[str, str], FormatSpec] = {}

# A ``type:`` given as a mapping (field names and format strings) is axolotl's ``user_defined.default``.
USER_DEFINED = "user_defined.default"


def type_name(type_: Any) -> str | None:
    """The registry name of a dataset entry's ``type`` (a mapping means :data:`USER_DEFINED`)."""
    return USER_DEFINED if isinstance(type_, Mapping) else type_


def register_format(*names: str, kind: str = "lm", needs_chat_template: bool = False):
    """Class/function decorator: register ``build(ds_cfg, settings, tokenizer) -> formatter`` under ``names``."""

    def deco(build):
        for name in names:
            if (kind, name) in _REGISTRY:
                raise ValueError(f"dataset type {name!r} ({kind}) is registered twice")
            _REGISTRY[kind, name] = FormatSpec(name, kind, needs_chat_template, build)
        return build

    return deco


def known_types(kind: str | None = None) -> list[str]:
    return sorted({n for (k, n) in _REGISTRY if kind is None or k == kind})


def get_format(type_: Any, *, kind: str | None = None, where: str = "datasets") -> FormatSpec:
    """The registered format for a dataset ``type``; :class:`DataError` listing the known types otherwise.

    Without ``kind`` the name must be unambiguous (the first registered kind wins otherwise).
    """
    name = type_name(type_)
    specs = [s for (k, n), s in _REGISTRY.items() if n == name and (kind is None or k == kind)]
    if not specs:
        what = "no `type`" if name is None else f"unknown type {name!r}"
        known = known_types(kind)
        other = sorted({k for (k, n) in _REGISTRY if n == name})
        hint = f" ({name!r} is a type for {' and '.join(other)} datasets)" if other else ""
        raise DataError(f"{where}: {what}{hint}; known types{f' for {kind}' if kind else ''}: {', '.join(known)}")
    return specs[0]


def needs_chat_template(type_: Any) -> bool:
    name = type_name(type_)
    return any(s.needs_chat_template for (_, n), s in _REGISTRY.items() if n == name)


# Importing the format modules registers their formats: SFT, preference pairs and KTO.
from jaxpref.data.formats import preference, preference_chat, sft  # noqa: E402,F401
