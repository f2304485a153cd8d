"""KD row format: ``chat_template`` conversations with the teacher's top-k log-probs per token.

Registered as kind ``"kd"``: ``chat_template`` and axolotl's ``axolotl.integrations.kd.chat_template``
(``.load``) and ``...chat_template.load_legacy``. A run reads its datasets as kind ``kd`` (see
:func:`lm_kind`) with ``kd_trainer: true`` / ``objective: kd``, or when an entry names an axolotl KD
type. The two axolotl versions disagree about which loader reads which layout, so every name reads
both, told apart per row:

* (a) ``<logprobs_field>``: P positions, each null or a list of ``{"token": "token_id:<int>",
  "logprob": float}`` (vLLM ``prompt_logprobs`` with token ids; a position may hold K+1 entries);
* (b) ``target_token_ids`` [P][K] (int) plus ``<logprobs_field>`` [P][K] (float); positions may be
  null. Used when the row has a non-null ``target_token_ids``.

``logprobs_field`` defaults to ``logprobs`` (axolotl's default). Dataset keys: ``temperature`` (T_gen,
the temperature the log-probs were produced at; default 1) and ``logprobs_alignment``: ``token``
(default; P = L rows, row i over token i, row 0 ignored, as vLLM returns it with a leading null) or
``prediction`` (row t over token t + 1; P = L - 1, or L with an ignored last row). The conversation is
tokenized exactly as ``type: chat_template`` does (same keys), so the teacher must have scored the
same rendered text with the same tokenizer. What happens to the parsed rows is in ``kd_targets.py``.

:func:`kd_row`, :func:`write_kd_dataset` and :func:`read_kd_dataset` write and read format (b)
(Parquet or JSON lines), for producers of KD data such as a teacher pass.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from jaxpref.data._cfg import opt
from jaxpref.data.formats import BadRow, Example, register_format
from jaxpref.data.formats.sft import ChatTemplateFormat
from jaxpref.data.kd_targets import teacher_targets
from jaxpref.data.settings import DataSettings
from jaxpref.errors import ConfigError, DataError

KD_TYPES = (
    "axolotl.integrations.kd.chat_template",
    "axolotl.integrations.kd.chat_template.load",
    "axolotl.integrations.kd.chat_template.load_legacy",
)
DEFAULT_LOGPROBS_FIELD = "logprobs"  # axolotl's default
IDS_FIELD = "target_token_ids"
TOKEN_PREFIX = "token_id:"
ALIGNMENTS = ("token", "prediction")


@dataclass(frozen=True)
class TeacherRows:
    """A row's teacher entries as stored, padded to the widest position: [P, M] arrays."""

    token_ids: np.ndarray  # int64
    logprobs: np.ndarray  # float64
    valid: np.ndarray  # bool; False for padding and null positions

    @property
    def counts(self) -> np.ndarray:
        """Entries per position, [P]."""
        return self.valid.sum(axis=-1)


def _dense(counts: Sequence[int], ids: np.ndarray, logprobs: np.ndarray) -> TeacherRows:
    """[P, M] arrays from entries per position and the flat entries in position order."""
    counts_arr = np.asarray(counts, dtype=np.int64)
    width = int(counts_arr.max()) if len(counts_arr) else 0
    valid = np.arange(width) < counts_arr[:, None]
    token_ids = np.zeros((len(counts_arr), width), dtype=np.int64)
    values = np.zeros((len(counts_arr), width), dtype=np.float64)
    token_ids[valid] = ids
    values[valid] = logprobs
    return TeacherRows(token_ids, values, valid)


def _positions(row: dict[str, Any], field: str) -> list[Any]:
    value = row.get(field)
    if value is None:
        raise BadRow("missing_field", f"no {field!r} field")
    if not isinstance(value, (list, tuple)):
        raise BadRow("kd_malformed_teacher_row", f"{field!r} is a {type(value).__name__}, not a list of positions")
    return list(value)


