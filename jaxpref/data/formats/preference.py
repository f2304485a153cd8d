"""Preference row formats: chosen/rejected pairs (kind ``"preference"``) and KTO rows (kind ``"kto"``).

Every format has two steps:

* ``text(row)`` renders the row to strings exactly as axolotl's prompt strategy of the same ``type``
  does (``src/axolotl/prompt_strategies/{dpo,kto}/...``): :class:`PairText` (prompt, chosen, rejected)
  or :class:`UnpairedText` (prompt, completion, desirable);
* ``__call__(row)`` tokenizes those strings as TRL 1.16's ``DPOTrainer`` / ``KTOTrainer`` do
  (:class:`TrlTokenizer`) and returns token-aligned int32 arrays: ``prompt_ids`` [P], ``chosen_ids``
  [C], ``rejected_ids`` [R] for pairs; ``prompt_ids`` [P], ``completion_ids`` [C] and ``desirable``
  (bool, shape []) for KTO. Each completion ends with exactly one EOS; BOS appears once, at the start
  of the prompt, if the tokenizer uses one.

The ``chatml.*`` / ``llama3.*`` formats are one class driven by two tables (:data:`FAMILIES`: the
template strings; :data:`PAIR_VARIANTS` / :data:`KTO_VARIANTS`: where each field is read from).
``user_defined.default`` takes field names and format strings from the entry's ``type:`` mapping.
The ``chat_template.*`` formats live in ``preference_chat.py``.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from jaxpref.data._cfg import opt
from jaxpref.data.formats import USER_DEFINED, BadRow, Example, register_format
from jaxpref.data.formats.sft import _TextEncoder
from jaxpref.data.settings import DataSettings
from jaxpref.errors import ConfigError

PAIR = "preference"
KTO = "kto"

# A field location: keys / list indices from the row, e.g. ("chosen", 1, "content").
Path = tuple[str | int, ...]


@dataclass(frozen=True)
class PairText:
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class UnpairedText:
    prompt: str
    completion: str
    desirable: bool


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class TrlTokenizer:
    """Prompt/completion strings -> ids, as TRL 1.16 ``DPOTrainer._prepare_dataset`` tokenizes them.

    TRL appends the tokenizer's EOS to each completion string unless it already ends with it, then
    tokenizes the prompt and each prompt+completion string whole, and splits at the longest common
    prefix of the prompt ids and every prompt+completion (so a token merging across the boundary
    belongs to the completion). The one difference: a BOS already in the text is not doubled, and
    special tokens that the tokenizer's post-processor appends (none for Llama/Qwen/Mistral) are left
    out, because the completion carries its own EOS.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.encoder = _TextEncoder(tokenizer)
        self.eos = tokenizer.eos_token

    def with_eos(self, text: str) -> str:
        return text if text.endswith(self.eos) else text + self.eos

    def encode(self, prompt: str, *completions: str) -> tuple[list[int], list[list[int]]]:
        """(prompt ids [P], [completion ids [C_i] per completion]); each completion ends in EOS."""
        prompt_ids = self.encoder.encode(prompt, prefix=True)
        full = [self.encoder.encode(prompt + self.with_eos(c), prefix=True) for c in completions]
        n = min(common_prefix_length(prompt_ids, f) for f in full)
        return prompt_ids[:n], [f[n:] for f in full]


def _ids(ids: list[int]) -> np.ndarray:
    return np.asarray(ids, dtype=np.int32)


