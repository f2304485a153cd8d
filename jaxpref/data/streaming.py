"""Streaming datasets (``streaming: true``): rows read lazily through ``datasets``, never all in memory.

Per process, a Grain ``IterDataset`` pipeline:

1. :class:`RowStream` (the source): each ``datasets`` entry as a ``datasets.IterableDataset``. Epoch e
   reads every entry through ``datasets``' buffer shuffle with seed ``seed + e`` (a buffer of
   :data:`SHUFFLE_BUFFER_ROWS` raw rows, :data:`KD_SHUFFLE_BUFFER_ROWS` for KD rows, which are MBs each
   as Python objects), takes this process's slice (``datasets.distributed.split_dataset_by_node``:
   whole files when their number divides by the process count, else every n-th row; either way the
   slices partition the data) and interleaves the entries round-robin (an exhausted entry drops out),
   so each row of this process's slice comes once per epoch. Epochs repeat until the trainer stops at
   ``max_steps``, which streaming requires;
2. map: the entry's per-row step, the map-style code (``pipeline.ProcessRow``,
   ``preference.ProcessPreference``: format, tokenize, cut, shift, KD targets);
3. :class:`CountedFilter`: bad rows are counted in the report and dropped (``pipeline.account``). The
   report counts what this process has read so far; ``max_bad_row_fraction`` is checked once, after
   :data:`CHECK_AFTER_ROWS` rows (at the end of a finite stream if that comes first);
4. KD: every example gets the run's K, the most common K of the first :data:`PEEK_ROWS` rows
   (:func:`peek_top_k`: the unshuffled, unsharded stream, so every process gets the same K);
5. LM data: ``sample_packing`` packs with the map-style best-fit packer (``packing.packer``: same
   ``segment_ids`` / ``positions``, KD arrays packed alike) over the stream, with
   :data:`STREAM_PACKING_BINS` open bins; else one row per sequence;
6. micro-batches of ``micro_batch_size`` sequences with the map-style collation; T is always
   ``sequence_len`` (lengths are not known ahead, and every process must agree on T);
7. a prefetch thread, so formatting overlaps the train step.

Checkpointing: the iterator's ``get_state()`` is JSON: the source's epoch, rows read per entry in that
epoch and the next entry; the report counts; Grain's packer and batcher state on top. On
``set_state`` the source opens the epoch's streams again and *skips* the rows already read (they are
read and parsed again, not formatted): resuming costs reading up to one epoch of this process's
slice. Grain's packer then replays the rows since the start of its current packing round (formatted
again, at most a few hundred rows). The remaining micro-batches are the same as without the restart.

Not streamed: the eval set (``test_datasets``; loaded map-style: every eval row is needed in a fixed
order); ``val_set_size`` is an error (it needs the dataset's length). There is no prepared-data cache
and no worker processes for streamed rows (``dataset_processes`` is for map-style data).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import datasets
import grain
import numpy as np
from datasets.distributed import split_dataset_by_node
from transformers import PreTrainedTokenizerBase

from jaxpref.data._cfg import opt
from jaxpref.data.formats import Example, get_format
from jaxpref.data.kd_targets import TARGET_KEYS, fit_top_k, most_common_k
from jaxpref.data.packing import collate, pack, packer, single_segment
from jaxpref.data.pipeline import Dropped, MicroBatches, account, formatted_rows, process_rows
from jaxpref.data.report import DataReport
from jaxpref.data.settings import DataSettings
from jaxpref.data.sources import load_entry
from jaxpref.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SHUFFLE_BUFFER_ROWS = 1000  # raw rows in datasets' shuffle buffer (its default)
KD_SHUFFLE_BUFFER_ROWS = 64  # a 1k-token KD row is 1-10 MB as Python objects
CHECK_AFTER_ROWS = 1000  # rows read before the max_bad_row_fraction check
PEEK_ROWS = 100  # rows that fix the KD top-k K of a streaming run
PREFETCH_BATCHES = 8
# Open bins of the best-fit packer (map-style: 256). The packer emits nothing until a row fits no open
# bin, so the bins bound the rows read before the first batch, the rows replayed on resume and the
# memory (bins x sequence_len x the row's bytes per token); fewer bins fill sequences slightly less.
STREAM_PACKING_BINS = 64
LM_KEYS = ("input_ids", "labels", "loss_mask")


def streaming_requested(settings: DataSettings) -> bool:
    """True when the ``datasets`` entries stream; :class:`ConfigError` when only some of them do."""
    flags = [bool(opt(e, "streaming", False)) for e in settings.datasets]
    if any(flags) and not all(flags):
        streamed = ", ".join(f"datasets[{i}]" for i, f in enumerate(flags) if f)
        raise ConfigError(
            f"{streamed} set streaming: true and the other datasets entries do not: a run reads either all "
            "its datasets as streams or all in memory. Set `streaming` the same on every entry."
        )
    return bool(flags) and all(flags)


class RowStream(grain.IterDataset):
    """Source: ``(entry index, raw row)`` of this process's slice of the entries, epoch after epoch.

    ``seed`` None reads the entries unshuffled; ``num_epochs`` None repeats forever.
    """

    def __init__(
        self,
        entries: Sequence[datasets.IterableDataset],
        *,
        seed: int | None,
        shuffle_buffer: int,
        shard_index: int = 0,
        shard_count: int = 1,
        num_epochs: int | None = None,
    ):
        super().__init__()
        self.entries = list(entries)
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.num_epochs = num_epochs

    def stream(self, entry: int, epoch: int) -> Iterator[dict[str, Any]]:
        """Raw rows of one entry in one epoch: shuffled, then this process's slice."""
        ds = self.entries[entry]
        if self.seed is not None:
            ds = ds.shuffle(seed=self.seed + epoch, buffer_size=self.shuffle_buffer)
        if self.shard_count > 1:
            ds = split_dataset_by_node(ds, rank=self.shard_index, world_size=self.shard_count)
        return iter(ds)

    def __iter__(self) -> grain.DatasetIterator:
        return _RowStreamIterator(self)

    def __str__(self) -> str:
        return f"RowStream(entries={len(self.entries)}, shard={self.shard_index}/{self.shard_count})"


