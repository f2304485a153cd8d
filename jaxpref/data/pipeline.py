"""The language-model data pipeline (SFT and KD): datasets -> Grain -> micro-batches.

Stages, in order:

1. load every ``datasets:`` entry (``sources.py``), concatenate, shuffle the rows with ``seed`` and
   split off ``val_set_size`` rows as the eval set (or use ``test_datasets``);
2. per row, as a Grain map: format + tokenize (``formats/``), cut to ``sequence_len`` per
   ``excess_length_strategy``, shift into prediction-aligned ``labels``/``loss_mask`` (KD: and the
   teacher rows into ``target_*``, ``kd_targets.py``); a row that cannot be used becomes a
   :class:`Dropped` record, counted per reason in the :class:`DataReport`; it never aborts the run
   and never moves another row. The map runs in this thread or, for large datasets, in
   ``dataset_processes`` worker processes with the same result (``workers.py``). Stages 1-2 go
   through the ``dataset_prepared_path`` cache (``cache.py``). ``dataset_exact_deduplication`` drops
   examples equal to an earlier one as they are counted (``dedup.py``);
3. ``sample_packing``: pack rows into ``sequence_len`` sequences (Grain best-fit, ``packing.py``),
   once, in the shuffled row order; otherwise each row is its own example;
4. batching: each epoch reshuffles the examples (Grain's index shuffle, seeded with ``seed`` + epoch)
   and cuts them into *global* batches of ``shard_count * micro_batch_size`` examples; shard s gets
   examples s, s + n, s + 2n, ... of each global batch. The last global batch of an epoch is padded
   with empty rows (all ``segment_ids`` 0, no loss), so every example is seen exactly once per epoch
   and every shard yields the same number of micro-batches. The time dimension T is
   ``sequence_len`` with packing or ``pad_to_sequence_len``, else the longest row of the *global*
   batch rounded up to a multiple of 64 (capped at ``sequence_len``): the same T on every shard.

Each process tokenizes and packs the whole dataset (packing and bucketing must agree across
processes) and keeps only its slice for batching. ``streaming: true`` datasets take another path
(``streaming.py``) that reuses the per-row map, the report and the collation; ``lm.build_lm_data``
chooses between the two.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np
from transformers import PreTrainedTokenizerBase

from jaxpref.data._cfg import opt
from jaxpref.data.cache import cached_examples
from jaxpref.data.dedup import REASON as DUPLICATE
from jaxpref.data.dedup import ExactDuplicates
from jaxpref.data.dedup import summary as dedup_summary
from jaxpref.data.formats import BadRow, Example, RowFormatter, get_format
from jaxpref.data.formats.prompts import PROMPTS, prompt_format
from jaxpref.data.kd_targets import fit_common_top_k, shift_teacher
from jaxpref.data.packing import bucket_length, collate
from jaxpref.data.report import DataReport
from jaxpref.data.settings import DataSettings
from jaxpref.data.sources import load_entries
from jaxpref.data.workers import mapped_rows
from jaxpref.errors import ConfigError, DataError

log = logging.getLogger(__name__)

EXCESS_LENGTH_STRATEGIES = ("drop", "truncate", "raise")


@dataclass(frozen=True)
class Dropped:
    """A row that the pipeline drops: ``reason`` is the report key, ``row`` the raw row."""

    reason: str
    detail: str
    row: Any


def shift(example: Example) -> Example:
    """Token-aligned ``input_ids``/``trainable`` [L] -> prediction-aligned [L] arrays.

    ``labels[t] = input_ids[t + 1]`` and ``loss_mask[t] = trainable[t + 1]``; the last position has
    no next token: label 0, not trainable.
    """
    ids = example["input_ids"]
    labels = np.zeros_like(ids)
    labels[:-1] = ids[1:]
    loss_mask = np.zeros(len(ids), dtype=bool)
    loss_mask[:-1] = example["trainable"][1:]
    shifted = {"input_ids": ids, "labels": labels, "loss_mask": loss_mask}
    if "teacher_token_ids" in example:  # KD: teacher rows [L, K] shift like the labels (kd_targets.py)
        shifted.update(shift_teacher(example, loss_mask))
    return shifted


class ProcessRow:
    """Grain map: raw row -> shifted example (with ``truncated`` flag) or :class:`Dropped`."""

    def __init__(self, formatter: RowFormatter, sequence_len: int, excess_length_strategy: str):
        self.formatter = formatter
        self.sequence_len = sequence_len
        self.truncate = excess_length_strategy == "truncate"

    def __call__(self, row: dict[str, Any]) -> tuple[Example, bool] | Dropped:
        try:
            example = self.formatter(row)
        except BadRow as e:
            return Dropped(e.reason, e.detail, row)
        except Exception as e:  # a formatter bug or an odd row must not stop the run
            return Dropped("format_error", f"{type(e).__name__}: {e}", row)
        length = len(example["input_ids"])
        truncated = length > self.sequence_len
        if truncated:
            if not self.truncate:
                return Dropped("too_long", f"{length} tokens > sequence_len {self.sequence_len}", row)
            example = {k: v[: self.sequence_len] for k, v in example.items()}
        shifted = shift(example)
        if not shifted["loss_mask"].any():
            return Dropped("no_trainable_tokens", "no trainable token after the first", row)
        return shifted, truncated


def lm_measure(example: Example) -> tuple[int, int, int]:
    """(longest sequence, trainable positions, tokens) of a kept example, for the report."""
    length = len(example["input_ids"])
    return length, int(example["loss_mask"].sum()), length


def account(
    record: tuple[Example, bool] | Dropped,
    report: DataReport,
    excess_length_strategy: str,
    measure: Callable[[Example], tuple[int, int, int]] = lm_measure,
) -> Example | None:
    """Count one per-row record in ``report``: the kept example, or None for a dropped row.

    Raises :class:`DataError` for a too long row under ``excess_length_strategy: raise``.
    """
    if isinstance(record, Dropped):
        if record.reason == "too_long" and excess_length_strategy == "raise":
            raise DataError(
                f"A {report.name} row is longer than sequence_len ({record.detail}) and "
                "excess_length_strategy is 'raise'. Use 'drop' or 'truncate', or raise sequence_len."
            )
        report.drop(record.reason, record.detail, record.row)
        return None
    example, truncated = record
    longest, trainable, tokens = measure(example)
    report.keep(longest, trainable, truncated=truncated, tokens=tokens)
    return example


def process_rows(
    rows: grain.MapDataset,
    report: DataReport,
    excess_length_strategy: str,
    measure: Callable[[Example], tuple[int, int, int]] = lm_measure,
    processes: int = 1,
    duplicates: ExactDuplicates | None = None,
) -> list[Example]:
    """Run the per-row map over all rows, filling ``report``; the kept examples in row order.

    Formatting is Python-bound (GIL) and HF fast tokenizers are not safe to share across threads, so
    the map runs in this thread or in up to ``processes`` worker processes (``workers.py``); the result
    is the same either way. With ``duplicates`` (``dataset_exact_deduplication``), an example equal to
    one seen before is dropped as ``duplicate`` (``dedup.py``).
    """
    kept = []
    with mapped_rows(rows, processes) as records:
        for record in records:
            if duplicates is not None and not isinstance(record, Dropped) and not duplicates.first(record[0]):
                record = Dropped(DUPLICATE, "the same example as an earlier row", dedup_summary(record[0]))
            example = account(record, report, excess_length_strategy, measure)
            if example is not None:
                kept.append(example)
    return kept


def formatted_rows(
    settings: DataSettings, tokenizer: PreTrainedTokenizerBase, key: str, make_processor: Callable, kind: str
) -> grain.MapDataset:
    """The entries of ``settings.<key>``, loaded and concatenated, each mapped through its own format.

    ``make_processor(formatter)`` is the per-row Grain map (raw row -> example or :class:`Dropped`).
    """
    entries = list(getattr(settings, key))
    # Resolve every type before loading anything: an unknown type fails fast.
    specs = [
        prompt_format(opt(e, "type"), f"{key}[{i}]")
        if kind == PROMPTS
        else get_format(opt(e, "type"), kind=kind, where=f"{key}[{i}]")
        for i, e in enumerate(entries)
    ]
    # range + map, not MapDataset.source: a source estimates the byte size of every row it reads (a
    # tree walk over nested lists: 30-50 ms for a 1k-token KD row, more than formatting it).
    parts = [
        grain.MapDataset.range(len(ds)).map(ds.__getitem__).map(make_processor(spec.build(entry, settings, tokenizer)))
        for spec, entry, ds in zip(specs, entries, load_entries(entries, key=key))
    ]
    return grain.MapDataset.concatenate(parts)


def eval_source_rows(settings: DataSettings) -> list[dict[str, Any]]:
    """The raw rows of the eval set, before formatting, in the order the pipeline splits them: the
    ``test_datasets`` rows, or the first ``val_set_size`` rows of the shuffled ``datasets`` ([] without
    an eval set). Rows the pipeline drops as bad are included; the caller skips what it cannot use."""
    return [row for row, _ in eval_source_entries(settings)]


def eval_source_entries(settings: DataSettings) -> list[tuple[dict[str, Any], Any]]:
    """:func:`eval_source_rows`, each row with the dataset entry it came from (its ``type`` formats it)."""
    key = "test_datasets" if settings.test_datasets else "datasets"
    if key == "datasets" and not settings.val_set_size:
        return []
    entries = list(getattr(settings, key))
    parts = [
        grain.MapDataset.range(len(ds)).map(functools.partial(_row_and_entry, ds, entry))
        for entry, ds in zip(entries, load_entries(entries, key=key))
    ]
    rows = grain.MapDataset.concatenate(parts)
    if key == "test_datasets":
        return [rows[i] for i in range(len(rows))]
    rows = rows.shuffle(seed=int(settings.seed))  # the permutation of _load_examples: same length, same seed
    return [rows[i] for i in range(_val_count(float(settings.val_set_size), len(rows)))]


def _row_and_entry(ds: Any, entry: Any, i: int) -> tuple[dict[str, Any], Any]:
    return ds[i], entry


def _val_count(val_set_size: float, n: int) -> int:
    if not val_set_size:
        return 0
    if 0 < val_set_size < 1:
        return math.ceil(val_set_size * n)
    if val_set_size >= 1 and float(val_set_size).is_integer():
        return int(val_set_size)
    raise ConfigError(f"val_set_size: {val_set_size} must be a fraction in (0, 1) or a row count")


def _longest_input_ids(rows: list[Example]) -> int:
    return max(len(e["input_ids"]) for e in rows)


class MicroBatches:
    """Grain ``map_with_index`` transform: micro-batch index m -> this shard's micro-batch.

    ``m = epoch * per_epoch + k``; global batch k of an epoch holds examples
    ``order[k * G : (k + 1) * G]`` (G = shard_count * batch_size), shard s takes every n-th one.
    """

    def __init__(
        self,
        examples: list[Example],
        *,
        batch_size: int,
        shard_index: int,
        shard_count: int,
        sequence_len: int,
        fixed_length: bool,
        seed: int | None,
        longest: Callable[[list[Example]], int] | None = None,
        collate_fn: Callable[[list[Example | None], int], dict[str, np.ndarray]] | None = None,
    ):
        """``longest(rows of a global batch) -> T before bucketing`` (default: longest ``input_ids``);
        ``collate_fn(rows, T) -> micro-batch`` (None rows are padding; default: :func:`packing.collate`)."""
        self.examples = examples
        self.longest = longest or _longest_input_ids
        self.collate = collate_fn or functools.partial(collate, template=examples[0] if examples else {})
        self.batch_size = batch_size
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.sequence_len = sequence_len
        self.fixed_length = fixed_length
        n = len(examples)
        # Epoch e's permutation: order[e * n + g] (Grain reseeds its index shuffle with seed + e).
        self.order = grain.MapDataset.range(n).shuffle(seed=seed) if seed is not None else None
        self.global_batch = batch_size * shard_count
        self.per_epoch = -(-n // self.global_batch)

    def _index(self, epoch: int, g: int) -> int:
        n = len(self.examples)
        return int(self.order[epoch * n + g]) if self.order is not None else g

    def __call__(self, m: int, _: Any) -> dict[str, np.ndarray]:
        epoch, k = divmod(m, self.per_epoch)
        n = len(self.examples)
        first = k * self.global_batch
        real = range(first, min(first + self.global_batch, n))
        if self.fixed_length:
            length = self.sequence_len
        else:
            longest = self.longest([self.examples[self._index(epoch, g)] for g in real])
            length = bucket_length(int(longest), self.sequence_len)
        mine = [first + b * self.shard_count + self.shard_index for b in range(self.batch_size)]
        rows = [self.examples[self._index(epoch, g)] if g < n else None for g in mine]
        return self.collate(rows, length)


class LMData:
    """Micro-batches of one process's shard. Build with :func:`build_lm_data`.

    Batches are dicts of numpy arrays [B, T] (docs/design.md "Batches"): ``input_ids`` int32,
    ``labels`` int32, ``loss_mask`` bool, ``positions`` int32, ``segment_ids`` int32 (0 = padding).
    """

    def __init__(
        self,
        train: list[Example],
        eval_: list[Example],
        *,
        report: DataReport,
        eval_report: DataReport | None,
        micro_batch_size: int,
        eval_batch_size: int,
        shard_index: int,
        shard_count: int,
        sequence_len: int,
        fixed_length: bool,
        seed: int,
        batching: dict[str, Any] | None = None,
    ):
        """``batching``: :class:`MicroBatches` hooks (``longest``, ``collate_fn``) of non-LM kinds."""
        self.report = report
        self.eval_report = eval_report
        self.micro_batch_size = micro_batch_size
        self.eval_batch_size = eval_batch_size
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.sequence_len = sequence_len
        common = dict(
            shard_index=shard_index,
            shard_count=shard_count,
            sequence_len=sequence_len,
            fixed_length=fixed_length,
            **(batching or {}),
        )
        self._train = MicroBatches(train, batch_size=micro_batch_size, seed=seed, **common)
        if 0 < len(train) < self._train.global_batch:
            log.warning(
                "micro_batch_size=%d x %d process(es) asks for %d rows per micro-batch, but the training data "
                "has %d rows (after packing, if on): every micro-batch holds those %d rows and %d padding rows "
                "(which count for nothing). Lower micro_batch_size or add data.",
                micro_batch_size,
                shard_count,
                self._train.global_batch,
                len(train),
                len(train),
                self._train.global_batch - len(train),
            )
        self._eval = MicroBatches(eval_, batch_size=eval_batch_size, seed=None, **common) if eval_ else None
        self._eval_batches: list[dict[str, np.ndarray]] | None = None

    @property
    def micro_batches_per_epoch(self) -> int:
        """Micro-batches per epoch on this shard (the same number on every shard)."""
        return self._train.per_epoch

    @property
    def has_eval(self) -> bool:
        return self._eval is not None

    def train_iterator(self, num_epochs: float | None = 1) -> grain.DatasetIterator:
        """Micro-batches for ``num_epochs`` epochs (``None``: forever), each epoch reshuffled.

        A fractional ``num_epochs`` rounds up to whole epochs (the trainer stops at its step count).
        The iterator's ``get_state()`` is a JSON-able dict; ``set_state(state)`` on a fresh
        ``train_iterator(...)`` continues at the next unseen micro-batch.
        """
        epochs = None if num_epochs is None else math.ceil(num_epochs)
        ds = grain.MapDataset.range(self._train.per_epoch).repeat(epochs).map_with_index(self._train)
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)))

    def eval_batches(self) -> list[dict[str, np.ndarray]]:
        """Every eval row exactly once over all shards, in fixed order; [] without an eval set."""
        if self._eval is None:
            return []
        if self._eval_batches is None:
            self._eval_batches = [self._eval(m, None) for m in range(self._eval.per_epoch)]
        return self._eval_batches


def load_examples(
    settings: DataSettings,
    tokenizer: PreTrainedTokenizerBase,
    *,
    kind: str,
    make_processor: Callable,
    measure: Callable[[Example], tuple[int, int, int]] = lm_measure,
) -> tuple[list[Example], list[Example], DataReport, DataReport | None]:
    """:func:`_load_examples` through the ``dataset_prepared_path`` cache (``cache.py``: hit = no
    re-tokenizing); KD examples get the run's one top-k K (``kd_targets.fit_common_top_k``) first."""

    def prepare() -> tuple[list[Example], list[Example], DataReport, DataReport | None]:
        train, evals, report, eval_report = _load_examples(
            settings, tokenizer, kind=kind, make_processor=make_processor, measure=measure
        )
        return *fit_common_top_k(train, evals), report, eval_report

    return cached_examples(settings, tokenizer, kind, prepare)