class PairFormat:
    """Base of the pair formats: subclasses implement ``text(row) -> PairText``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.trl = TrlTokenizer(tokenizer)

    def text(self, row: dict[str, Any]) -> PairText:
        raise NotImplementedError

    def __call__(self, row: dict[str, Any]) -> Example:
        t = self.text(row)
        prompt, (chosen, rejected) = self.trl.encode(t.prompt, t.chosen, t.rejected)
        return {"prompt_ids": _ids(prompt), "chosen_ids": _ids(chosen), "rejected_ids": _ids(rejected)}


class UnpairedFormat:
    """Base of the KTO formats: subclasses implement ``text(row) -> UnpairedText``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.trl = TrlTokenizer(tokenizer)

    def text(self, row: dict[str, Any]) -> UnpairedText:
        raise NotImplementedError

    def __call__(self, row: dict[str, Any]) -> Example:
        t = self.text(row)
        prompt, (completion,) = self.trl.encode(t.prompt, t.completion)
        return {"prompt_ids": _ids(prompt), "completion_ids": _ids(completion), "desirable": np.asarray(t.desirable)}


# --- reading fields -------------------------------------------------------------------------------


def pick(row: Mapping[str, Any], alternatives: tuple[Path, ...]) -> str:
    """The string at the first path whose top-level key the row has (axolotl's ``if key in sample``).

    :class:`BadRow` ``missing_field`` if no alternative is present (or its value is null),
    ``malformed_row`` if the path does not lead to a string.
    """
    path = next((p for p in alternatives if row.get(p[0]) is not None), None)
    if path is None:
        names = " or ".join(repr(_path_name(p)) for p in alternatives)
        raise BadRow("missing_field", f"no {names} field")
    value: Any = row
    for step in path:
        try:
            value = value[step]
        except (KeyError, IndexError, TypeError):
            raise BadRow("malformed_row", f"{_path_name(path)!r} does not exist in the row") from None
        if value is None:
            raise BadRow("missing_field", f"{_path_name(path)!r} is null")
    if not isinstance(value, str):
        raise BadRow("malformed_row", f"{_path_name(path)!r} is a {type(value).__name__}, not a string")
    return value


def _path_name(path: Path) -> str:
    return "".join(f"[{s}]" if isinstance(s, int) else (f".{s}" if i else s) for i, s in enumerate(path))


def system_prompt(row: Mapping[str, Any], field: str = "system") -> str:
    """The row's system prompt, "" when absent or empty (axolotl: ``if "system" in sample and sample["system"]``)."""
    value = row.get(field)
    if value in (None, ""):
        return ""
    if not isinstance(value, str):
        raise BadRow("malformed_row", f"{field!r} is a {type(value).__name__}, not a string")
    return value


def check_responses(*responses: str) -> None:
    """:class:`BadRow` for an empty (or whitespace) response, and for a pair whose responses are equal.

    Identical chosen/rejected rows are dropped (TRL keeps them): they carry no preference, their DPO
    and reward-model gradients are exactly zero, and they would only dilute the loss average.
    """
    for name, text in zip(("chosen", "rejected") if len(responses) == 2 else ("completion",), responses):
        if not text.strip():
            raise BadRow("empty_response", f"the {name} response is empty")
    if len(responses) == 2 and responses[0] == responses[1]:
        raise BadRow("identical_responses", "chosen and rejected are the same text")


def kto_label(row: Mapping[str, Any], field: str = "label") -> bool:
    """The KTO label: a boolean (True = desirable); anything else is a ``bad_label`` row."""
    value = row.get(field)
    if value is None:
        raise BadRow("missing_field", f"no {field!r} field")
    if not isinstance(value, bool | np.bool_):
        raise BadRow("bad_label", f"{field!r} is {value!r}, not true/false")
    return bool(value)


# --- chatml.* / llama3.* --------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """The literal template strings of axolotl's ``chatml`` / ``llama3`` prompt strategies."""

    system: str  # the system turn, with {system}
    user: str  # the user turn and the assistant header, with {prompt}
    end: str  # appended to every completion

    def prompt(self, prompt: str, system: str) -> str:
        return (self.system.format(system=system) if system else "") + self.user.format(prompt=prompt)


FAMILIES = {
    "chatml": Family(
        system="<|im_start|>system\n{system}<|im_end|>\n",
        user="<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
        end="<|im_end|>",
    ),
    "llama3": Family(
        system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        end="<|eot_id|>",
    ),
}


