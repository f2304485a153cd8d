"""The output directory of a teacher pass (``python -m jaxpref.teacher``) and the KD rows in it.

The shard plan, the run fingerprint and per-shard counts under ``.teacher/`` (what makes a killed run
resume), atomic writes, the token-aligned ``target_token_ids``/``logprobs`` columns of a row, and
``teacher_info.json`` with the KD dataset entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from jaxpref.errors import ConfigError

logger = logging.getLogger("jaxpref")

INFO_FILE = "teacher_info.json"
STATE_DIR = ".teacher"
RUN_FILE = "run.json"
LOGPROBS_FIELD = "logprobs"
IDS_FIELD = "target_token_ids"
# Dataset-entry keys that decide how a row is tokenized: copied into the KD entry of teacher_info.json.
TOKENIZATION_KEYS = (
    "field_messages",
    "field_system",
    "message_property_mappings",
    "roles",
    "roles_to_train",
    "train_on_eos",
    "train_on_eot",
    "drop_system_message",
    "chat_template",
)
# Top-level keys whose change changes the output (the fingerprint of a teacher run).
FINGERPRINT_KEYS = (
    "kd_teacher_model",
    "kd_teacher_top_k",
    "kd_teacher_dtype",
    "param_dtype",
    "compute_dtype",
    "teacher_temperature",
    "teacher_shard_rows",
    "teacher_format",
    "teacher_positions",
    "tokenizer_config",
    "base_model",
    "chat_template",
    "chat_template_jinja",
    "eot_tokens",
    "special_tokens",
    "sequence_len",
    "excess_length_strategy",
    "train_on_inputs",
    "datasets",
)


@dataclasses.dataclass(frozen=True)
class Shard:
    """Input rows ``[start, stop)`` of dataset entry ``entry``, written as shard file number ``index``."""

    index: int
    entry: int
    start: int
    stop: int

    def file_name(self, fmt: str) -> str:
        return f"part-{self.index:05d}.{fmt}"

    def stats_name(self) -> str:
        return f"part-{self.index:05d}.json"


def plan_shards(entry_rows: Sequence[int], rows_per_shard: int) -> list[Shard]:
    """Consecutive shards of at most ``rows_per_shard`` rows per entry, numbered across entries."""
    shards: list[Shard] = []
    for entry, n in enumerate(entry_rows):
        for start in range(0, n, rows_per_shard):
            shards.append(Shard(len(shards), entry, start, min(n, start + rows_per_shard)))
    return shards


def shard_done(out: Path, shard: Shard) -> bool:
    """A shard is done when its counts are in ``.teacher/`` and its file (if it has rows) exists."""
    path = out / STATE_DIR / shard.stats_name()
    if not path.is_file():
        return False
    try:
        file = json.loads(path.read_text()).get("file")
    except (OSError, ValueError):
        return False
    return file is None or (out / file).is_file()


# ----------------------------------------------------------------------------------------- state


def fingerprint(cfg: Any, teacher_dir: str) -> dict[str, Any]:
    """What decides the output: the config keys of :data:`FINGERPRINT_KEYS` (JSON) plus a hash of the
    teacher's ``config.json``. Execution settings (``micro_batch_size``, ``mesh``) are not part of it."""
    data = cfg.model_dump(mode="json")
    out = {k: data.get(k) for k in FINGERPRINT_KEYS}
    config_json = Path(teacher_dir) / "config.json"
    out["teacher_config_sha256"] = (
        hashlib.sha256(config_json.read_bytes()).hexdigest() if config_json.is_file() else None
    )
    return out


