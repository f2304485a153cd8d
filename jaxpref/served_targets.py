"""KD targets from a teacher server, added to micro-batches ahead of the train step.

With ``kd_online_server_base_url`` the data pipeline yields plain SFT micro-batches (chat rows,
tokenized, packed as usual). :class:`ServedTeacherData` wraps that data: its train iterator keeps
``kd_online_concurrency`` micro-batches in flight to the server (one request per micro-batch, one
prompt per packed row), so the step finds its targets ready unless the server is slower than the step.

Each prompt's answer goes through exactly what a stored KD dataset goes through
(``data/kd_targets.py``, ``formats/kd.py``): token-aligned rows (entry 0 empty), the bad-answer checks,
the top-K cut by value, the temperature rescale T_gen / T_kd with T_gen = 1 (a server's prompt
log-probs are at temperature 1, ``teacher_wire``), renormalisation, the shift onto the prediction
positions (``target_*[t]`` = the teacher's distribution of token t + 1) and K = ``kd_online_topk``.
So a run against a server gets the same targets as a run on the dataset ``python -m jaxpref.teacher``
writes for the same teacher at ``teacher_temperature: 1``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxpref.batch_keys import KD_TARGETS
from jaxpref.data.formats import BadRow
from jaxpref.data.formats.kd import check_teacher, token_aligned
from jaxpref.data.kd_targets import fit_top_k, shift_teacher, teacher_targets
from jaxpref.teacher_client import ServerSettings, TeacherClient, TeacherServerError

logger = logging.getLogger("jaxpref")

NumpyBatch = dict[str, np.ndarray]


def segments(batch: NumpyBatch) -> list[tuple[int, slice]]:
    """(row, span) of every packed sequence of a micro-batch: its tokens are ``input_ids[row, span]``."""
    out = []
    for b, seg in enumerate(batch["segment_ids"]):
        ids = np.flatnonzero(seg)
        if not ids.size:
            continue
        starts = np.flatnonzero(np.diff(seg[ids], prepend=-1) != 0)
        ends = np.append(starts[1:], ids.size)
        out.extend((b, slice(int(ids[s]), int(ids[e - 1]) + 1)) for s, e in zip(starts, ends))
    return out


class ServedTargets:
    """Micro-batch -> the same micro-batch plus ``target_*`` [B, T, K] from the teacher server."""

    def __init__(self, client: TeacherClient, k: int, scale: float, vocab_size: int):
        self.client, self.k, self.scale, self.vocab_size = client, k, scale, vocab_size
        self.wait_s = 0.0  # time the caller spent waiting for answers

    def submit(self, batch: NumpyBatch) -> concurrent.futures.Future:
        spans = segments(batch)
        return self.client.submit([batch["input_ids"][b, span] for b, span in spans])

    def complete(self, batch: NumpyBatch, future: concurrent.futures.Future) -> NumpyBatch:
        start = time.perf_counter()
        answers = future.result()
        self.wait_s += time.perf_counter() - start
        b_size, t_len = batch["input_ids"].shape
        out = {
            "target_token_ids": np.zeros((b_size, t_len, self.k), np.int32),
            "target_logprobs": np.zeros((b_size, t_len, self.k), np.float32),
            "target_mask": np.zeros((b_size, t_len, self.k), bool),
        }
        for (b, span), teacher in zip(segments(batch), answers):
            loss_mask = batch["loss_mask"][b, span]
            length = len(loss_mask)
            trainable = np.concatenate([[False], loss_mask[:-1]])  # token i is trained where label i - 1 is
            rows = token_aligned(teacher, length, "token")
            try:
                check_teacher(rows, trainable, self.vocab_size)
            except BadRow as e:
                raise TeacherServerError(
                    f"the teacher server at {self.client.settings.url} answered a prompt of {length} tokens with "
                    f"unusable log-probs ({e.reason}: {e.detail}); is it serving the student's tokenizer?"
                ) from None
            example = teacher_targets(rows.token_ids, rows.logprobs, rows.valid, scale=self.scale)
            example = fit_top_k(shift_teacher(example, loss_mask), self.k)
            for key in KD_TARGETS:
                out[key][b, span] = example[key]
        return {**batch, **out}

    def __call__(self, batch: NumpyBatch) -> NumpyBatch:
        return self.complete(batch, self.submit(batch))


class PrefetchIterator:
    """The train iterator of :class:`ServedTeacherData`: ``depth`` micro-batches in flight.

    ``get_state`` is the state of the underlying iterator before the first micro-batch not yet
    returned, so a checkpoint resumes at the next untrained micro-batch (what is in flight is asked
    again).
    """

    def __init__(self, inner: Any, targets: ServedTargets, depth: int):
        self.inner, self.targets, self.depth = inner, targets, max(1, depth)
        self._ahead: collections.deque = collections.deque()  # (state before, batch, future)
        self._exhausted = False

    def __iter__(self) -> Iterator[NumpyBatch]:
        return self

    def _fill(self) -> None:
        while not self._exhausted and len(self._ahead) < self.depth:
            state = self.inner.get_state()
            try:
                batch = next(self.inner)
            except StopIteration:
                self._exhausted = True
                return
            self._ahead.append((state, batch, self.targets.submit(batch)))

    def __next__(self) -> NumpyBatch:
        self._fill()
        if not self._ahead:
            raise StopIteration
        _, batch, future = self._ahead.popleft()
        out = self.targets.complete(batch, future)
        self._fill()  # the next request goes out before the step runs
        return out

    def get_state(self) -> Any:
        return self._ahead[0][0] if self._ahead else self.inner.get_state()

    def set_state(self, state: Any) -> None:
        for _, _, future in self._ahead:
            future.cancel()
        self._ahead.clear()
        self._exhausted = False
        self.inner.set_state(state)


class ServedTeacherData:
    """LM data (``data.lm.build_lm_data``) whose micro-batches get their KD targets from a server.

    Same interface as the data it wraps (``train_iterator``, ``eval_batches``, ``report``, ...).
    """

    def __init__(self, data: Any, settings: ServerSettings, *, scale: float, vocab_size: int):
        self.data = data
        self.settings = settings
        self.client = TeacherClient(settings)
        self.targets = ServedTargets(self.client, settings.top_k, scale, vocab_size)
        self._eval: list[NumpyBatch] | None = None

    def __getattr__(self, name: str) -> Any:  # report, eval_report, micro_batches_per_epoch, has_eval, ...
        return getattr(self.data, name)

    def train_iterator(self, num_epochs: float | None = 1, *, with_targets: bool = True) -> Any:
        """The micro-batches with targets asked ahead; ``with_targets=False``: the plain ones (when every
        step is rebuilt on-policy, the data's own rows are never trained on)."""
        inner = self.data.train_iterator(num_epochs)
        return PrefetchIterator(inner, self.targets, self.settings.concurrency) if with_targets else inner

    def eval_batches(self) -> list[NumpyBatch]:
        """The eval micro-batches with targets (asked once, all in flight together, then kept)."""
        if self._eval is None:
            batches = list(self.data.eval_batches())
            futures = [self.targets.submit(b) for b in batches]
            self._eval = [self.targets.complete(b, f) for b, f in zip(batches, futures)]
        return self._eval

    def close(self) -> None:
        if self.targets.wait_s:
            logger.info("waited %.1f s in all for the teacher server's answers", self.targets.wait_s)
        self.client.close()