class _RowStreamIterator(grain.DatasetIterator):
    def __init__(self, source: RowStream):
        super().__init__()
        self._source = source
        self._epoch = 0
        self._rows = [0] * len(source.entries)  # rows read from each entry in this epoch
        self._next = 0  # the entry to read from next (round-robin)
        self._streams: list[Iterator[dict[str, Any]]] | None = None  # opened lazily, after set_state
        self._live: list[bool] = []

    def _open(self) -> None:
        self._streams = []
        for entry, done in enumerate(self._rows):
            it = self._source.stream(entry, self._epoch)
            collections.deque(itertools.islice(it, done), maxlen=0)  # resume: skip the rows already read
            self._streams.append(it)
        self._live = [True] * len(self._streams)

    def __next__(self) -> tuple[int, dict[str, Any]]:
        n = len(self._rows)
        while self._source.num_epochs is None or self._epoch < self._source.num_epochs:
            if self._streams is None:
                self._open()
            for step in range(n):
                entry = (self._next + step) % n
                if not self._live[entry]:
                    continue
                try:
                    row = next(self._streams[entry])
                except StopIteration:
                    self._live[entry] = False
                    continue
                self._rows[entry] += 1
                self._next = (entry + 1) % n
                return entry, row
            if not any(self._rows):
                raise DataError(
                    f"process {self._source.shard_index} of {self._source.shard_count} read no rows from "
                    f"the streamed datasets in epoch {self._epoch}: they are empty, or have fewer rows (files) "
                    "than there are processes"
                )
            self._epoch, self._rows, self._next, self._streams = self._epoch + 1, [0] * n, 0, None
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "rows": list(self._rows), "next": self._next}

    def set_state(self, state: dict[str, Any]) -> None:
        self._epoch, self._rows, self._next = int(state["epoch"]), list(state["rows"]), int(state["next"])
        self._streams = None