def prepare_output_dir(out: Path, run: dict[str, Any]) -> None:
    """Create ``out`` (ConfigError if it is not writable) and record or compare the run fingerprint.

    A different fingerprint is an error once a shard has been written; before that (a run that failed
    while loading) the new config simply replaces the record."""
    try:
        (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
        probe = out / STATE_DIR / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"teacher_output_dir: cannot write to {out} ({exc.strerror or exc}); choose a writable directory."
        ) from exc
    path = out / STATE_DIR / RUN_FILE
    started = any((out / STATE_DIR).glob("part-*.json"))  # a shard was written: the record counts
    if not path.is_file() and any(out.glob("part-*")):
        raise ConfigError(
            f"teacher_output_dir {out} holds part-* files that no teacher pass recorded; choose an empty "
            "or new directory."
        )
    if path.is_file() and started:
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = None
        if previous != run:
            changed = sorted(k for k in set(run) | set(previous or {}) if (previous or {}).get(k) != run.get(k))
            raise ConfigError(
                f"teacher_output_dir {out} holds the output of a teacher pass with a different config "
                f"(changed: {', '.join(changed) or 'unreadable run record'}). Rerun with the same config to "
                "resume it, or choose another teacher_output_dir (or delete that one) to start over."
            )
    else:
        atomic_write_text(path, json.dumps(run, indent=1, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------- files


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_rows_atomic(rows: list[dict[str, Any]], path: Path) -> None:
    """Write KD rows to ``path`` (.jsonl or .parquet) through a temporary file in the same directory."""
    from jaxpref.data.formats.kd import write_kd_dataset

    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    write_kd_dataset(rows, tmp)
    os.replace(tmp, path)


def shortest_float32(values: np.ndarray) -> np.ndarray:
    """Float64 copies of float32 ``values`` holding the shortest decimal that reads back to the same
    float32 (what ``str(np.float32(x))`` prints), so JSON writes about 9 characters per value, not 18.

    Vectorised: for 6, 7, 8, 9 significant digits, ``rint(x * 10^d) / 10^d`` is the double nearest
    to that decimal (both operands are exact, IEEE division rounds correctly), kept where it reads back
    as ``x``; 9 digits always do. Values below 1e-14 in magnitude (10^d no longer exact) go through
    ``str`` one by one; non-finite values are kept as they are.
    """
    x = np.asarray(values, dtype=np.float32).ravel()
    out = x.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        exponent = np.floor(np.log10(np.abs(out)))
        # powers of ten up to 1e22 are exact doubles: |x| in [1e-14, 1e22) here, the rest one by one
        fast = np.isfinite(x) & (x != 0) & (exponent >= -14) & (exponent < 22)
        slow = np.flatnonzero(np.isfinite(x) & (x != 0) & ~fast)
        out[slow] = [float(str(v)) for v in x[slow]]
        idx = np.flatnonzero(fast)
        exponent = exponent[idx]
        # 6 digits first: a shorter decimal (-1.5) is found there too, as the repr of the double
        for digits in range(6, 10):
            places = (digits - 1 - exponent).astype(np.int64)
            scale = 10.0 ** np.abs(places)
            v = out[idx]
            candidate = np.where(places >= 0, np.rint(v * scale) / scale, np.rint(v / scale) * scale)
            hit = candidate.astype(np.float32) == x[idx]
            out[idx[hit]] = candidate[hit]
            idx, exponent = idx[~hit], exponent[~hit]
            if not len(idx):
                break
    return out.reshape(np.shape(values))


def teacher_columns(
    ids: np.ndarray, logprobs: np.ndarray, store: np.ndarray
) -> tuple[list[list[int] | None], list[list[float] | None]]:
    """Token-aligned row lists from one row's prediction-aligned top-k.

    ``ids``/``logprobs``: [L, K] where entry t is the teacher's top-k for token t + 1 (the prediction
    at position t; entry L - 1 is unused); ``store``: [L] bool, token i gets a row. Returns the
    ``target_token_ids`` and log-prob columns [L][K], row 0 and unstored tokens null; the log-probs as
    :func:`shortest_float32` decimals of their float32 values.
    """
    length = len(store)
    id_rows = np.asarray(ids)[: length - 1].tolist()
    lp_rows = shortest_float32(np.asarray(logprobs)[: length - 1]).tolist()
    out_ids: list[list[int] | None] = [None] * length
    out_lps: list[list[float] | None] = [None] * length
    for i in np.flatnonzero(store[1:]).tolist():
        out_ids[i + 1] = id_rows[i]
        out_lps[i + 1] = lp_rows[i]
    return out_ids, out_lps


# ----------------------------------------------------------------------------------------- reports


def report_dict(report: Any) -> dict[str, Any]:
    """The counts of a shard's ``DataReport``, as stored in ``.teacher/part-NNNNN.json``."""
    return {
        "rows_in": report.rows_in,
        "rows_out": report.rows_out,
        "dropped": dict(sorted(report.dropped.items())),
        "examples": dict(sorted(report.examples.items())),
        "tokens": report.tokens,
        "trainable_tokens": report.trainable_tokens,
        "max_length": report.max_length,
    }


def merge_reports(stats: Sequence[dict[str, Any]], name: str = "teacher") -> Any:
    """One ``DataReport`` of the shard counts ``stats`` (:func:`report_dict`)."""
    from jaxpref.data.report import DataReport

    total = DataReport(name)
    for s in stats:
        total.rows_in += s["rows_in"]
        total.rows_out += s["rows_out"]
        for reason, count in s["dropped"].items():
            total.dropped[reason] = total.dropped.get(reason, 0) + count
            total.examples.setdefault(reason, s["examples"][reason])
        total.tokens += s["tokens"]
        total.trainable_tokens += s["trainable_tokens"]
        total.max_length = max(total.max_length, s["max_length"])
    return total


def dataset_entry(cfg: Any, entry: Any, files: list[str]) -> dict[str, Any]:
    """The KD ``datasets:`` entry for the shards of one input entry (pasted into a KD config)."""
    given = entry.model_dump(mode="json", exclude_unset=True)
    out: dict[str, Any] = {"data_files": files if len(files) != 1 else files[0], "ds_type": cfg.teacher_format}
    out["type"] = "chat_template"
    out.update({k: given[k] for k in TOKENIZATION_KEYS if k in given})
    out.update({"logprobs_field": LOGPROBS_FIELD, "temperature": cfg.teacher_temperature})
    out["logprobs_alignment"] = "token"
    return out


def maybe_write_info(
    cfg: Any, out: Path, shards: list[Shard], entries: list[Any], teacher_dir: str, tokenizer: Any
) -> dict[str, Any] | None:
    """Write ``teacher_info.json`` once every shard is done (by whichever process finishes last)."""
    missing = [s for s in shards if not shard_done(out, s)]
    if missing:
        logger.info(
            "%d of %d shards are not written yet; teacher_info.json follows when they are", len(missing), len(shards)
        )
        return None
    stats = [json.loads((out / STATE_DIR / s.stats_name()).read_text()) for s in shards]
    total = merge_reports(stats)
    files_by_entry: dict[int, list[str]] = {}
    for s in stats:
        if s["file"]:
            files_by_entry.setdefault(s["entry"], []).append(os.path.join(cfg.teacher_output_dir, s["file"]))
    if len(files_by_entry) == 1:  # one input entry: every shard file is its
        files_by_entry = {
            k: [os.path.join(cfg.teacher_output_dir, f"part-*.{cfg.teacher_format}")] for k in files_by_entry
        }
    kd_entries = [
        dataset_entry(cfg, entry, files_by_entry[i]) for i, entry in enumerate(entries) if files_by_entry.get(i)
    ]
    info = {
        "teacher": str(cfg.kd_teacher_model),
        "teacher_dtype": cfg.kd_teacher_dtype or cfg.param_dtype,
        "top_k": cfg.kd_teacher_top_k,
        "temperature": cfg.teacher_temperature,
        "tokenizer": str(cfg.tokenizer_config or cfg.base_model),
        "chat_template": cfg.chat_template,  # the KD run needs the same (and the same train_on_inputs)
        "train_on_inputs": cfg.train_on_inputs,
        "vocab_size": len(tokenizer),
        "sequence_len": cfg.sequence_len,
        "positions": cfg.teacher_positions,
        "alignment": "token: row i is the distribution over token i given tokens < i; row 0 is null",
        "format": cfg.teacher_format,
        "files": [s["file"] for s in stats if s["file"]],
        "rows_in": total.rows_in,
        "rows_out": total.rows_out,
        "rows_dropped": total.rows_dropped,
        "dropped": dict(sorted(total.dropped.items())),
        "tokens": total.tokens,
        "trainable_tokens": total.trainable_tokens,
        "datasets": kd_entries,
        "kd_config_snippet": yaml.safe_dump({"datasets": kd_entries}, sort_keys=False),
    }
    atomic_write_text(out / INFO_FILE, json.dumps(info, indent=1) + "\n")
    logger.info(total.summary())
    logger.info("wrote %s; KD config entry:\n%s", out / INFO_FILE, info["kd_config_snippet"])
    total.check(cfg.max_bad_row_fraction)
    return info
