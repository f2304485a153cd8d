"""Tokenizer loading: ``tokenizer_config`` / ``base_model``, chat template by name, special tokens.

The tokenizer returned by :func:`load_tokenizer` carries the selected template
(``chat_templates.resolve_chat_template``) as its ``chat_template``, so that everything downstream
(formats, generation, export) sees one template.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from jaxpref.data._cfg import opt
from jaxpref.data.chat_templates import resolve_chat_template
from jaxpref.data.formats import needs_chat_template
from jaxpref.data.settings import DataSettings
from jaxpref.data.sources import looks_local
from jaxpref.errors import ConfigError

log = logging.getLogger(__name__)


def _as_dict(value: Any) -> dict[str, Any]:
    """``special_tokens`` as a plain dict, whether it is a dict or a pydantic model."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {k: v for k, v in value.items() if v is not None}
    if hasattr(value, "model_dump"):
        return {k: v for k, v in value.model_dump().items() if v is not None}
    return {k: v for k, v in vars(value).items() if v is not None}


def _from_pretrained(path: str) -> PreTrainedTokenizerBase:
    local = os.path.exists(os.path.expanduser(path))
    if not local and looks_local(path):
        raise ConfigError(
            f"The tokenizer path {path!r} does not exist (relative paths start at {os.getcwd()}); set "
            "`tokenizer_config` (or `base_model`) to a directory with tokenizer.json, or to a hub id."
        )
    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(path) if local else path)
    except Exception as e:  # transformers raises OSError/ValueError/HF hub errors depending on the cause
        if local:
            raise ConfigError(
                f"Could not load a tokenizer from the local path {path!r} ({type(e).__name__}: {e}). "
                "The directory needs tokenizer.json (or the files of a slow tokenizer) and "
                "tokenizer_config.json; point `tokenizer_config` (or `base_model`) at such a directory."
            ) from None
        raise ConfigError(
            f"Could not load the tokenizer {path!r}: it is not a local path and it could not be downloaded "
            "from the Hugging Face Hub (offline, no such repository, or access denied). Fix: download it "
            "first (`huggingface-cli download ...`) and set `tokenizer_config` (or `base_model`) to the "
            "local directory, or run with network access and HF_HUB_OFFLINE unset."
        ) from None


def _apply_special_tokens(tokenizer: PreTrainedTokenizerBase, special: dict[str, Any]) -> None:
    before = len(tokenizer)
    # axolotl spells the list `additional_special_tokens`; transformers 5 calls it `extra_special_tokens`.
    extra = [*special.pop("additional_special_tokens", []), *special.pop("extra_special_tokens", [])]
    if special:
        tokenizer.add_special_tokens(special)
    if extra:
        tokenizer.add_special_tokens({"extra_special_tokens": extra}, replace_extra_special_tokens=False)
    if len(tokenizer) > before:
        log.warning(
            "special_tokens added %d new token(s) to the vocabulary (size now %d): the model's vocab_size "
            "must cover them (the new embedding rows start untrained)",
            len(tokenizer) - before,
            len(tokenizer),
        )


def load_tokenizer(settings: DataSettings) -> PreTrainedTokenizerBase:
    """Load the tokenizer named by ``settings.tokenizer_config`` (or ``settings.base_model``).

    Applies ``settings.chat_template`` (a shipped template name, ``tokenizer_default`` or
    ``jinja`` with ``settings.chat_template_jinja``), then ``settings.special_tokens``; a missing pad token falls
    back to the eos token (with a warning). Raises :class:`ConfigError` when the tokenizer cannot be
    loaded or when a dataset of ``settings.datasets``/``settings.test_datasets`` needs a chat template and there
    is none.
    """
    source = settings.tokenizer_config or settings.base_model
    if not source:
        raise ConfigError("No tokenizer: set `base_model` (or `tokenizer_config`) to a local directory or hub id")
    tokenizer = _from_pretrained(str(source))
    if not getattr(tokenizer, "is_fast", True):
        raise ConfigError(
            f"The tokenizer {source!r} is a slow (python) tokenizer; jaxpref needs a fast one "
            "(tokenizer.json) to compute trainable-token masks from character offsets."
        )
    tokenizer.chat_template = resolve_chat_template(settings.chat_template, settings, tokenizer)
    _apply_special_tokens(tokenizer, _as_dict(settings.special_tokens))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(
                f"The tokenizer {source!r} has neither a pad nor an eos token; set "
                "`special_tokens: {pad_token: ..., eos_token: ...}`"
            )
        log.warning("The tokenizer has no pad token; using its eos token %r as pad", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        for key in ("datasets", "test_datasets"):
            for i, ds in enumerate(getattr(settings, key)):
                if needs_chat_template(opt(ds, "type")) and not opt(ds, "chat_template"):
                    raise ConfigError(
                        f"{key}[{i}] has type {ds.type!r}, which formats rows with a chat template, but the "
                        f"tokenizer {source!r} has none. Set `chat_template: chatml` (or llama3, qwen3), or "
                        "`chat_template: jinja` with `chat_template_jinja: path/to/template.jinja`."
                    )
    return tokenizer