class ProcessEntry:
    """Grain map: ``(entry index, raw row)`` -> that entry's per-row step (example or :class:`Dropped`)."""

    def __init__(self, processors: Sequence[Callable[[dict[str, Any]], Any]]):
        self.processors = list(processors)

    def __call__(self, item: tuple[int, dict[str, Any]]) -> Any:
        entry, row = item
        return self.processors[entry](row)


class CountedFilter(grain.IterDataset):
    """Drops :class:`Dropped` records, counting every record in ``report`` (``pipeline.account``).

    ``report.check(max_bad)`` runs when ``check_after`` rows were counted, or at the end of a finite
    stream with fewer rows. The report is part of the iterator state.
    """

    def __init__(
        self,
        parent: grain.IterDataset,
        *,
        report: DataReport,
        excess_length_strategy: str,
        measure: Callable[[Example], tuple[int, int, int]],
        max_bad: float,
        check_after: int | None = None,
    ):
        """``check_after`` None: :data:`CHECK_AFTER_ROWS`."""
        super().__init__(parent)
        self.report = report
        self.account = functools.partial(
            account, report=report, excess_length_strategy=excess_length_strategy, measure=measure
        )
        self.max_bad = max_bad
        self.check_after = CHECK_AFTER_ROWS if check_after is None else check_after

    def __iter__(self) -> grain.DatasetIterator:
        return _CountedFilterIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return "CountedFilter"


class _CountedFilterIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, ds: CountedFilter):
        super().__init__(parent)
        self._ds = ds

    def __next__(self) -> Example:
        report = self._ds.report
        while True:
            try:
                record = next(self._parent)
            except StopIteration:
                if report.rows_in < self._ds.check_after:
                    report.check(self._ds.max_bad)
                raise
            example = self._ds.account(record)
            if report.rows_in == self._ds.check_after:
                report.check(self._ds.max_bad)
            if example is not None:
                return example

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "report": dataclasses.asdict(self._ds.report)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        for key, value in state["report"].items():  # in place: StreamingData.report is this object
            setattr(self._ds.report, key, dict(value) if isinstance(value, dict) else value)


class FixedBatch:
    """Grain ``batch_fn``: up to ``batch_size`` sequences -> one micro-batch with T = ``length``.

    A short last batch (finite streams only) is filled with padding rows (``None`` for ``collate_fn``).
    """

    def __init__(self, collate_fn: Callable[[list[Example | None], int], dict[str, np.ndarray]], batch_size: int,
                 length: int):
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.length = length

    def __call__(self, rows: Sequence[Example]) -> dict[str, np.ndarray]:
        return self.collate_fn([*rows, *[None] * (self.batch_size - len(rows))], self.length)


def collate_like_first(rows: list[Example | None], length: int) -> dict[str, np.ndarray]:
    """:func:`packing.collate` with the keys and dtypes of the first row (a real one)."""
    return collate(rows, length, template=rows[0])


def peek_top_k(entries: Sequence[datasets.IterableDataset], process: ProcessEntry, rows: int = PEEK_ROWS) -> int:
    """The KD K of a streaming run: the most common K of the usable rows among the first ``rows``
    rows (entries interleaved, unshuffled, unsharded: the same on every process)."""
    report = DataReport("train (first streamed rows)")
    widths = []
    for item in itertools.islice(iter(RowStream(entries, seed=None, shuffle_buffer=0, num_epochs=1)), rows):
        record = process(item)
        if isinstance(record, Dropped):
            report.drop(record.reason, record.detail, record.row)
        else:
            widths.append(int(record[0]["target_token_ids"].shape[-1]))
    if not widths:
        raise DataError(f"None of the first {report.rows_in} streamed rows is a usable KD row.\n{report.summary()}")
    return most_common_k(widths)