@dataclass(frozen=True)
class Variant:
    """Where a variant reads its fields: alternatives tried in order; ``system`` = use the row's system."""

    prompt: tuple[Path, ...]
    chosen: tuple[Path, ...] = (("chosen",),)  # KTO: the completion
    rejected: tuple[Path, ...] = (("rejected",),)  # unused by KTO
    system: bool = True


# axolotl dpo/chatml.py and dpo/llama3.py: default (also the bare family name, and `argilla`, its older
# name), argilla_chat, icr, intel, prompt_pairs, ultra.
_ANY_PROMPT = (("prompt",), ("input",), ("question",), ("instruction",))
_DEFAULT = Variant(_ANY_PROMPT, (("chosen",), ("chosen_response",)), (("rejected",), ("rejected_response",)))
PAIR_VARIANTS = {
    "default": _DEFAULT,
    "argilla": _DEFAULT,
    "argilla_chat": Variant(
        (("chosen", 0, "content"),), (("chosen", 1, "content"),), (("rejected", 1, "content"),), False
    ),
    "icr": Variant((("input",),)),
    "intel": Variant((("question",),)),
    "prompt_pairs": Variant((("prompt",),)),
    "ultra": Variant((("prompt",),), (("chosen", 1, "content"),), (("rejected", 1, "content"),)),
}
# axolotl kto/chatml.py and kto/llama3.py. argilla_chat reads the prompt from completion[0] (llama3's
# version; chatml's reads `chosen[0]`, which kto-mix-15k rows do not have).
KTO_VARIANTS = {
    "argilla": Variant((("instruction",),), (("completion",),)),
    "argilla_chat": Variant((("completion", 0, "content"),), (("completion", 1, "content"),), system=False),
    "intel": Variant((("question",),), (("completion",),)),
    "prompt_pairs": Variant((("prompt",),), (("completion",),)),
    "ultra": Variant((("prompt",),), (("completion",),)),
}


class TemplatePair(PairFormat):
    """``<family>.<variant>`` pair formats (``chatml.intel``, ``llama3.ultra``, ...)."""

    def __init__(
        self,
        ds_cfg: Any,
        settings: DataSettings,
        tokenizer: PreTrainedTokenizerBase,
        *,
        family: Family,
        variant: Variant,
    ):
        super().__init__(tokenizer)
        self.family, self.variant = family, variant

    def text(self, row: dict[str, Any]) -> PairText:
        v, f = self.variant, self.family
        chosen, rejected = pick(row, v.chosen), pick(row, v.rejected)
        check_responses(chosen, rejected)
        prompt = f.prompt(pick(row, v.prompt), system_prompt(row) if v.system else "")
        return PairText(prompt, chosen + f.end, rejected + f.end)


class TemplateUnpaired(UnpairedFormat):
    """``<family>.<variant>`` KTO formats (``llama3.ultra``, ``chatml.intel``, ...); label from ``label``."""

    def __init__(
        self,
        ds_cfg: Any,
        settings: DataSettings,
        tokenizer: PreTrainedTokenizerBase,
        *,
        family: Family,
        variant: Variant,
    ):
        super().__init__(tokenizer)
        self.family, self.variant = family, variant

    def text(self, row: dict[str, Any]) -> UnpairedText:
        v, f = self.variant, self.family
        completion = pick(row, v.chosen)
        check_responses(completion)
        desirable = kto_label(row)
        prompt = f.prompt(pick(row, v.prompt), system_prompt(row) if v.system else "")
        return UnpairedText(prompt, completion + f.end, desirable)


for _family_name, _family in FAMILIES.items():
    for _name, _variant in PAIR_VARIANTS.items():
        _names = [f"{_family_name}.{_name}", *([_family_name] if _name == "default" else [])]
        register_format(*_names, kind=PAIR)(functools.partial(TemplatePair, family=_family, variant=_variant))
    for _name, _variant in KTO_VARIANTS.items():
        _build = functools.partial(TemplateUnpaired, family=_family, variant=_variant)
        register_format(f"{_family_name}.{_name}", kind=KTO)(_build)


