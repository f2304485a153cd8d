"""SFT row formats: ``chat_template``, ``completion``, ``alpaca`` (axolotl semantics).

Trainable tokens of ``chat_template`` are found without assumptions about the template: the whole
conversation is rendered once and tokenized with character offsets; for each turn the conversation is
rendered again with that turn's content replaced by a one-character sentinel, and the common prefix
and suffix of the two strings delimit exactly the characters that the content produced (after any
``trim`` or reasoning split the template applies). Tokens overlapping that span are the turn's
content tokens. Rendering whole conversations (not prefixes) keeps templates whose rendering of a
turn depends on later turns (Qwen3's think blocks) exact.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from jaxpref.data._cfg import opt
from jaxpref.data.chat_templates import end_of_turn_ids, resolve_chat_template
from jaxpref.data.formats import BadRow, Example, register_format
from jaxpref.data.settings import DataSettings
from jaxpref.errors import ConfigError

TRAIN_ON_EOS = ("turn", "last", "all", "none")

# axolotl's default role aliases (ShareGPT "human"/"gpt").
DEFAULT_ROLES = {
    "human": "user",
    "user": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
    "tool": "tool",
}

# Message keys other than role/content that the shipped templates read; passed through when present.
PASSTHROUGH_KEYS = ("reasoning_content", "tool_calls", "name", "tool_call_id")

# Private-use characters: a template never emits them and real content almost never contains them.
_SENTINELS = ("\ue000", "\ue001", "\ue002", "\ue003")


def _example(ids: list[int], trainable: list[bool] | np.ndarray) -> Example:
    return {"input_ids": np.asarray(ids, dtype=np.int32), "trainable": np.asarray(trainable, dtype=bool)}


class _TextEncoder:
    """Plain-text encoding with the tokenizer's own BOS convention, BOS and EOS exactly once."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        # The special tokens the tokenizer's post-processor prepends (e.g. Llama's BOS); what it
        # appends is left out because the formats place EOS themselves.
        special = set(tokenizer.all_special_ids)
        self.prefix: list[int] = []
        for token in tokenizer("x", add_special_tokens=True)["input_ids"]:
            if token not in special:
                break
            self.prefix.append(token)
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ConfigError("The tokenizer has no eos token; set `special_tokens: {eos_token: ...}`")

    def encode(self, text: str, *, prefix: bool) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if prefix and self.prefix and ids[: len(self.prefix)] != self.prefix:  # no doubled BOS
            ids = self.prefix + ids
        return ids

    def with_eos(self, ids: list[int]) -> list[int]:
        return ids if ids and ids[-1] == self.eos_id else [*ids, self.eos_id]


def _text_field(row: dict[str, Any], field: str, *, required: bool = True) -> str:
    value = row.get(field)
    if value is None:
        if required:
            raise BadRow("missing_field", f"no {field!r} field")
        return ""
    if not isinstance(value, str):
        raise BadRow("malformed_row", f"{field!r} is a {type(value).__name__}, not a string")
    return value


@register_format("completion")
class CompletionFormat:
    """Raw text from ``field`` (default ``text``); every token is trainable; BOS per tokenizer, EOS once."""

    def __init__(self, ds_cfg: Any, settings: DataSettings, tokenizer: PreTrainedTokenizerBase):
        self.field = opt(ds_cfg, "field", "text")
        self.encoder = _TextEncoder(tokenizer)

    def __call__(self, row: dict[str, Any]) -> Example:
        text = _text_field(row, self.field)
        if not text.strip():
            raise BadRow("empty_response", f"{self.field!r} is empty")
        ids = self.encoder.with_eos(self.encoder.encode(text, prefix=True))
        return _example(ids, np.ones(len(ids), dtype=bool))


ALPACA_SYSTEM = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
ALPACA_SYSTEM_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
ALPACA_TURN = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_TURN_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


@register_format("alpaca")
class AlpacaFormat:
    """``instruction``/``input``/``output`` with the Stanford Alpaca prompt; only the output (+EOS) trains.

    Prompt and response are tokenized separately (as axolotl does), so no token straddles them.
    ``train_on_inputs: true`` makes the prompt trainable too.
    """

    def __init__(self, ds_cfg: Any, settings: DataSettings, tokenizer: PreTrainedTokenizerBase):
        self.encoder = _TextEncoder(tokenizer)
        self.train_on_inputs = bool(settings.train_on_inputs)

    def __call__(self, row: dict[str, Any]) -> Example:
        instruction = _text_field(row, "instruction")
        extra = _text_field(row, "input", required=False)
        output = _text_field(row, "output")
        if not output.strip():
            raise BadRow("empty_response", "'output' is empty")
        if extra:
            prompt = ALPACA_SYSTEM + ALPACA_TURN.format(instruction=instruction, input=extra)
        else:
            prompt = ALPACA_SYSTEM_NO_INPUT + ALPACA_TURN_NO_INPUT.format(instruction=instruction)
        prompt_ids = self.encoder.encode(prompt, prefix=True)
        response_ids = self.encoder.with_eos(self.encoder.encode(output, prefix=False))
        trainable = [self.train_on_inputs] * len(prompt_ids) + [True] * len(response_ids)
        return _example(prompt_ids + response_ids, trainable)


def _common_prefix_len(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


@register_format("chat_template", needs_chat_template=True)
class ChatTemplateFormat:
    """Conversations rendered with the tokenizer's chat template (axolotl ``type: chat_template``).

    Dataset keys: ``field_messages`` (default ``messages``), ``message_property_mappings``
    (``{role: <field>, content: <field>}``), ``roles`` (aliases, ``{user: [human], ...}``),
    ``roles_to_train`` (default ``[assistant]``), ``train_on_eos`` (``turn`` default: the eos token
    after each trained turn; ``last``: only after the last trained turn; ``all``: after every turn;
    ``none``), ``train_on_eot`` (the same for the end-of-turn tokens; default: ``train_on_eos``),
    ``field_system`` (a row-level system prompt, default ``system``). Global ``train_on_inputs: true``
    trains the content of every turn; global ``eot_tokens`` names the end-of-turn tokens
    (``chat_templates.end_of_turn_ids``). Template tokens (role headers, separators, BOS) are never
    trainable.

    End-of-turn and eos tokens follow axolotl's chat_template strategy: after each turn's content
    (trained turns, or every turn when either option is ``all``) the first end-of-turn token and,
    separately, the first eos token at most 3 tokens after the content are that turn's; each is trained
    per its option, ``last`` training the last one found in the conversation.
    """

    def __init__(self, ds_cfg: Any, settings: DataSettings, tokenizer: PreTrainedTokenizerBase):
        override = opt(ds_cfg, "chat_template")
        self.template = resolve_chat_template(override, settings, tokenizer) if override else tokenizer.chat_template
        if self.template is None:
            raise ConfigError(
                "type: chat_template needs a chat template, and the tokenizer has none; set "
                "`chat_template: chatml` (or llama3, qwen3, or jinja with chat_template_jinja)"
            )
        self.tokenizer = tokenizer
        self.field_messages = opt(ds_cfg, "field_messages", "messages")
        mappings = dict(opt(ds_cfg, "message_property_mappings", {}) or {})
        self.role_key = mappings.get("role", opt(ds_cfg, "message_field_role", "role"))
        self.content_key = mappings.get("content", opt(ds_cfg, "message_field_content", "content"))
        roles = opt(ds_cfg, "roles")
        self.role_map = {s: t for t, sources in roles.items() for s in sources} if roles else DEFAULT_ROLES
        self.roles_to_train = {self.role_map.get(r, r) for r in opt(ds_cfg, "roles_to_train", ["assistant"])}
        self.train_on_eos = opt(ds_cfg, "train_on_eos", "turn")
        self.train_on_eot = opt(ds_cfg, "train_on_eot", self.train_on_eos)
        for key, value in (("train_on_eos", self.train_on_eos), ("train_on_eot", self.train_on_eot)):
            if value not in TRAIN_ON_EOS:
                raise ConfigError(f"{key}: {value!r} is not one of {', '.join(TRAIN_ON_EOS)}")
        self.train_on_inputs = bool(settings.train_on_inputs)
        self.field_system = opt(ds_cfg, "field_system", "system")
        self.drop_system_message = bool(opt(ds_cfg, "drop_system_message", False))
        eot_tokens = settings.eot_tokens
        self.eot_ids = end_of_turn_ids(tokenizer, eot_tokens, self.template)
        self.eos_id = tokenizer.eos_token_id
        if (
            eot_tokens is not None
            and self.eos_id is not None
            and self.eos_id in self.eot_ids
            and self.train_on_eos != self.train_on_eot
        ):
            raise ConfigError(
                f"eot_tokens lists the eos token {tokenizer.eos_token!r}, and train_on_eos ({self.train_on_eos}) and "
                f"train_on_eot ({self.train_on_eot}) disagree about training it (axolotl refuses this too). Set both "
                "to the same value, or leave the eos token out of eot_tokens."
            )

    def messages(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """The row's conversation as template messages (roles mapped); :class:`BadRow` if unusable."""
        raw = row.get(self.field_messages)
        if raw is None:
            raise BadRow("missing_field", f"no {self.field_messages!r} field")
        if not isinstance(raw, list) or not raw:
            raise BadRow("malformed_row", f"{self.field_messages!r} is not a non-empty list of messages")
        out = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise BadRow("malformed_row", f"message {i} is a {type(m).__name__}, not a dict")
            role, content = m.get(self.role_key), m.get(self.content_key)
            if role is None or content is None:
                key = self.role_key if role is None else self.content_key
                raise BadRow("missing_field", f"message {i} has no {key!r}")
            if not isinstance(content, str):
                raise BadRow("malformed_row", f"message {i} content is a {type(content).__name__}, not a string")
            msg = {"role": self.role_map.get(role, role), "content": content}
            msg.update({k: m[k] for k in PASSTHROUGH_KEYS if m.get(k) is not None})
            out.append(msg)
        system = row.get(self.field_system)
        if out[0]["role"] != "system" and isinstance(system, str) and system:
            out.insert(0, {"role": "system", "content": system})
        if self.drop_system_message:
            out = [m for m in out if m["role"] != "system"]
        if not out:
            raise BadRow("malformed_row", "no messages besides the system message")
        return out

    def render(self, messages: list[dict[str, Any]]) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False)
        except TemplateError as e:
            raise BadRow("template_error", str(e)) from None

    def content_span(self, messages: list[dict[str, Any]], i: int, text: str) -> tuple[int, int]:
        """Characters [start, end) of ``text`` (= rendered ``messages``) that turn i's content produced."""
        content = messages[i]["content"]
        sentinel = next(s for s in _SENTINELS if s not in content)
        other = self.render([*messages[:i], {**messages[i], "content": sentinel}, *messages[i + 1 :]])
        start = _common_prefix_len(text, other)
        room = min(len(text), len(other)) - start
        end = len(text) - min(_common_prefix_len(text[::-1], other[::-1]), room)
        return start, max(start, end)

    def __call__(self, row: dict[str, Any]) -> Example:
        messages = self.messages(row)
        trained = [self.train_on_inputs or m["role"] in self.roles_to_train for m in messages]
        for i, m in enumerate(messages):
            if m["role"] in self.roles_to_train and not m["content"].strip():
                raise BadRow("empty_response", f"message {i} ({m['role']}) has empty content")
        text = self.render(messages)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        trainable = np.zeros(len(ids), dtype=bool)
        # (token ids, option, last found) for the end-of-turn tokens, then the eos token (axolotl's order).
        ends = [[self.eot_ids, self.train_on_eot, -1], [{self.eos_id}, self.train_on_eos, -1]]
        every_turn = "all" in (self.train_on_eot, self.train_on_eos)
        for i in range(len(messages)):
            if not trained[i] and not every_turn:
                continue
            start, end = self.content_span(messages, i, text)
            tokens = np.flatnonzero((offsets[:, 0] < end) & (offsets[:, 1] > start))
            if tokens.size == 0:
                continue
            if trained[i]:
                trainable[tokens] = True
            # The turn's end tokens follow its content, allowing a few template tokens between (axolotl
            # allows 3).
            after = int(tokens[-1]) + 1
            for spec in ends:
                found, option = spec[0], spec[1]
                j = next((j for j in range(after, min(after + 4, len(ids))) if ids[j] in found), -1)
                if j >= 0:
                    spec[2] = j
                    if option == "all" or (option == "turn" and trained[i]):
                        trainable[j] = True
        for _, option, last in ends:
            if option == "last" and last >= 0:
                trainable[last] = True
        return _example(ids, trainable)
