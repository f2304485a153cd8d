"""The bad-row report: rows in/out, drops per reason with one example each, token counts."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from jaxpref.errors import DataError

_EXAMPLE_CHARS = 300
# Drop reasons that are not bad rows: counted and shown like the others, but not in ``bad_fraction``
# (a dataset that repeats rows is not broken; ``dataset_exact_deduplication`` removes the repeats).
NOT_BAD = frozenset({"duplicate"})


def _short(row: Any) -> str:
    try:
        text = json.dumps(row, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(row)
    return text if len(text) <= _EXAMPLE_CHARS else text[:_EXAMPLE_CHARS] + "..."


@dataclass
class DataReport:
    """Counts for one split (``name``: "train" or "eval").

    ``tokens``: tokens of the kept rows (after truncation), template tokens included;
    ``trainable_tokens``: positions whose ``loss_mask`` is set (what the loss averages over);
    ``sequences``: examples after packing (= ``rows_out`` without packing), ``sequence_len`` their
    length (0 without packing); ``examples``: the first
    dropped row of each reason, as ``"<detail> | <row as JSON, shortened>"``.
    """

    name: str = "train"
    rows_in: int = 0
    rows_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)
    truncated: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    max_length: int = 0
    sequences: int = 0
    sequence_len: int = 0

    def keep(self, length: int, trainable: int, *, truncated: bool = False, tokens: int | None = None) -> None:
        """A kept row: ``length`` its longest sequence, ``tokens`` all its tokens (default ``length``;
        a preference pair has two sequences)."""
        self.rows_in += 1
        self.rows_out += 1
        self.truncated += int(truncated)
        self.tokens += length if tokens is None else tokens
        self.trainable_tokens += trainable
        self.max_length = max(self.max_length, length)

    def drop(self, reason: str, detail: str, row: Any) -> None:
        self.rows_in += 1
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if reason not in self.examples:
            self.examples[reason] = f"{detail} | {_short(row)}" if detail else _short(row)

    @property
    def rows_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def bad_rows(self) -> int:
        """Dropped rows that were unusable (every reason but those of :data:`NOT_BAD`)."""
        return sum(n for reason, n in self.dropped.items() if reason not in NOT_BAD)

    @property
    def bad_fraction(self) -> float:
        return self.bad_rows / self.rows_in if self.rows_in else 0.0

    def summary(self) -> str:
        """A few human-readable lines (the CLI and ``jaxpref.preprocess`` print them)."""
        lines = [
            f"{self.name}: {self.rows_in} rows in, {self.rows_out} kept, {self.rows_dropped} dropped"
            + (f", {self.truncated} truncated" if self.truncated else ""),
            f"  tokens {self.tokens} (trainable {self.trainable_tokens}), longest row {self.max_length}",
        ]
        if self.sequences and self.sequence_len:
            fill = self.tokens / (self.sequences * self.sequence_len)
            lines.append(f"  {self.sequences} sequences of {self.sequence_len} tokens, {fill:.1%} filled")
        for reason, count in sorted(self.dropped.items(), key=lambda kv: -kv[1]):
            lines.append(f"  dropped {count} x {reason}, e.g. {self.examples[reason]}")
        return "\n".join(lines)

    def check(self, max_bad_row_fraction: float) -> None:
        """:class:`DataError` if no row is left or more than ``max_bad_row_fraction`` of them were dropped."""
        if self.rows_in == 0:
            raise DataError(f"The {self.name} set is empty: the datasets have no rows")
        if self.rows_out == 0 or self.bad_fraction > max_bad_row_fraction:
            raise DataError(
                f"{self.bad_rows} of {self.rows_in} {self.name} rows ({self.bad_fraction:.0%}) are "
                f"unusable, more than max_bad_row_fraction={max_bad_row_fraction}. Check the dataset `type` "
                f"and field names against the rows, and sequence_len.\n{self.summary()}"
            )