# --- user_defined.default -------------------------------------------------------------------------


def _placeholders(fmt: str) -> set[str]:
    names = set()
    for _, name, _, _ in string.Formatter().parse(fmt):
        if name is not None:
            names.add(name.split(".")[0].split("[")[0])
    return names


class _UserDefined:
    """Field names and format strings from the entry's ``type:`` mapping (axolotl ``user_defined.default``).

    Keys: ``field_<part>`` (the row column of each part, default the part's name) and ``<part>_format``
    (default ``"{<part>}"``). A format string may name each part by its role (``{prompt}``, ``{system}``,
    ``{chosen}``, ...) or by its column name (``{question}``). A missing or empty system prompt is
    formatted as "" (axolotl raises KeyError when ``{system}`` is in the format and the row has none).
    """

    parts: tuple[str, ...]  # row parts; the first ones are formatted into the texts
    formatted: tuple[str, ...]
    optional = ("system",)

    def __init__(self, ds_cfg: Any):
        spec = opt(ds_cfg, "type")
        spec = spec if isinstance(spec, Mapping) else {}
        self.fields = {p: spec.get(f"field_{p}") or p for p in self.parts}
        self.formats = {p: spec.get(f"{p}_format") or f"{{{p}}}" for p in self.formatted}
        allowed = set(self.parts) | set(self.fields.values()) | self._aliases()
        for part, fmt in self.formats.items():
            if unknown := _placeholders(fmt) - allowed:
                raise ConfigError(
                    f"{USER_DEFINED}: {part}_format {fmt!r} names {', '.join(sorted(unknown))}; "
                    f"the format strings may use {', '.join('{' + a + '}' for a in sorted(allowed))}"
                )

    def _aliases(self) -> set[str]:
        return set()

    def values(self, row: Mapping[str, Any]) -> dict[str, str]:
        values = {}
        for part, field in self.fields.items():
            if part in self.optional:
                values[part] = system_prompt(row, field)
            elif part != "label":
                values[part] = pick(row, ((field,),))
        # Column names first, so that a role name always means its role.
        return {**{self.fields[p]: v for p, v in values.items()}, **values}


@register_format(USER_DEFINED, kind=PAIR)
class UserDefinedPair(_UserDefined, PairFormat):
    parts = ("prompt", "chosen", "rejected", "system")
    formatted = ("prompt", "chosen", "rejected")

    def __init__(self, ds_cfg: Any, settings: DataSettings, tokenizer: PreTrainedTokenizerBase):
        _UserDefined.__init__(self, ds_cfg)
        PairFormat.__init__(self, tokenizer)

    def text(self, row: dict[str, Any]) -> PairText:
        values = self.values(row)
        check_responses(values["chosen"], values["rejected"])
        return PairText(*(self.formats[p].format_map(values) for p in self.formatted))


@register_format(USER_DEFINED, kind=KTO)
class UserDefinedUnpaired(_UserDefined, UnpairedFormat):
    """KTO: parts prompt, system, completion, label; ``completion_format`` may also say ``{chosen}``
    (the placeholder axolotl's KTO code fills)."""

    parts = ("prompt", "completion", "label", "system")
    formatted = ("prompt", "completion")

    def __init__(self, ds_cfg: Any, settings: DataSettings, tokenizer: PreTrainedTokenizerBase):
        _UserDefined.__init__(self, ds_cfg)
        UnpairedFormat.__init__(self, tokenizer)

    def _aliases(self) -> set[str]:
        return {"chosen"}

    def text(self, row: dict[str, Any]) -> UnpairedText:
        values = self.values(row)
        check_responses(values["completion"])
        desirable = kto_label(row, self.fields["label"])
        values["chosen"] = values["completion"]
        return UnpairedText(
            self.formats["prompt"].format_map(values), self.formats["completion"].format_map(values), desirable
        )
