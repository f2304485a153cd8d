"""Chat templates by name and the end-of-turn tokens they train.

Templates shipped with jaxpref live in ``jaxpref/templates/<name>.jinja``: chatml, llama3, qwen3
(jaxpref's own), and gemma, qwen_25, mistral_v3_tekken, phi_3, phi_35, byte-identical copies of
axolotl's templates of those names (src/axolotl/utils/chat_templates/templates/ at axolotl commit
b3c9e07a; tests/data/test_chat_templates.py compares their renderings with the model families' own
templates and lists the differences). The row formats (``formats/``) and the tokenizer loader
(``tokenizer.py``) both read them here.
"""

from __future__ import annotations

import logging
import os
from importlib import resources

from transformers import PreTrainedTokenizerBase

from jaxpref.data.settings import DataSettings
from jaxpref.errors import ConfigError

log = logging.getLogger(__name__)

SHIPPED_TEMPLATES = ("chatml", "llama3", "qwen3", "gemma", "qwen_25", "mistral_v3_tekken", "phi_3", "phi_35")
TEMPLATE_CHOICES = (*SHIPPED_TEMPLATES, "tokenizer_default", "jinja")

# End-of-turn token of each template family, the default when `eot_tokens` is not set: trained per
# `train_on_eot` even when the tokenizer's eos differs (a Llama 3 *base* tokenizer has eos
# <|end_of_text|>, but its turns end in <|eot_id|>; Gemma's eos is <eos>, its turns end in
# <end_of_turn>; Phi-3's eos is <|endoftext|>, its turns end in <|end|>). Mistral turns end in eos.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def shipped_template(name: str) -> str:
    """The jinja source of a template shipped with jaxpref (one of :data:`SHIPPED_TEMPLATES`)."""
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


def end_of_turn_ids(
    tokenizer: PreTrainedTokenizerBase, eot_tokens: tuple[str, ...] | None = None, template: str | None = None
) -> frozenset[int]:
    """Token ids that end a turn (the EOT tokens of axolotl's chat_template strategy).

    ``eot_tokens`` None (the default): the eos token plus the known end-of-turn tokens in the vocabulary.
    Given ``eot_tokens`` (axolotl's rules): a token that does not occur in ``template`` is left out with
    a warning (the eos token also counts as occurring when the template writes ``eos_token``, as
    axolotl's own eos check reads it); one that is not a single token of the tokenizer is a
    :class:`ConfigError`.
    """
    vocab = tokenizer.get_vocab()
    if eot_tokens is None:
        ids = set()
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
        return frozenset(ids)
    ids = set()
    for token in eot_tokens:
        in_template = template is None or token in template
        if not in_template and token == tokenizer.eos_token and "eos_token" in template:
            in_template = True
        if not in_template:
            log.warning("eot_tokens: %r does not occur in the chat template; it is not trained as a turn end", token)
            continue
        encoded = tokenizer.encode(token, add_special_tokens=False)
        if len(encoded) != 1:
            raise ConfigError(
                f"eot_tokens: {token!r} is {len(encoded)} tokens for this tokenizer ({encoded}), not one, so it "
                "cannot mark a turn end. Fix: list the template's turn-ending token as the tokenizer spells it, or "
                "make it one token with `special_tokens: {additional_special_tokens: [...]}` (a new token starts "
                "untrained)."
            )
        ids.add(int(encoded[0]))
    return frozenset(ids)