def _token_ids(tokens: list[Any]) -> np.ndarray:
    """``"token_id:<int>"`` strings -> int64 [N]; ValueError on any other string.

    Parsed with numpy over the joined bytes: ``int()`` per entry would be a third of the time of a
    1k-token top-32 row.
    """
    n = len(tokens)
    try:
        text = "\0".join(tokens)
    except TypeError:
        raise ValueError("a teacher token is not a string") from None
    if text.count(TOKEN_PREFIX) != n or ("\0" + text).count("\0" + TOKEN_PREFIX) != n:
        bad = next((t for t in tokens if not t.startswith(TOKEN_PREFIX)), "")
        raise ValueError(f"token {bad!r} is not 'token_id:<int>'")
    if not n:
        return np.zeros(0, dtype=np.int64)
    buf = np.frombuffer(text.replace(TOKEN_PREFIX, "").encode("utf-8"), dtype=np.uint8)
    sep = buf == 0
    ends = np.flatnonzero(np.append(sep, True))  # one past each token's last digit
    starts = np.append(0, ends[:-1] + 1)
    digits = buf.astype(np.int64) - ord("0")
    if len(ends) != n or not 1 <= (ends - starts).min() <= (ends - starts).max() <= 18:
        raise ValueError("a teacher token id is empty or too long")
    if ((digits[~sep] < 0) | (digits[~sep] > 9)).any():
        raise ValueError("a teacher token id is not a decimal integer")
    place = ends[np.cumsum(sep)] - np.arange(len(buf)) - 1  # digits to the token's end (separators: 0 digit)
    return np.add.reduceat(np.where(sep, 0, digits) * 10**place, starts)


def parse_teacher(row: dict[str, Any], logprobs_field: str = DEFAULT_LOGPROBS_FIELD) -> TeacherRows:
    """Parse a row's teacher entries, format (b) when it has ``target_token_ids``, else (a).

    Raises :class:`BadRow` (``missing_field``, ``kd_malformed_teacher_row``).
    """
    try:
        if row.get(IDS_FIELD) is not None:
            id_rows, lp_rows = _positions(row, IDS_FIELD), _positions(row, logprobs_field)
            if len(id_rows) != len(lp_rows):
                raise ValueError(f"{len(id_rows)} rows of {IDS_FIELD} but {len(lp_rows)} of {logprobs_field}")
            counts = [len(r) if r else 0 for r in id_rows]
            if counts != [len(r) if r else 0 for r in lp_rows]:
                raise ValueError(f"{IDS_FIELD} and {logprobs_field} differ in entries per position")
            ids = np.array([x for r in id_rows if r for x in r], dtype=np.int64)
            return _dense(counts, ids, np.array([x for r in lp_rows if r for x in r], dtype=np.float64))
        positions = _positions(row, logprobs_field)
        entries = [e for p in positions if p for e in p]
        ids = _token_ids([e["token"] for e in entries])
        values = np.array([e["logprob"] for e in entries], dtype=np.float64)
        return _dense([len(p) if p else 0 for p in positions], ids, values)
    except BadRow:
        raise
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise BadRow("kd_malformed_teacher_row", f"{type(e).__name__}: {e}") from None


def token_aligned(teacher: TeacherRows, length: int, alignment: str) -> TeacherRows:
    """Teacher rows as token-aligned [length, M] arrays, row 0 empty; ``kd_length_mismatch`` otherwise."""
    p = len(teacher.valid)
    if alignment == "token":
        if p != length:
            raise BadRow("kd_length_mismatch", f"{p} teacher rows for {length} tokens (token-aligned: one per token)")
        keep = slice(1, length)
    else:
        if p not in (length - 1, length):
            raise BadRow(
                "kd_length_mismatch", f"{p} teacher rows for {length} tokens (prediction-aligned: {length - 1})"
            )
        keep = slice(0, length - 1)

    def shifted(a: np.ndarray) -> np.ndarray:
        out = np.zeros((length, a.shape[1]), dtype=a.dtype)
        out[1:] = a[keep]
        return out

    return TeacherRows(shifted(teacher.token_ids), shifted(teacher.logprobs), shifted(teacher.valid))


def check_teacher(teacher: TeacherRows, trainable: np.ndarray, vocab_size: int) -> None:
    """Bad-row checks on token-aligned rows: finite values, ids in the vocabulary, no empty trained row."""
    valid = teacher.valid
    if not np.isfinite(teacher.logprobs[valid]).all():
        at = int(np.flatnonzero((~np.isfinite(np.where(valid, teacher.logprobs, 0))).any(axis=-1))[0])
        raise BadRow("kd_nonfinite_logprob", f"a NaN/inf log-prob at token {at}")
    ids = teacher.token_ids[valid]
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
        raise BadRow("kd_token_out_of_vocab", f"teacher token id {bad} outside the vocabulary [0, {vocab_size})")
    empty = ~valid.any(axis=-1)
    empty[0] = False  # row 0 is never used
    trained_empty = np.flatnonzero(empty & trainable)
    if trained_empty.size or not valid.any():
        where = f"at trained token {int(trained_empty[0])}" if trained_empty.size else "at every token"
        raise BadRow("kd_empty_teacher_row", f"no teacher entries {where}")


