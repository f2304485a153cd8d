"""What generation needs of a tokenizer: the token ids that end a completion."""

from __future__ import annotations

from typing import Any

from jaxpref.data.chat_templates import END_OF_TURN_TOKENS


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The tokenizer's eos and the end-of-turn tokens of the shipped templates that it has
    (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``): a chat turn ends at either."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    return tuple(sorted(ids))
