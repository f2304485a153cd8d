"""Packing shifted rows into fixed-length sequences (Grain best-fit), and padding rows into batches.

Every example entering here is *prediction-aligned* (``labels``/``loss_mask`` already shifted inside
its own row), so packing only concatenates whole rows: a label can never point into the next segment,
and each segment's last position is already untrainable.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from jaxpref.data.formats import Example

BUCKET = 64
PACKING_BINS = 256  # open bins of the best-fit packer: more bins, fuller sequences, slower packing


def single_segment(example: Example) -> Example:
    """An unpacked row as one segment: ``segment_ids`` 1, ``positions`` 0..L-1."""
    length = len(example["input_ids"])
    return {
        **example,
        "segment_ids": np.ones(length, dtype=np.int32),
        "positions": np.arange(length, dtype=np.int32),
    }


class PackedSequence:
    """Grain map: a packed sequence of Grain's packer -> ``keys`` + ``segment_ids`` / ``positions`` int32."""

    def __init__(self, keys: Sequence[str]):
        self.keys = tuple(keys)

    def __call__(self, seq: dict[str, np.ndarray]) -> Example:
        item = {k: seq[k] for k in self.keys}
        item["segment_ids"] = seq["input_ids_segment_ids"].astype(np.int32)
        item["positions"] = seq["input_ids_positions"].astype(np.int32)
        return item


def packer(
    rows: grain.IterDataset, keys: Sequence[str], sequence_len: int, *, num_bins: int = PACKING_BINS
) -> grain.IterDataset:
    """Best-fit packing of a stream of rows (each [L <= sequence_len]) into [sequence_len] sequences.

    Output per sequence: ``keys`` padded with 0/False, plus ``segment_ids`` (1, 2, ... per row; 0 =
    padding) and ``positions`` (restart at 0 in each row). Deterministic; checkpointable (Grain keeps
    the parent state at the start of the current packing round and replays it on restore).
    """
    packed = grain.experimental.BestFitPackIterDataset(
        rows, length_struct={k: sequence_len for k in keys}, num_packing_bins=num_bins, shuffle_bins=False
    )
    return packed.map(PackedSequence(keys))


def pack(examples: Sequence[Example], sequence_len: int, *, num_bins: int = PACKING_BINS) -> list[Example]:
    """Pack rows (each [L <= sequence_len]) into [sequence_len] sequences, keeping the input order
    (:func:`packer` over the list)."""
    if not examples:
        return []
    rows = grain.MapDataset.source(examples).to_iter_dataset(grain.ReadOptions(num_threads=0))
    return list(packer(rows, list(examples[0]), sequence_len, num_bins=num_bins))


def bucket_length(max_length: int, sequence_len: int, multiple: int = BUCKET) -> int:
    """Time dimension for a batch whose longest row is ``max_length``: next multiple, capped."""
    return min(sequence_len, max(multiple, -(-max_length // multiple) * multiple))


def collate(rows: Sequence[Example | None], length: int, template: Example) -> dict[str, np.ndarray]:
    """Stack rows into a [B, length, ...] micro-batch with the keys and dtypes of ``template``.

    Shorter rows are padded with zeros (0 ids, False masks, segment 0); ``None`` rows are all padding.
    """
    batch = {k: np.zeros((len(rows), length, *v.shape[1:]), dtype=v.dtype) for k, v in template.items()}
    for b, row in enumerate(rows):
        if row is not None:
            for key, out in batch.items():
                out[b, : len(row[key])] = row[key]
    return batch