@register_format("chat_template", *KD_TYPES, kind="kd", needs_chat_template=True)
class KDChatTemplateFormat:
    """``chat_template`` tokenization plus token-aligned ``teacher_*`` [L, K_row] targets.

    Output keys: ``input_ids``, ``trainable`` [L] and ``teacher_token_ids`` int32, ``teacher_logprobs``
    float32 (cut to K_row by value, rescaled by T_gen / T_kd, renormalised), ``teacher_mask`` bool,
    all [L, K_row]. Bad rows: ``kd_malformed_teacher_row``, ``kd_length_mismatch``,
    ``kd_nonfinite_logprob``, ``kd_token_out_of_vocab``, ``kd_empty_teacher_row``, ``missing_field``.
    """

    def __init__(self, ds_cfg: Any, settings: DataSettings, tokenizer: PreTrainedTokenizerBase):
        self.chat = ChatTemplateFormat(ds_cfg, settings, tokenizer)
        self.logprobs_field = opt(ds_cfg, "logprobs_field", DEFAULT_LOGPROBS_FIELD)
        self.alignment = opt(ds_cfg, "logprobs_alignment", "token")
        if self.alignment not in ALIGNMENTS:
            raise ConfigError(f"logprobs_alignment: {self.alignment!r} is not one of {', '.join(ALIGNMENTS)}")
        self.scale = float(opt(ds_cfg, "temperature", 1.0)) / settings.target_temperature
        self.vocab_size = len(tokenizer)

    def __call__(self, row: dict[str, Any]) -> Example:
        example = self.chat(row)
        teacher = token_aligned(parse_teacher(row, self.logprobs_field), len(example["input_ids"]), self.alignment)
        check_teacher(teacher, example["trainable"], self.vocab_size)
        return {**example, **teacher_targets(teacher.token_ids, teacher.logprobs, teacher.valid, scale=self.scale)}


def is_kd_run(settings: DataSettings) -> bool:
    """The config trains with KD (``kd_trainer: true`` or ``objective: kd``)."""
    return bool(settings.kd_trainer) or settings.objective == "kd"


def lm_kind(settings: DataSettings) -> str:
    """``"kd"`` when the run reads teacher targets (a KD run, or an entry of a KD type), else ``"lm"``.

    In a KD run every dataset must be of a ``kd`` type: rows without teacher targets cannot share
    batches with rows that have them. With an online teacher (``kd_teacher_model``) the rows are
    plain chat rows, and so with a teacher server (``kd_online_server_base_url``).
    """
    if settings.teacher_in_run:
        return "lm"  # the teacher makes the targets in the train step, or the server's client adds them
    entries = [*settings.datasets, *settings.test_datasets]
    return "kd" if is_kd_run(settings) or any(opt(e, "type") in KD_TYPES for e in entries) else "lm"


def kd_row(
    messages: list[dict[str, Any]],
    token_ids: Sequence[Sequence[int] | None] | np.ndarray,
    logprobs: Sequence[Sequence[float] | None] | np.ndarray,
    *,
    logprobs_field: str = DEFAULT_LOGPROBS_FIELD,
    **extra: Any,
) -> dict[str, Any]:
    """One format-(b) row: ``messages``, ``target_token_ids`` [P][K] and ``<logprobs_field>`` [P][K].

    Rows of ``token_ids``/``logprobs`` may be None (no entries at that position). ``extra`` columns
    are kept as given.
    """

    def as_lists(rows: Any, cast: type) -> list[list[Any] | None]:
        return [None if r is None else [cast(x) for x in np.asarray(r).tolist()] for r in rows]

    return {
        "messages": messages,
        IDS_FIELD: as_lists(token_ids, int),
        logprobs_field: as_lists(logprobs, float),
        **extra,
    }


def write_kd_dataset(rows: Iterable[dict[str, Any]], path: str | Path) -> str:
    """Write format-(b) rows (see :func:`kd_row`) to ``path``: ``.parquet``, or ``.jsonl``/``.json`` lines."""
    path = Path(path)
    if path.suffix not in (".parquet", ".jsonl", ".json"):
        raise DataError(f"{path}: write KD data as .parquet or .jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        datasets.Dataset.from_list(list(rows)).to_parquet(str(path))
    else:  # Python's json writes floats exactly (pandas, under Dataset.to_json, keeps 10 digits)
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
    return str(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def read_kd_dataset(path: str | Path, split: str = "train") -> datasets.Dataset:
    """Read a KD dataset file (either format) as the pipeline does; rows parse with :func:`parse_teacher`."""
    from jaxpref.data.sources import load_entry  # lazy: sources is not needed to parse rows

    return load_entry(SimpleNamespace(path=str(path), split=split))
