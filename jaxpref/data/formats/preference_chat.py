"""Pair formats rendered with the tokenizer's chat template (axolotl ``chat_template.*`` for DPO/ORPO).

* ``chat_template.default``: ``field_messages`` (the prompt conversation, or a string = one user turn),
  ``field_chosen`` / ``field_rejected`` (a string, a message, or a conversation whose last message is
  the response); axolotl ``dpo/chat_template.py:default``.
* ``chat_template.argilla_chat``: chosen/rejected are whole conversations; the prompt is the chosen
  conversation without its last message; axolotl ``dpo/chat_template.py:argilla_chat``.
* ``chat_template.argilla``: chosen/rejected are [user, assistant, ...] conversations, the optional
  ``system`` and ``prompt`` columns override; axolotl ``orpo/chat_template.py:argilla`` (ORPO's type,
  also usable for DPO).

The prompt is the conversation rendered with the generation prompt. A response is the text the template
adds for the assistant turn (render with the turn, strip the common prefix with the rendering without
it, strip trailing whitespace), as axolotl's ``preference_chat_template.extract_response`` does.
Dataset keys read: ``field_messages``, ``field_chosen``, ``field_rejected``, ``field_tools``,
``message_property_mappings``, ``roles``, ``chat_template`` (a per-dataset override).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from jaxpref.data._cfg import opt
from jaxpref.data.chat_templates import resolve_chat_template
from jaxpref.data.formats import BadRow, register_format
from jaxpref.data.formats.preference import PAIR, PairFormat, PairText, check_responses, system_prompt
from jaxpref.data.formats.sft import DEFAULT_ROLES, PASSTHROUGH_KEYS
from jaxpref.data.settings import DataSettings
from jaxpref.errors import ConfigError

DUMMY_USER = {"role": "user", "content": "[[dummy_message]]"}  # axolotl's placeholder turn
MESSAGE_KEYS = (*PASSTHROUGH_KEYS, "reasoning")


def extract_response(full: str, prefix: str, content: str) -> str:
    """The part of ``full`` after its common prefix with ``prefix``, right-stripped (axolotl's rule).

    If the dummy user turn is still in it (the renderings diverged early), fall back to the text from
    the first occurrence of ``content``.
    """
    response = full[len(os.path.commonprefix([prefix, full])) :]
    if DUMMY_USER["content"] not in response:
        return response.rstrip()
    start = full.find(content) if content else -1
    return full[start:].rstrip() if start >= 0 else full.rstrip()


class _ChatPair(PairFormat):
    """Shared: the template, message mapping (``message_property_mappings``, ``roles``) and rendering."""

    def __init__(self, ds_cfg: Any, settings: DataSettings, tokenizer: PreTrainedTokenizerBase):
        super().__init__(tokenizer)
        override = opt(ds_cfg, "chat_template")
        self.template = resolve_chat_template(override, settings, tokenizer) if override else tokenizer.chat_template
        if self.template is None:
            raise ConfigError(
                f"type: {opt(ds_cfg, 'type')} needs a chat template, and the tokenizer has none; set "
                "`chat_template: chatml` (or llama3, qwen3, or jinja with chat_template_jinja)"
            )
        self.tokenizer = tokenizer
        self.field_messages = opt(ds_cfg, "field_messages", "messages")
        self.field_chosen = opt(ds_cfg, "field_chosen", "chosen")
        self.field_rejected = opt(ds_cfg, "field_rejected", "rejected")
        self.field_tools = opt(ds_cfg, "field_tools", "tools")
        self.mappings = {"role": "role", "content": "content", **dict(opt(ds_cfg, "message_property_mappings", {}))}
        roles = opt(ds_cfg, "roles")
        self.role_map = {s: t for t, sources in roles.items() for s in sources} if roles else DEFAULT_ROLES

    def message(self, raw: Any, where: str, *, role: str | None = None) -> dict[str, Any]:
        """A dataset message -> a template message (role mapped, template-used keys kept)."""
        if not isinstance(raw, Mapping):
            raise BadRow("malformed_row", f"{where} is a {type(raw).__name__}, not a message")
        msg = {t: raw[s] for t, s in self.mappings.items() if raw.get(s) is not None}
        msg.update({k: raw[k] for k in MESSAGE_KEYS if raw.get(k) is not None and k not in msg})
        if role is not None:
            msg["role"] = role
        if "role" not in msg:
            raise BadRow("missing_field", f"{where} has no {self.mappings['role']!r}")
        msg["role"] = self.role_map.get(msg["role"], msg["role"])
        if not isinstance(msg.get("content", ""), str):
            raise BadRow("malformed_row", f"{where} content is a {type(msg['content']).__name__}, not a string")
        return msg

    def conversation(self, row: Mapping[str, Any], field: str) -> list[Any]:
        value = row.get(field)
        if value is None:
            raise BadRow("missing_field", f"no {field!r} field")
        if not isinstance(value, list) or not value:
            raise BadRow("malformed_row", f"{field!r} is not a non-empty list of messages")
        return value

    def render(self, messages: list[dict[str, Any]], row: Mapping[str, Any], *, generation: bool) -> str:
        kwargs: dict[str, Any] = {}
        tools = row.get(self.field_tools)
        if tools:
            kwargs["tools"] = json.loads(tools) if isinstance(tools, str) else tools
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation, **kwargs
            )
        except (TemplateError, json.JSONDecodeError) as e:
            raise BadRow("template_error", str(e)) from None

    def pair(self, prompt: list[dict[str, Any]], chosen: dict[str, Any], rejected: dict[str, Any], row) -> PairText:
        """Render the prompt conversation and extract both responses (axolotl ``render_preference_sample``)."""
        check_responses(chosen.get("content", ""), rejected.get("content", ""))
        dummy_prompt = self.render([DUMMY_USER], row, generation=True)
        responses = [
            extract_response(self.render([DUMMY_USER, r], row, generation=False), dummy_prompt, r.get("content", ""))
            for r in (chosen, rejected)
        ]
        return PairText(self.render(prompt, row, generation=True), *responses)


@register_format("chat_template.default", kind=PAIR, needs_chat_template=True)
class ChatTemplateDefault(_ChatPair):
    def response(self, row: Mapping[str, Any], field: str) -> dict[str, Any]:
        value = row.get(field)
        if value is None:
            raise BadRow("missing_field", f"no {field!r} field")
        if isinstance(value, str):
            return self.message({self.mappings["content"]: value}, field, role="assistant")
        if isinstance(value, list):
            if not value:
                raise BadRow("malformed_row", f"{field!r} is an empty list")
            value = value[-1]
        return self.message(value, field)

    def text(self, row: dict[str, Any]) -> PairText:
        raw = row.get(self.field_messages)
        if isinstance(raw, str):
            prompt = [self.message({self.mappings["content"]: raw}, self.field_messages, role="user")]
        else:
            conv = self.conversation(row, self.field_messages)
            prompt = [self.message(m, f"{self.field_messages}[{i}]") for i, m in enumerate(conv)]
        chosen, rejected = self.response(row, self.field_chosen), self.response(row, self.field_rejected)
        return self.pair(prompt, chosen, rejected, row)


@register_format("chat_template.argilla_chat", kind=PAIR, needs_chat_template=True)
class ChatTemplateArgillaChat(_ChatPair):
    def text(self, row: dict[str, Any]) -> PairText:
        chosen, rejected = self.conversation(row, self.field_chosen), self.conversation(row, self.field_rejected)
        prompt = [self.message(m, f"{self.field_chosen}[{i}]") for i, m in enumerate(chosen[:-1])]
        last_chosen = self.message(chosen[-1], f"{self.field_chosen}[-1]")
        return self.pair(prompt, last_chosen, self.message(rejected[-1], f"{self.field_rejected}[-1]"), row)


@register_format("chat_template.argilla", kind=PAIR, needs_chat_template=True)
class ChatTemplateArgilla(_ChatPair):
    """ORPO's argilla format: [system] + user/assistant turns of ``chosen`` without its last answer.

    The last user turn is the ``prompt`` column when present. (axolotl puts ``prompt`` in *every* user
    turn of a multi-turn row, which repeats the last question; single-turn rows, the usual case,
    render identically.) Responses are the text after the rendered prompt, right-stripped (axolotl
    keeps chatml's trailing newline after ``<|im_end|>``, after which TRL appends a second EOS).
    """

    def turns(self, row: Mapping[str, Any], field: str) -> list[dict[str, Any]]:
        conv = self.conversation(row, field)
        if len(conv) % 2:
            raise BadRow("malformed_row", f"{field!r} has {len(conv)} messages, not user/assistant pairs")
        roles = ("user", "assistant") * (len(conv) // 2)
        return [self.message(m, f"{field}[{i}]", role=r) for i, (m, r) in enumerate(zip(conv, roles))]

    def text(self, row: dict[str, Any]) -> PairText:
        chosen, rejected = self.turns(row, self.field_chosen), self.turns(row, self.field_rejected)
        system = system_prompt(row)
        prompt = ([{"role": "system", "content": system}] if system else []) + chosen[:-1]
        if isinstance(row.get("prompt"), str):
            prompt[-1] = {**prompt[-1], "content": row["prompt"]}
        check_responses(chosen[-1].get("content", ""), rejected[-1].get("content", ""))
        prompt_text = self.render(prompt, row, generation=True)
        responses = [
            extract_response(self.render([*prompt, r[-1]], row, generation=False), prompt_text, "")
            for r in (chosen, rejected)
        ]
        return PairText(prompt_text, *responses)
