"""Prompt rows for online RL (``rl: grpo``), in TRL's dataset shape or through an axolotl transform.

A row has a ``prompt``: a conversation (a list of ``{"role", "content"}`` messages, rendered with the chat
template and its generation prompt, as TRL does for conversational prompts) or a string (tokenized as it
is, without special tokens, as TRL does for standard prompts). Every other column travels with the prompt
to the reward functions (TRL passes them as keyword arguments). axolotl's GRPO datasets name a transform
as the ``type``: ``module.function`` (importable from the working directory) called as
``function(cfg)`` (jaxpref passes the run's ``DataSettings``), returning a row map (or ``(row map,
kwargs)``, the kwargs being ignored) that turns a raw row into such a row.

The example: ``prompt_ids`` int32 [P] and ``row`` (the row as JSON text, a 0-d string array).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from jaxpref.data.formats import BadRow, Example, FormatSpec, get_format, register_format
from jaxpref.data.settings import DataSettings
from jaxpref.errors import ConfigError
from jaxpref.user_code import import_attribute

PROMPTS = "prompts"


def is_conversation(prompt: Any) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, Mapping) and "role" in m for m in prompt)


class PromptFormat:
    """raw row -> ``prompt_ids`` and ``row`` (see the module docstring); ``transform`` maps the row first."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, transform: Callable[[dict], dict] | None = None):
        self.tokenizer, self.transform = tokenizer, transform

    def __call__(self, row: dict[str, Any]) -> Example:
        if self.transform is not None:
            row = {**row, **self.transform(dict(row))}
        prompt = row.get("prompt")
        if prompt is None:
            raise BadRow("missing_field", "no 'prompt' field")
        if is_conversation(prompt):
            if self.tokenizer.chat_template is None:
                raise BadRow("template_error", "a conversational prompt needs a chat template (set chat_template)")
            try:
                text = self.tokenizer.apply_chat_template(
                    [dict(m) for m in prompt], tokenize=False, add_generation_prompt=True
                )
            except TemplateError as e:
                raise BadRow("template_error", str(e)) from None
        elif isinstance(prompt, str) and prompt:
            text = prompt
        else:
            raise BadRow("malformed_row", "'prompt' is neither a non-empty string nor a list of messages")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise BadRow("empty_prompt", "the prompt has no tokens")
        try:
            as_json = json.dumps(row, ensure_ascii=False)
        except TypeError as e:
            raise BadRow("malformed_row", f"the row is not JSON data: {e}") from None
        return {"prompt_ids": np.asarray(ids, np.int32), "row": np.asarray(as_json)}


@register_format("prompt", kind=PROMPTS)
def build_prompt(ds_cfg: Any, settings: DataSettings, tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
    return PromptFormat(tokenizer)


def prompt_format(type_: Any, where: str) -> FormatSpec:
    """The format of a prompt dataset entry: no ``type`` or ``prompt`` (TRL's shape), else an axolotl
    transform ``module.function`` (or ``module:function``)."""
    if type_ is None or type_ == "prompt":
        return get_format("prompt", kind=PROMPTS, where=where)
    name = str(type_)
    try:
        factory = import_attribute(name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(
            f"{where}.type: {name!r} is neither the prompt format (no type, or prompt) nor an importable "
            f"transform module.function ({type(e).__name__}: {e}); put the module in the working directory"
        ) from None

    def build(ds_cfg: Any, settings: DataSettings, tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
        made = factory(settings)  # axolotl passes its config; the transforms read at most a few settings
        transform = made[0] if isinstance(made, tuple) else made
        if not callable(transform):
            raise ConfigError(f"{where}.type: {name}(cfg) returned {type(transform).__name__}, not a row function")
        return PromptFormat(tokenizer, transform)

    return FormatSpec(name, PROMPTS, False, build)
