"""Prompt data for online RL (``rl: grpo``): batches of prompts, one batch per optimizer step.

The rows are formatted by ``formats/prompts.py`` (TRL's ``prompt`` column or an axolotl transform),
counted and filtered like every other kind (bad rows are dropped and counted; a prompt longer than
``sequence_len - 1`` tokens is ``too_long``, or under ``excess_length_strategy: truncate`` keeps its last
``sequence_len - 1`` tokens, as TRL truncated prompts from the left), shuffled with ``seed`` and split off
the eval set as usual. One training item is the prompts of one optimizer step on this process
(``prompts_per_step`` = micro_batch_size x gradient_accumulation_steps / num_generations); with
``trl.num_iterations`` = mu every item is given mu times in a row (TRL reuses each batch of completions
for mu steps), so an epoch is mu times as many steps and a resumed run continues exactly.

A prompt batch: ``prompt_ids`` int32 [B, P] (right-padded), ``prompt_lengths`` int32 [B] (0: padding
row) and ``rows`` [B] (the row as JSON text; "" on padding rows).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import grain
import numpy as np
from transformers import PreTrainedTokenizerBase

from jaxpref.data.formats import BadRow, Example, RowFormatter
from jaxpref.data.formats.prompts import PROMPTS
from jaxpref.data.pipeline import Dropped, LMData, load_examples
from jaxpref.data.settings import DataSettings
from jaxpref.errors import ConfigError

log = logging.getLogger(__name__)


class ProcessPrompt:
    """Grain map: raw row -> (example, truncated) or :class:`Dropped` (see the module docstring)."""

    def __init__(self, formatter: RowFormatter, sequence_len: int, excess_length_strategy: str):
        self.formatter = formatter
        self.limit = sequence_len - 1  # at least one completion token fits
        self.truncate = excess_length_strategy == "truncate"

    def __call__(self, row: dict[str, Any]) -> tuple[Example, bool] | Dropped:
        try:
            example = self.formatter(row)
        except BadRow as e:
            return Dropped(e.reason, e.detail, row)
        except Exception as e:  # a formatter (or transform) bug or an odd row must not stop the run
            return Dropped("format_error", f"{type(e).__name__}: {e}", row)
        n = len(example["prompt_ids"])
        if n <= self.limit:
            return example, False
        if not self.truncate:
            return Dropped("too_long", f"the prompt has {n} tokens > sequence_len - 1 = {self.limit}", row)
        return {**example, "prompt_ids": example["prompt_ids"][-self.limit :]}, True


def prompt_measure(example: Example) -> tuple[int, int, int]:
    n = len(example["prompt_ids"])
    return n, 0, n


def prompt_longest(rows: list[Example]) -> int:
    return max(len(e["prompt_ids"]) for e in rows)


def collate_prompts(rows: list[Example | None], length: int) -> dict[str, np.ndarray]:
    """Prompt examples (None: padding row) -> one prompt batch (module docstring)."""
    ids = np.zeros((len(rows), length), np.int32)
    lengths = np.zeros((len(rows),), np.int32)
    texts = np.full((len(rows),), "", dtype=object)
    for b, row in enumerate(rows):
        if row is not None:
            n = len(row["prompt_ids"])
            ids[b, :n], lengths[b], texts[b] = row["prompt_ids"], n, str(row["row"])
    return {"prompt_ids": ids, "prompt_lengths": lengths, "rows": texts}


class PromptData(LMData):
    """Prompt batches of one process's shard, one per optimizer step; the API of :class:`LMData`.
    Build with :func:`build_prompt_data`."""

    def __init__(self, *args: Any, repeats: int = 1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.repeats = repeats

    @property
    def micro_batches_per_epoch(self) -> int:
        """Items (optimizer steps) per epoch: prompt batches x ``repeats``."""
        return self._train.per_epoch * self.repeats

    def train_iterator(self, num_epochs: float | None = 1) -> grain.DatasetIterator:
        epochs = None if num_epochs is None else math.ceil(num_epochs)
        repeats, batches = self.repeats, self._train
        ds = grain.MapDataset.range(self.micro_batches_per_epoch).repeat(epochs)
        ds = ds.map_with_index(lambda m, _: batches(m // repeats, None))
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))


def build_prompt_data(
    settings: DataSettings,
    tokenizer: PreTrainedTokenizerBase,
    *,
    prompts_per_step: int,
    repeats: int = 1,
    shard_index: int = 0,
    shard_count: int = 1,
) -> PromptData:
    """Load, format, filter and shard the prompt datasets; ``prompts_per_step`` prompts per process and
    step, each batch given ``repeats`` times (``trl.num_iterations``)."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
    if not settings.datasets:
        raise ConfigError("`datasets` is empty: add at least one dataset entry")
    if any(getattr(e, "streaming", False) for e in (*settings.datasets, *settings.test_datasets)):
        raise ConfigError("rl: grpo reads its prompts in memory; streaming datasets are not supported for it yet")
    sequence_len = int(settings.sequence_len)
    make_processor = functools.partial(
        ProcessPrompt, sequence_len=sequence_len, excess_length_strategy=settings.excess_length_strategy
    )
    train, evals, report, eval_report = load_examples(
        settings, tokenizer, kind=PROMPTS, make_processor=make_processor, measure=prompt_measure
    )
    for rep, examples in ((report, train), (eval_report, evals)):
        if rep is not None:
            rep.sequences = len(examples)
    return PromptData(
        train,
        evals,
        report=report,
        eval_report=eval_report,
        micro_batch_size=prompts_per_step,
        eval_batch_size=prompts_per_step,
        shard_index=shard_index,
        shard_count=shard_count,
        sequence_len=sequence_len,
        fixed_length=False,
        seed=int(settings.seed),
        batching={"longest": prompt_longest, "collate_fn": collate_prompts},
        repeats=repeats,
    )
