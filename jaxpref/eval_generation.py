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

Preference runs (``rl`` set, no ``prompt_field``): each eval row goes through its dataset's own format
(``chatml.intel``, ``chatml``, ``chat_template.argilla``, ``llama3.ultra``, ...), so the prompt is token
for token the prompt the preference loss sees (system turn included where the row has one) and the
reference is the chosen completion (KTO: a desirable completion; undesirable rows are skipped), as text
without special tokens, which is how completions are decoded too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jaxpref.data._cfg import opt
from jaxpref.data.formats import BadRow, RowFormatter, get_format
from jaxpref.data.pipeline import eval_source_entries, eval_source_rows
from jaxpref.errors import ConfigError
from jaxpref.generation import SamplingSettings, generate
from jaxpref.generation.prompts import stop_token_ids
from jaxpref.user_code import import_attribute

logger = logging.getLogger("jaxpref")

Metric = Callable[[str, str, dict[str, Any]], float]


def exact_match(completion: str, reference: str, row: dict[str, Any]) -> float:
    """1.0 when the completion equals the reference after stripping surrounding whitespace."""
    return float(completion.strip() == reference.strip())


def resolve_metric(name: str) -> tuple[str, Metric]:
    """(log name, function) of ``exact_match`` or ``package.module:function``; ConfigError otherwise."""
    if name == "exact_match":
        return name, exact_match
    try:
        fn = import_attribute(name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(
            f"eval_generation.metric: cannot import {name!r} ({type(e).__name__}: {e}); give package.module:function "
            "importable from the working directory, or exact_match"
        ) from None
    if not callable(fn):
        raise ConfigError(f"eval_generation.metric: {name!r} is not a function")
    return name.replace(":", ".").rpartition(".")[2], fn


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


def preference_prompt(row: dict[str, Any], formatter: RowFormatter, tokenizer: Any) -> tuple[list[int], str] | None:
    """(prompt ids, reference) of a preference eval row, from its dataset's format: the prompt ids the
    preference pipeline trains on, and the chosen (KTO: desirable) completion decoded without special
    tokens; None for a row the format rejects and for an undesirable KTO row."""
    try:
        parts = formatter(row)
    except BadRow:
        return None
    except Exception as e:  # as the pipeline: an odd row is skipped, not fatal
        logger.debug("eval_generation: row skipped (%s: %s)", type(e).__name__, e)
        return None
    if "chosen_ids" in parts:
        completion = parts["chosen_ids"]
    elif bool(parts.get("desirable", False)):
        completion = parts["completion_ids"]
    else:
        return None
    prompt = [int(t) for t in parts["prompt_ids"]]
    if not prompt:
        return None
    return prompt, tokenizer.decode([int(t) for t in completion], skip_special_tokens=True)


def preference_formatters(entries: Sequence[Any], settings: Any, tokenizer: Any) -> list[RowFormatter]:
    """The preference (or KTO) format of each row's dataset entry, built once per entry."""
    kind = "kto" if settings.rl == "kto" else "preference"
    built: dict[int, RowFormatter] = {}
    for entry in entries:
        if id(entry) not in built:
            spec = get_format(opt(entry, "type"), kind=kind, where="eval_generation")
            built[id(entry)] = spec.build(entry, settings, tokenizer)
    return [built[id(e)] for e in entries]


class GenerationEval:
    """The ``eval_generation`` of a run: ``__call__(model) -> {generation_<metric>, generation_tokens}``.

    ``formatters`` (preference runs): per row, the format of its dataset entry; the prompt and reference
    then come from :func:`preference_prompt`. Without it, rows are conversations or flat rows, rendered
    with the tokenizer's chat template (:func:`prompt_and_reference`).
    """

    def __init__(
        self,
        section: Any,
        rows: Sequence[dict[str, Any]],
        tokenizer: Any,
        *,
        seed: int = 0,
        formatters: Sequence[RowFormatter] | None = None,
        mesh: Any = None,
    ):
        self.name, self.metric = resolve_metric(section.metric)
        if formatters is None and tokenizer.chat_template is None:
            raise ConfigError("eval_generation needs a chat template: set chat_template (e.g. chatml)")
        if formatters is not None and len(formatters) != len(rows):
            raise ValueError(f"{len(formatters)} formatters for {len(rows)} rows")
        self.tokenizer, self.seed, self.mesh = tokenizer, seed, mesh  # mesh: the trainer's, sampled on
        self.last_tokens = 0.0  # mean completion length of the last completions() call
        self.rows, self.references, self.prompts = [], [], []
        skipped = 0
        for i, row in enumerate(rows):
            if len(self.prompts) == section.samples:
                break
            if formatters is not None:
                pair = preference_prompt(row, formatters[i], tokenizer)
            else:
                found = prompt_and_reference(row, section)
                pair = None if found is None else (self.render(found[0]), found[1])
            if pair is None:
                skipped += 1
                continue
            self.prompts.append(pair[0])
            self.rows.append(row)
            self.references.append(pair[1])
        if not self.prompts:
            where = (
                "a row its dataset's format accepts, with a chosen (KTO: desirable) completion"
                if formatters is not None
                else f"a conversation ending in an assistant turn in '{section.field_messages}', or "
                "prompt_field/reference_field"
            )
            raise ConfigError(f"eval_generation: no eval row has a prompt and a reference ({where}); check the data")
        if skipped:
            kto = " (KTO: undesirable rows have none)" if formatters is not None else ""
            logger.warning("eval_generation: skipped %d eval row(s) without a prompt and a reference%s", skipped, kto)
        self.settings = SamplingSettings(
            max_new_tokens=section.max_new_tokens, temperature=section.temperature,
            stop_token_ids=stop_token_ids(tokenizer),
        )  # fmt: skip

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt messages -> ids: the chat template with the generation prompt, no added special tokens."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def completions(self, model: Any, step: int = 0) -> list[str]:
        """The model's completions of the sampled rows (decoded without special tokens)."""
        key = jax.random.fold_in(jax.random.key(self.seed), step)
        result = generate(model, self.prompts, self.settings, key=key, mesh=self.mesh)
        self.last_tokens = sum(len(t) for t in result.tokens) / len(result.tokens)
        return [self.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in result.tokens]

    def scores(self, completions: Sequence[str]) -> list[float]:
        """The metric of each completion against its row's reference."""
        return [float(self.metric(c, ref, row)) for c, ref, row in zip(completions, self.references, self.rows)]

    def __call__(self, model: Any, step: int = 0) -> dict[str, float]:
        scores = self.scores(self.completions(model, step))
        return {f"generation_{self.name}": sum(scores) / len(scores), "generation_tokens": self.last_tokens}


def build_generation_eval(
    section: Any, settings: Any, tokenizer: Any, *, seed: int = 0, mesh: Any = None
) -> GenerationEval:
    """The run's :class:`GenerationEval` over its eval set (``settings``: the run's ``DataSettings``):
    preference runs through their datasets' formats unless ``prompt_field`` names flat fields."""
    if settings.rl and section.prompt_field is None:
        pairs = eval_source_entries(settings)
        rows = [row for row, _ in pairs]
        formatters = preference_formatters([entry for _, entry in pairs], settings, tokenizer)
        return GenerationEval(section, rows, tokenizer, seed=seed, formatters=formatters, mesh=mesh)
    return GenerationEval(section, eval_source_rows(settings), tokenizer, seed=seed, mesh=mesh)
