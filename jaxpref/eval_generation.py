"""Evaluation by generation (``eval_generation:``): complete a fixed sample of eval rows and score them.

At each evaluation of a run, :class:`GenerationEval` renders the first ``samples`` usable rows of the
eval set (``data.pipeline.eval_source_rows``: the rows the eval loss is computed on, before formatting)
with the run's chat template and generation prompt, completes them with ``jaxpref.generation.generate``
(greedy unless ``temperature`` > 0) and scores each completion against the row's reference:
``exact_match`` (equal after stripping whitespace) or a user function ``package.module:function``
called as ``function(completion, reference, row) -> float``. It logs the mean as
``generation_<metric>`` (``exact_match``, or the function's name) and the mean completion length
in tokens as ``generation_tokens``, next to the eval loss.

Rows: conversations (``field_messages``; the prompt is every turn but a final assistant turn, which
is the reference) or flat rows (``prompt_field`` sent as one user turn, ``reference_field``). Rows
without a usable prompt and reference are skipped and counted in the log.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jaxpref.errors import ConfigError
from jaxpref.generation import SamplingSettings, generate
from jaxpref.generation.prompts import stop_token_ids

logger = logging.getLogger("jaxpref")

Metric = Callable[[str, str, dict[str, Any]], float]


def exact_match(completion: str, reference: str, row: dict[str, Any]) -> float:
    """1.0 when the completion equals the reference after stripping surrounding whitespace."""
    return float(completion.strip() == reference.strip())


def resolve_metric(name: str) -> tuple[str, Metric]:
    """(log name, function) of ``exact_match`` or ``package.module:function``; ConfigError otherwise."""
    if name == "exact_match":
        return name, exact_match
    module_name, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(
            f"eval_generation.metric: cannot import {name!r} ({type(e).__name__}: {e}); give package.module:function "
            "importable from the working directory, or exact_match"
        ) from None
    if not callable(fn):
        raise ConfigError(f"eval_generation.metric: {name!r} is not a function")
    return attr, fn


def prompt_and_reference(row: dict[str, Any], section: Any) -> tuple[list[dict[str, str]], str] | None:
    """(prompt messages, reference) of an eval row, or None when the row has no usable pair."""
    if section.prompt_field is not None:
        prompt, reference = row.get(section.prompt_field), row.get(section.reference_field)
        if isinstance(prompt, str) and prompt and isinstance(reference, str):
            return [{"role": "user", "content": prompt}], reference
        return None
    messages = row.get(section.field_messages)
    if not isinstance(messages, list) or len(messages) < 2 or not all(isinstance(m, dict) for m in messages):
        return None
    last = messages[-1]
    if last.get("role") != "assistant" or not isinstance(last.get("content"), str):
        return None
    prompt = [{"role": str(m.get("role")), "content": str(m.get("content"))} for m in messages[:-1]]
    return prompt, last["content"]


class GenerationEval:
    """The ``eval_generation`` of a run: ``__call__(model) -> {generation_<metric>, generation_tokens}``."""

    def __init__(self, section: Any, rows: Sequence[dict[str, Any]], tokenizer: Any, *, seed: int = 0):
        self.name, self.metric = resolve_metric(section.metric)
        if tokenizer.chat_template is None:
            raise ConfigError("eval_generation needs a chat template: set chat_template (e.g. chatml)")
        self.tokenizer, self.seed = tokenizer, seed
        self.rows, self.references, self.prompts = [], [], []
        skipped = 0
        for row in rows:
            if len(self.prompts) == section.samples:
                break
            pair = prompt_and_reference(row, section)
            if pair is None:
                skipped += 1
                continue
            text = tokenizer.apply_chat_template(pair[0], tokenize=False, add_generation_prompt=True)
            self.prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
            self.rows.append(row)
            self.references.append(pair[1])
        if not self.prompts:
            raise ConfigError(
                "eval_generation: no eval row has a prompt and a reference (a conversation ending in an assistant "
                f"turn in '{section.field_messages}', or prompt_field/reference_field); check the eval set"
            )
        if skipped:
            logger.warning("eval_generation: skipped %d eval row(s) without a prompt and a reference", skipped)
        self.settings = SamplingSettings(
            max_new_tokens=section.max_new_tokens, temperature=section.temperature,
            stop_token_ids=stop_token_ids(tokenizer),
        )  # fmt: skip

    def __call__(self, model: Any, step: int = 0) -> dict[str, float]:
        key = jax.random.fold_in(jax.random.key(self.seed), step)
        result = generate(model, self.prompts, self.settings, key=key)
        scores = [
            float(self.metric(self.tokenizer.decode(tokens, skip_special_tokens=True), reference, row))
            for tokens, reference, row in zip(result.tokens, self.references, self.rows)
        ]
        return {
            f"generation_{self.name}": sum(scores) / len(scores),
            "generation_tokens": sum(len(t) for t in result.tokens) / len(result.tokens),
        }
