"""Chat templates by name and the end-of-turn tokens they train.

Templates shipped with jaxpref live in ``jaxpref/templates/<name>.jinja`` (chatml, llama3, qwen3).
The row formats (``formats/``) and the tokenizer loader (``tokenizer.py``) both read them here.
"""

from __future__ import annotations

import os
from importlib import resources

from transformers import PreTrainedTokenizerBase

from jaxpref.data.settings import DataSettings
from jaxpref.errors import ConfigError

SHIPPED_TEMPLATES = ("chatml", "llama3", "qwen3")
TEMPLATE_CHOICES = (*SHIPPED_TEMPLATES, "tokenizer_default", "jinja")

# End-of-turn token of each template family: trained per `train_on_eos` even when the tokenizer's
# eos differs (a Llama 3 *base* tokenizer has eos <|end_of_text|>, but its turns end in <|eot_id|>).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>")


def shipped_template(name: str) -> str:
    """The jinja source of a template shipped with jaxpref (``chatml``, ``llama3``, ``qwen3``)."""
    if name not in SHIPPED_TEMPLATES:
        raise ConfigError(f"chat_template: unknown template {name!r}; choose one of {', '.join(TEMPLATE_CHOICES)}")
    return resources.files("jaxpref.templates").joinpath(f"{name}.jinja").read_text()


def resolve_chat_template(choice: str | None, settings: DataSettings, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The jinja source for a ``chat_template`` value (None: the tokenizer's own, possibly None)."""
    choice = choice or "tokenizer_default"
    if choice in SHIPPED_TEMPLATES:
        return shipped_template(choice)
    if choice == "tokenizer_default":
        return tokenizer.chat_template
    if choice == "jinja":
        jinja = settings.chat_template_jinja
        if not jinja:
            raise ConfigError("chat_template: jinja needs `chat_template_jinja` (a .jinja file or the template text)")
        if os.path.isfile(os.path.expanduser(jinja)):
            with open(os.path.expanduser(jinja)) as f:
                return f.read()
        if "{{" in jinja or "{%" in jinja:
            return jinja
        raise ConfigError(
            f"chat_template_jinja: {jinja!r} is neither an existing file nor a jinja template "
            "(no '{{' or '{%' in it)"
        )
    raise ConfigError(f"chat_template: unknown value {choice!r}; choose one of {', '.join(TEMPLATE_CHOICES)}")


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Token ids that end a turn: the eos token plus the known end-of-turn tokens in the vocabulary."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return frozenset(ids)