class StreamingData:
    """Micro-batches of one process's slice of streamed datasets, with the API of ``LMData``.

    ``micro_batches_per_epoch`` is None (unknown); ``report`` counts the rows the latest
    ``train_iterator`` has read so far (restored with its state); the eval set is map-style.
    """

    micro_batches_per_epoch: int | None = None

    def __init__(
        self,
        make_train: Callable[[int | None, DataReport], grain.IterDataset],
        *,
        evals: MicroBatches | None,
        eval_report: DataReport | None,
        micro_batch_size: int,
        eval_batch_size: int,
        shard_index: int,
        shard_count: int,
        sequence_len: int,
        top_k: int | None = None,
    ):
        """``make_train(num_epochs, report) -> IterDataset`` of micro-batches (None: endless)."""
        self._make_train = make_train
        self._eval = evals
        self._eval_batches: list[dict[str, np.ndarray]] | None = None
        self.report = DataReport("train")
        self.eval_report = eval_report
        self.micro_batch_size = micro_batch_size
        self.eval_batch_size = eval_batch_size
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.sequence_len = sequence_len
        self.top_k = top_k

    @property
    def has_eval(self) -> bool:
        return self._eval is not None

    def train_iterator(self, num_epochs: float | None = None) -> grain.DatasetIterator:
        """Micro-batches [micro_batch_size, sequence_len] for ``num_epochs`` passes over this process's
        slice (rounded up; ``None``: forever), each pass reshuffled. ``get_state()`` is JSON;
        ``set_state(state)`` on a fresh iterator continues at the next unseen micro-batch."""
        self.report = DataReport("train")
        epochs = None if num_epochs is None else math.ceil(num_epochs)
        return iter(self._make_train(epochs, self.report))

    def eval_batches(self) -> list[dict[str, np.ndarray]]:
        """Every eval row exactly once over all processes, in fixed order; [] without an eval set."""
        if self._eval is None:
            return []
        if self._eval_batches is None:
            self._eval_batches = [self._eval(m, None) for m in range(self._eval.per_epoch)]
        return self._eval_batches


def _check_config(settings: DataSettings) -> None:
    if not settings.max_steps:
        raise ConfigError(
            "streaming datasets need max_steps: a streamed dataset's length is not known ahead, so the run "
            "length cannot come from num_epochs. Set max_steps (optimizer steps); the data repeats, "
            "reshuffled, until then."
        )
    if settings.val_set_size:
        raise ConfigError(
            "val_set_size needs the dataset's length, which streaming datasets do not have: remove it and "
            "name the eval set in test_datasets (loaded in memory)."
        )


