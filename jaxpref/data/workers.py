"""Worker processes for the per-row map of the map-style pipeline (``dataset_processes``).

The per-row step (format + tokenize + KD targets + shift, :class:`pipeline.ProcessRow` and
:class:`preference.ProcessPreference`) is Python-bound, so threads do not help; Grain's
``IterDataset.mp_prefetch`` runs it in ``dataset_processes`` spawned processes. Worker ``i`` maps rows
``i, i + n, i + 2n, ...`` and Grain interleaves the workers round-robin, so the records arrive in row
order, exactly as from one process (the map is one record per row: bad rows are :class:`Dropped`
records, not filtered out, so no worker runs ahead of another).

Starting a worker costs seconds (spawn, importing ``jaxpref.data`` with transformers and torch, and
unpickling the pipeline: about 6 s for two workers on a 2-core machine, docs/data.md "Worker
processes"), so small datasets stay in the calling thread: the first :data:`PROBE_ROWS` rows are
always mapped here, and workers take the rest only when mapping it here would take at least
:data:`WORKER_MIN_SECONDS` at the probe's rate.

Pitfalls handled here: Grain reads absl flags (marked parsed when no ``absl.app.run`` did it), the
pipeline is pickled with cloudpickle into spawned processes (everything it holds must be picklable;
a script that builds data must guard its entry point with ``if __name__ == "__main__":``), and the
iterator is closed when the map is done or fails, so no worker outlives it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import grain

log = logging.getLogger(__name__)

PROBE_ROWS = 32  # mapped in the calling thread first, to time a row
WORKER_MIN_SECONDS = 12.0  # about 2x the start-up of two workers: below it, workers cannot pay off
PER_WORKER_BUFFER = 16  # records each worker may hold ready (KD records are ~0.3 MB each)
# Records come back pickled through a pipe, not in shared memory: the examples stay alive for the
# whole run, and one shared-memory segment (a mapping and a /dev/shm file) per array would run into
# the kernel's mapping limit on large datasets.
_NO_SHM = grain.experimental.DatasetOptions(min_shm_size=2**62)


def worker_count(processes: int, rows: int, seconds_per_row: float) -> int:
    """Worker processes for mapping ``rows`` more rows at ``seconds_per_row`` in one thread (0 = none).

    None when ``processes`` <= 1, or when one thread would need less than :data:`WORKER_MIN_SECONDS`.
    """
    if processes <= 1 or rows < 2 or rows * seconds_per_row < WORKER_MIN_SECONDS:
        return 0
    return min(processes, rows)


def _allow_grain_multiprocessing() -> None:
    # Grain reads its absl flags when it starts workers; outside absl.app.run nothing parsed them.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _in_thread(rows: grain.MapDataset) -> grain.DatasetIterator:
    return iter(rows.to_iter_dataset(grain.ReadOptions(num_threads=0)))


@contextlib.contextmanager
def mapped_rows(rows: grain.MapDataset, processes: int) -> Iterator[Iterator[Any]]:
    """Context manager: an iterator over ``rows`` (a MapDataset whose map is the per-row step), in order.

    Uses up to ``processes`` worker processes for the rows after the probe (see the module doc); the
    records are the same, in the same order, whatever the number of processes.
    """
    start = time.perf_counter()
    head = list(_in_thread(rows[:PROBE_ROWS]))  # a list: time the map alone, not its consumer
    seconds_per_row = (time.perf_counter() - start) / max(1, len(head))
    rest = rows[PROBE_ROWS:]
    workers = worker_count(processes, len(rest), seconds_per_row)
    if not workers:
        yield _chain(head, _in_thread(rest))
        return
    log.info("mapping %d rows in %d worker processes (dataset_processes)", len(rest), workers)
    _allow_grain_multiprocessing()
    options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=PER_WORKER_BUFFER)
    ds = grain.experimental.WithOptionsIterDataset(rest.to_iter_dataset(grain.ReadOptions(num_threads=0)), _NO_SHM)
    it = iter(ds.mp_prefetch(options))
    try:
        yield _chain(head, it)
    finally:
        it.close()  # stop the workers now, also when the consumer raised


def _chain(head: list[Any], rest: Iterator[Any]) -> Iterator[Any]:
    yield from head
    yield from rest
