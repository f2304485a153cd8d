"""``dataset_exact_deduplication``: drop rows whose example equals an earlier one (axolotl semantics).

axolotl hashes rows *after* its per-row step: for SFT (and KD) the tokenized rows (``input_ids``,
``labels``, KD targets), after long rows were dropped or truncated; for preference data the formatted
rows (prompt, chosen, rejected strings), which TRL tokenizes later. jaxpref hashes the result of its
per-row step, the example, in both cases: every array of it (SFT/KD: ``input_ids``, ``labels``,
``loss_mask`` and the teacher targets; pairs: prompt + chosen and prompt + rejected ids and masks; KTO:
prompt, completion, label). Two rows are duplicates when their examples are identical, so rows that
differ only in columns the format does not read, or whose difference a truncation cut off, are
duplicates; rows with the same text but other trainable tokens (``roles_to_train``) are not.

The first occurrence in the shuffled row order is kept. Which sets are compared (as axolotl):

* within the training set, and within the eval set;
* a ``val_set_size`` eval split against the training set (axolotl deduplicates before splitting, so
  the two never share a row);
* ``test_datasets`` against the training set for preference data only (axolotl's RL loader does
  this; its SFT loader leaves ``test_datasets`` overlapping the training data as given).

A removed row is counted in the split's report under ``duplicate`` (not a bad row: it does not count
against ``max_bad_row_fraction``).
"""

from __future__ import annotations

import hashlib

import numpy as np

from jaxpref.data.formats import Example

REASON = "duplicate"


def example_digest(example: Example) -> bytes:
    """SHA-256 over every array of an example: key, dtype, shape and bytes (key order ignored)."""
    h = hashlib.sha256()
    for key in sorted(example):
        value = np.ascontiguousarray(example[key])
        h.update(key.encode())
        h.update(f"|{value.dtype.str}|{value.shape}|".encode())
        h.update(value.tobytes())
    return h.digest()


class ExactDuplicates:
    """The digests of the examples kept so far; :meth:`first` says whether an example is new.

    ``seen`` starts the set (another split's digests: an eval set deduplicated against training).
    """

    def __init__(self, seen: set[bytes] | None = None):
        self.seen: set[bytes] = set(seen or ())

    def first(self, example: Example) -> bool:
        """True (and remembered) the first time an example is seen; False for a duplicate."""
        digest = example_digest(example)
        if digest in self.seen:
            return False
        self.seen.add(digest)
        return True


def summary(example: Example) -> dict[str, list[int]]:
    """What the report shows of a duplicate (its raw row stays in the worker): its token ids."""
    return {k: np.asarray(v).tolist() for k, v in example.items() if k.endswith("input_ids") or k.endswith("_ids")}