def build_streaming_data(
    settings: DataSettings,
    tokenizer: PreTrainedTokenizerBase,
    *,
    kind: str,
    make_processor: Callable,
    measure: Callable[[Example], tuple[int, int, int]],
    shard_index: int,
    shard_count: int,
    micro_batch_size: int,
    fixed_length: bool,
    batching: dict[str, Any] | None = None,
) -> StreamingData:
    """The streaming counterpart of ``build_lm_data`` / ``build_preference_data`` (module docstring).

    ``kind``: "lm", "kd" (packing per ``sample_packing``, one segment per row otherwise), "preference"
    or "kto" (never packed); ``make_processor(formatter)`` is the per-row step; ``batching``: the
    :class:`MicroBatches` hooks of the kind (its ``collate_fn`` also collates the streamed batches).
    """
    _check_config(settings)
    entries = list(settings.datasets)
    specs = [get_format(opt(e, "type"), kind=kind, where=f"datasets[{i}]") for i, e in enumerate(entries)]
    streams = [load_entry(e, where=f"datasets[{i}]", streaming=True) for i, e in enumerate(entries)]
    process = ProcessEntry([make_processor(spec.build(e, settings, tokenizer)) for spec, e in zip(specs, entries)])
    sequence_len = int(settings.sequence_len)
    strategy = settings.excess_length_strategy
    max_bad = float(settings.max_bad_row_fraction)
    seed = int(settings.seed)
    lm = kind in ("lm", "kd")
    packing = lm and bool(settings.sample_packing)
    top_k = peek_top_k(streams, process) if kind == "kd" else None
    log.info(
        "streaming %d dataset(s): process %d of %d reads its slice; micro-batches of %d x %d%s; the report "
        "counts the rows read so far",
        len(streams), shard_index, shard_count, micro_batch_size, sequence_len, f"; KD top-k K = {top_k}" * bool(top_k),
    )
    collate_fn = (batching or {}).get("collate_fn", collate_like_first)

    def make_train(num_epochs: int | None, report: DataReport) -> grain.IterDataset:
        rows = RowStream(
            streams,
            seed=seed,
            shuffle_buffer=KD_SHUFFLE_BUFFER_ROWS if kind == "kd" else SHUFFLE_BUFFER_ROWS,
            shard_index=shard_index,
            shard_count=shard_count,
            num_epochs=num_epochs,
        )
        ds: grain.IterDataset = CountedFilter(
            rows.map(process), report=report, excess_length_strategy=strategy, measure=measure, max_bad=max_bad
        )
        if top_k is not None:
            ds = ds.map(functools.partial(fit_top_k, k=top_k))
        if packing:
            keys = LM_KEYS + (TARGET_KEYS if top_k is not None else ())
            ds = packer(ds, keys, sequence_len, num_bins=STREAM_PACKING_BINS)
        elif lm:
            ds = ds.map(single_segment)
        ds = ds.batch(micro_batch_size, batch_fn=FixedBatch(collate_fn, micro_batch_size, sequence_len))
        return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=PREFETCH_BATCHES)

    evals, eval_report = _eval_examples(settings, tokenizer, kind, make_processor, measure, top_k)
    if lm:
        evals = pack(evals, sequence_len) if packing else [single_segment(e) for e in evals]
    if eval_report is not None:
        eval_report.sequences, eval_report.sequence_len = len(evals), sequence_len if packing else 0
    eval_batch_size = int(settings.eval_batch_size)
    eval_batches = None
    if evals:
        eval_batches = MicroBatches(
            evals,
            batch_size=eval_batch_size,
            shard_index=shard_index,
            shard_count=shard_count,
            sequence_len=sequence_len,
            fixed_length=fixed_length,
            seed=None,
            **(batching or {}),
        )
    return StreamingData(
        make_train,
        evals=eval_batches,
        eval_report=eval_report,
        micro_batch_size=micro_batch_size,
        eval_batch_size=eval_batch_size,
        shard_index=shard_index,
        shard_count=shard_count,
        sequence_len=sequence_len,
        top_k=top_k,
    )


def _eval_examples(
    settings: DataSettings,
    tokenizer: PreTrainedTokenizerBase,
    kind: str,
    make_processor: Callable,
    measure: Callable[[Example], tuple[int, int, int]],
    top_k: int | None,
) -> tuple[list[Example], DataReport | None]:
    """``test_datasets`` examples (map-style, in row order) and their report; KD: cut to ``top_k``."""
    if not settings.test_datasets:
        return [], None
    report = DataReport("eval")
    rows = formatted_rows(settings, tokenizer, "test_datasets", make_processor, kind)
    strategy = settings.excess_length_strategy
    evals = process_rows(rows, report, strategy, measure, int(settings.dataset_processes))
    report.check(float(settings.max_bad_row_fraction))
    if top_k is not None:
        evals = [fit_top_k(e, top_k) if "target_token_ids" in e else e for e in evals]
    return evals, report
