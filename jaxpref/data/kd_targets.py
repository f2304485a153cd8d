"""KD teacher targets: top-k cut by value, temperature rescale, renormalisation, shift, one K per run.

Shapes: L = tokens of one row, M = entries stored at a position, K = entries kept. All arrays are numpy.

Conventions (SPEC "KD semantics", docs/data.md "KD datasets"):

* A format hands over *token-aligned* teacher rows ``teacher_token_ids`` / ``teacher_logprobs`` /
  ``teacher_mask`` [L, K_row]: row i is the teacher's distribution over token i given tokens < i; row 0
  (nothing predicts token 0) is always empty. Prediction-aligned input is converted by the format.
* Per row (:func:`teacher_targets`): each position keeps its K_row entries with the highest log-prob
  (by value, never by stored position), where K_row is the smallest entry count of the row's non-empty
  positions (vLLM returns K entries, or K+1 when the actual token is outside the top-k); the kept
  log-probs are multiplied by T_gen / T_kd (p ** (T_gen / T_kd)) and renormalised over the kept
  entries, in float64, stored as float32.
* :func:`shift_teacher` (called by the pipeline's ``shift``) makes them prediction-aligned, like the
  labels: ``target_*[t] = teacher_*[t + 1]``; ``target_mask`` = valid entry AND ``loss_mask[t]``.
  Masked entries hold id 0 and log-prob 0.
* :func:`fit_top_k` gives every example of a run the same K (the most common K_row of the kept rows):
  wider rows are cut by value and renormalised again (renormalising a subset of renormalised
  log-probs equals renormalising the subset of the originals), narrower rows are padded with masked
  entries.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from jaxpref.batch_keys import KD_TARGETS

Example = dict[str, np.ndarray]

TEACHER_KEYS = ("teacher_token_ids", "teacher_logprobs", "teacher_mask")
TARGET_KEYS = KD_TARGETS  # the batch keys the teacher rows become


def top_k_by_value(
    token_ids: np.ndarray, logprobs: np.ndarray, valid: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` valid entries with the highest log-prob per position, highest first.

    ``token_ids``, ``logprobs``, ``valid``: [P, M]. Returns [P, k] arrays; positions with fewer than
    ``k`` valid entries are padded with invalid entries (id 0, log-prob 0). Ties keep stored order.
    """
    p, m = logprobs.shape
    if m < k:
        pad = ((0, 0), (0, k - m))
        token_ids, logprobs, valid = np.pad(token_ids, pad), np.pad(logprobs, pad), np.pad(valid, pad)
    order = np.argsort(np.where(valid, -logprobs, np.inf), axis=-1, kind="stable")[:, :k]
    kept = np.take_along_axis(valid, order, axis=-1)
    ids = np.where(kept, np.take_along_axis(token_ids, order, axis=-1), 0)
    lps = np.where(kept, np.take_along_axis(logprobs, order, axis=-1), 0)
    return ids, lps, kept


def renormalize(logprobs: np.ndarray, valid: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """``log_softmax(scale * logprobs)`` over the valid entries of each position (float64 math).

    ``logprobs``, ``valid``: [..., K]; returns float32 [..., K] with 0 at invalid entries.
    ``scale = T_gen / T_kd`` turns p_T_gen into p_T_kd ∝ p ** (T_gen / T_kd).
    """
    a = np.where(valid, logprobs.astype(np.float64) * scale, -np.inf)
    top = a.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)  # positions without valid entries
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = top + np.log(np.exp(a - top).sum(axis=-1, keepdims=True))
        return np.where(valid, a - lse, 0.0).astype(np.float32)


def teacher_targets(
    token_ids: np.ndarray, logprobs: np.ndarray, valid: np.ndarray, *, scale: float
) -> Example:
    """Token-aligned ``teacher_*`` [L, K_row] arrays from parsed rows [L, M] (see the module doc).

    K_row is the smallest entry count among the non-empty positions; the caller has checked that
    at least one position is non-empty.
    """
    counts = valid.sum(axis=-1)
    k = int(counts[counts > 0].min())
    ids, lps, kept = top_k_by_value(token_ids, logprobs, valid, k)
    return {
        "teacher_token_ids": ids.astype(np.int32),
        "teacher_logprobs": renormalize(lps, kept, scale),
        "teacher_mask": kept,
    }


def shift_teacher(example: Example, loss_mask: np.ndarray) -> Example:
    """Token-aligned ``teacher_*`` [L, K] -> prediction-aligned ``target_*`` [L, K].

    ``target_*[t] = teacher_*[t + 1]`` (the prediction made at t is of token t + 1), the last
    position has none; ``target_mask[t] = teacher_mask[t + 1] & loss_mask[t]``; masked entries are
    zeroed. ``loss_mask`` [L] is the already shifted label mask.
    """
    out = {}
    for src, dst in zip(TEACHER_KEYS, TARGET_KEYS):
        value = example[src]
        shifted = np.zeros_like(value)
        shifted[:-1] = value[1:]
        out[dst] = shifted
    mask = out["target_mask"] & loss_mask[:, None]
    out["target_mask"] = mask
    out["target_token_ids"] = np.where(mask, out["target_token_ids"], 0).astype(np.int32)
    out["target_logprobs"] = np.where(mask, out["target_logprobs"], 0).astype(np.float32)
    return out


def most_common_k(widths: Iterable[int]) -> int:
    """The most common of ``widths`` (ties: the smaller)."""
    counts = Counter(widths)
    return min(counts, key=lambda k: (-counts[k], k))


def common_top_k(examples: Sequence[Example]) -> int:
    """The K of a run: the most common target width among ``examples`` (ties: the smaller)."""
    return most_common_k(int(e["target_token_ids"].shape[-1]) for e in examples)


def fit_top_k(example: Example, k: int) -> Example:
    """``example`` with ``target_*`` of width exactly ``k`` (cut by value + renormalised, or padded)."""
    width = example["target_token_ids"].shape[-1]
    if width == k:
        return example
    ids, lps, mask = (example[key] for key in TARGET_KEYS)
    if width > k:
        ids, lps, mask = top_k_by_value(ids, lps, mask, k)
        lps = renormalize(lps, mask)
    else:
        pad = ((0, 0), (0, k - width))
        ids, lps, mask = np.pad(ids, pad), np.pad(lps, pad), np.pad(mask, pad)
    return {**example, "target_token_ids": ids, "target_logprobs": lps, "target_mask": mask}


def fit_common_top_k(*splits: list[Example]) -> tuple[list[Example], ...]:
    """Give every example of every split the same K (:func:`common_top_k` over all of them).

    Splits without KD targets are returned unchanged.
    """
    everything = [e for split in splits for e in split if "target_token_ids" in e]
    if not everything:
        return splits
    k = common_top_k(everything)
    return tuple([fit_top_k(e, k) if "target_token_ids" in e else e for e in split] for split in splits)