def _load_examples(
    settings: DataSettings,
    tokenizer: PreTrainedTokenizerBase,
    *,
    kind: str,
    make_processor: Callable,
    measure: Callable[[Example], tuple[int, int, int]] = lm_measure,
) -> tuple[list[Example], list[Example], DataReport, DataReport | None]:
    """Stages 1-2 for any kind: load, shuffle, split off the eval set, format and filter every row.

    Returns (train examples, eval examples, train report, eval report or None), each list in row order.
    """
    strategy = settings.excess_length_strategy
    max_bad = float(settings.max_bad_row_fraction)
    rows = formatted_rows(settings, tokenizer, "datasets", make_processor, kind).shuffle(seed=int(settings.seed))
    if settings.test_datasets:
        if settings.val_set_size:
            log.warning("Both test_datasets and val_set_size are set; evaluating on test_datasets only")
        n_val, eval_rows = 0, formatted_rows(settings, tokenizer, "test_datasets", make_processor, kind)
    else:
        n_val = _val_count(float(settings.val_set_size), len(rows))
        if n_val >= len(rows):
            raise ConfigError(f"val_set_size={settings.val_set_size} leaves no training rows out of {len(rows)}")
        eval_rows = rows[:n_val]

    processes = int(settings.dataset_processes)
    dedup = settings.dataset_exact_deduplication
    train_duplicates = ExactDuplicates() if dedup else None
    report = DataReport("train")
    train = process_rows(rows[n_val:], report, strategy, measure, processes, train_duplicates)
    report.check(max_bad)
    eval_report, evals = None, []
    if len(eval_rows):
        eval_duplicates = None
        if train_duplicates is not None:
            # As axolotl: a val_set_size split never shares a row with training (axolotl deduplicates
            # before it splits); test_datasets are checked against training for preference data only.
            across = not settings.test_datasets or kind in ("preference", "kto")
            eval_duplicates = ExactDuplicates(train_duplicates.seen if across else None)
        eval_report = DataReport("eval")
        evals = process_rows(eval_rows, eval_report, strategy, measure, processes, eval_duplicates)
        eval_report.check(max_bad)
    return train, evals, report, eval_report
