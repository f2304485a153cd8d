"""``python -m jaxpref.teacher --config FILE.yaml [key=value ...]``: write a KD dataset from a teacher.

Reads the chat rows of ``datasets`` (every entry a ``chat_template`` type), tokenizes them exactly as
the SFT/KD pipeline does (``type: chat_template`` with the run's tokenizer, chat template and dataset
keys), runs ``kd_teacher_model`` over them in batches and writes KD rows of format (b)
(docs/data.md "KD datasets", "Teacher pass"): each input row with ``target_token_ids`` [L][K] and
``logprobs`` [L][K] added, *token-aligned* (row i is the teacher's distribution over token i given
the tokens before it; row 0 is null, like vLLM ``prompt_logprobs``), log-probs at temperature
``teacher_temperature`` (T_gen) normalised over the full vocabulary. K = ``kd_teacher_top_k``.

Output, in ``teacher_output_dir``: ``part-NNNNN.jsonl`` (or ``.parquet``) shards of
``teacher_shard_rows`` input rows each (rows of one dataset entry per shard), ``teacher_info.json``
(counts and the dataset entry to paste into a KD config) and ``.teacher/`` (the run's fingerprint and
per-shard counts). Every file is written atomically (temporary file + rename), so a killed run
resumes: a rerun with the same config skips the finished shards and produces byte-identical files; a
different config for an existing directory is an error. Shards are split over processes (process i
of n writes shards i, i + n, ...): either the JAX processes of a multi-host launch (joined through
``jaxpref.distributed`` as ``jaxpref.train`` does; the output directory must be shared), or
independent processes numbered by ``--process_index``/``--process_count``. The last process to
finish writes ``teacher_info.json``. Each process runs the teacher on its own (local) devices with the
config's ``mesh`` (parameters sharded by ``logical_axis_rules``), with no cross-process collective.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: the re-exec restarts the interpreter
    from jaxpref.cli import reexec_with_malloc_tuning

    reexec_with_malloc_tuning()

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

from jaxpref.cli import run_command, setup_logging
from jaxpref.errors import ConfigError, DataError, ModelError

logger = logging.getLogger("jaxpref")

INFO_FILE = "teacher_info.json"
SHARDS_DONE_TIMEOUT_S = 12 * 3600  # multi-host: how long a process waits for the others' last shards
STATE_DIR = ".teacher"
RUN_FILE = "run.json"
LOGPROBS_FIELD = "logprobs"
IDS_FIELD = "target_token_ids"
CHAT_TYPES = ("chat_template",)  # plus the axolotl KD type names (formats/kd.py), same tokenization
NO_TEACHER = (
    "kd_teacher_model: not set; the teacher pass needs the teacher checkpoint (a Hugging Face model "
    "directory or hub id): kd_teacher_model: path/to/teacher in the config, or kd_teacher_model=... on the "
    "command line."
)
# Dataset-entry keys that decide how a row is tokenized: copied into the KD entry of teacher_info.json.
TOKENIZATION_KEYS = (
    "field_messages",
    "field_system",
    "message_property_mappings",
    "roles",
    "roles_to_train",
    "train_on_eos",
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


# ----------------------------------------------------------------------------------------- config


def load_teacher_config(path: str | Path, overrides: Sequence[str] = ()) -> Any:
    """The config of a teacher pass: the normal schema, with keys training needs but this pass does
    not filled in: ``learning_rate`` (0) and ``base_model`` (``kd_teacher_model``; the pass reads only
    the tokenizer from it, and ``tokenizer_config`` comes first)."""
    from jaxpref.config import load_config

    given = _top_level_keys(path) | {o.split("=", 1)[0].split(".", 1)[0] for o in overrides if "=" in o.rstrip("=")}
    if Path(path).is_file() and "kd_teacher_model" not in given:
        raise ConfigError(NO_TEACHER)
    extra = []
    if "learning_rate" not in given:
        extra.append("learning_rate=0")
    if "base_model" not in given and "kd_teacher_model" in given:
        teacher = next((o.split("=", 1)[1] for o in overrides if o.startswith("kd_teacher_model=")), None)
        if teacher is None:
            teacher = _yaml_value(path, "kd_teacher_model")
        if teacher:
            extra.append(f"base_model={teacher}")
    return load_config(path, [*extra, *overrides])


def _top_level_keys(path: str | Path) -> set[str]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return set()  # load_config reports it
    return {k for k, v in data.items() if v is not None} if isinstance(data, dict) else set()


def _yaml_value(path: str | Path, key: str) -> Any:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def check_config(cfg: Any) -> None:
    """ConfigError for a config the teacher pass cannot run (before anything is loaded)."""
    if not cfg.kd_teacher_model:
        raise ConfigError(NO_TEACHER)
    if not cfg.teacher_output_dir:
        raise ConfigError(
            "teacher_output_dir: not set; give the directory the KD dataset is written to "
            "(teacher_output_dir: DIR in the config, or --output DIR)."
        )
    if not cfg.datasets:
        raise ConfigError("datasets: empty; the teacher pass needs at least one dataset of chat rows")
    from jaxpref.data.formats.kd import KD_TYPES

    for i, entry in enumerate(cfg.datasets):
        if entry.type not in (*CHAT_TYPES, *KD_TYPES):
            raise ConfigError(
                f"datasets[{i}].type: {entry.type!r}; the teacher pass reads conversations (type: chat_template), "
                "the only row format KD datasets have."
            )
        if entry.streaming:
            raise ConfigError(f"datasets[{i}].streaming: the teacher pass reads datasets in memory; remove it")


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


def _prepare_output_dir(out: Path, run: dict[str, Any]) -> None:
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
        _atomic_write_text(path, json.dumps(run, indent=1, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------- files


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_rows_atomic(rows: list[dict[str, Any]], path: Path) -> None:
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


# ----------------------------------------------------------------------------------------- teacher


class TeacherRunner:
    """The teacher on a mesh and one jitted forward + top-k per batch shape.

    ``__call__(input_ids [B, T] int32, lengths [B]) -> (ids [B, T, K] int32, logprobs [B, T, K] f32)``,
    entry t of a row is the top-k for the token after t, log-probs at ``temperature`` over the full
    vocabulary (``jaxpref.losses.topk_logprobs``: row blocks, never [B*T, V] at once).
    """

    def __init__(self, model: Any, mesh: Any, k: int, temperature: float, batch_size: int):
        from flax import nnx

        from jaxpref import sharding as shd
        from jaxpref.losses.topk import topk_logprobs

        self.mesh = mesh
        divisor = shd.batch_divisor(mesh)
        self.batch_size = -(-batch_size // divisor) * divisor
        self.sharding = shd.batch_sharding(mesh)
        graphdef, state = nnx.split(model)
        self.state = state

        def forward(state: Any, ids: jax.Array, positions: jax.Array, segment_ids: jax.Array):
            m = nnx.merge(graphdef, state)
            hidden = m(ids, positions=positions, segment_ids=segment_ids, deterministic=True)
            return topk_logprobs(hidden, m.lm_head_weight(), k, temperature=temperature)

        self._forward = jax.jit(forward)

    def dispatch(self, input_ids: np.ndarray, lengths: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """Start the batch on the devices and return at once (JAX dispatches asynchronously)."""
        b, t = input_ids.shape
        segment_ids = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
        positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
        args = [jax.device_put(np.ascontiguousarray(a), self.sharding) for a in (input_ids, positions, segment_ids)]
        with jax.set_mesh(self.mesh):
            return self._forward(self.state, *args)

    def __call__(self, input_ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids, logprobs = self.dispatch(input_ids, lengths)
        return np.asarray(ids), np.asarray(logprobs)


def _batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices of kept rows in batches of similar length (longest first; ties in row order)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


# ----------------------------------------------------------------------------------------- the pass


def _report_dict(report: Any) -> dict[str, Any]:
    return {
        "rows_in": report.rows_in,
        "rows_out": report.rows_out,
        "dropped": dict(sorted(report.dropped.items())),
        "examples": dict(sorted(report.examples.items())),
        "tokens": report.tokens,
        "trainable_tokens": report.trainable_tokens,
        "max_length": report.max_length,
    }


def _merge_reports(stats: Sequence[dict[str, Any]], name: str = "teacher") -> Any:
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


def run_teacher(
    cfg: Any,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    show_progress: bool = True,
    max_shards: int | None = None,
) -> dict[str, Any]:
    """Write the KD dataset of ``cfg`` (see the module doc); returns a summary dict.

    ``max_shards`` stops after writing that many shards in this call (tests of resuming).
    """
    from tqdm import tqdm

    from jaxpref import sharding as shd
    from jaxpref.assembly import build_teacher
    from jaxpref.data import load_tokenizer
    from jaxpref.data.formats import get_format
    from jaxpref.data.pipeline import ProcessRow
    from jaxpref.data.sources import load_entries
    from jaxpref.models.config import resolve_checkpoint_dir

    check_config(cfg)
    explicit = process_index is not None or process_count is not None
    if not explicit:  # launched on several hosts (srun, mpirun, TPU pod, JAX_* env): join, as train does
        from jaxpref import distributed

        distributed.initialize(distributed.settings_from_config(cfg))
    pi = jax.process_index() if process_index is None else int(process_index)
    pn = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= pi < pn:
        raise ConfigError(f"--process_index {pi} is not in [0, --process_count {pn})")
    try:
        teacher_dir = resolve_checkpoint_dir(cfg.kd_teacher_model)
    except ModelError as exc:
        raise ModelError(f"kd_teacher_model: {exc}") from None
    out = Path(cfg.teacher_output_dir)
    _prepare_output_dir(out, fingerprint(cfg, teacher_dir))
    if not explicit:
        from jaxpref import distributed

        distributed.check_shared_directory(out.absolute(), "teacher_output_dir")

    tokenizer = load_tokenizer(cfg)
    if cfg.test_datasets:
        logger.warning("test_datasets are not scored by the teacher pass; give them as datasets in a second pass")
    entries = list(cfg.datasets)
    loaded = load_entries(entries)
    shards = plan_shards([len(ds) for ds in loaded], cfg.teacher_shard_rows)
    if not shards:
        raise DataError("datasets: the datasets have no rows")
    mine = [s for s in shards if s.index % pn == pi]
    todo = [s for s in mine if not shard_done(out, s)]
    logger.info(
        "teacher pass: %d rows in %d shards (%d for process %d of %d, %d already written) -> %s",
        sum(len(ds) for ds in loaded),
        len(shards),
        len(mine),
        pi,
        pn,
        len(mine) - len(todo),
        out,
    )

    strategy = cfg.excess_length_strategy
    if strategy == "truncate":
        logger.warning("excess_length_strategy: truncate is not used by the teacher pass; too long rows are dropped")
    processors = [
        ProcessRow(
            get_format("chat_template", kind="lm", where=f"datasets[{i}]").build(entry, cfg, tokenizer),
            cfg.sequence_len,
            "drop" if strategy == "truncate" else strategy,
        )
        for i, entry in enumerate(entries)
    ]
    done: list[dict[str, Any]] = []
    written = 0
    if todo:
        mesh_sizes = cfg.mesh.model_dump() if cfg.mesh is not None else None
        mesh = shd.make_mesh(mesh_sizes, devices=jax.local_devices())
        teacher = build_teacher(cfg, len(tokenizer), mesh)
        if cfg.kd_teacher_top_k > teacher.config.vocab_size:
            raise ConfigError(
                f"kd_teacher_top_k={cfg.kd_teacher_top_k} exceeds the teacher's vocab_size {teacher.config.vocab_size}"
            )
        runner = TeacherRunner(teacher, mesh, cfg.kd_teacher_top_k, cfg.teacher_temperature, cfg.micro_batch_size)
        del teacher
        logger.info(
            "teacher on %d device(s), mesh %s, %d rows per batch",
            mesh.size,
            dict(mesh.shape),
            runner.batch_size,
        )
        bar = tqdm(
            total=sum(s.stop - s.start for s in todo),
            unit="row",
            desc="teacher",
            disable=not show_progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        try:
            for shard in todo:
                if max_shards is not None and written >= max_shards:
                    break
                done.append(_run_shard(shard, loaded[shard.entry], processors[shard.entry], runner, cfg, out, bar))
                written += 1
        finally:
            bar.close()
        logger.info(_merge_reports(done, "teacher (this run)").summary())
    if not explicit and pn > 1:
        # Leave together: JAX's shutdown barrier at exit is short, and shards take minutes.
        from jaxpref import distributed

        logger.info("waiting for the other processes' shards")
        distributed.barrier("teacher-shards-done", timeout_s=SHARDS_DONE_TIMEOUT_S)
    info = _maybe_write_info(cfg, out, shards, entries, teacher_dir, tokenizer)
    return {"output_dir": str(out), "shards_written": written, "info": info}


def _run_shard(shard: Shard, dataset: Any, processor: Any, runner: TeacherRunner, cfg: Any, out: Path, bar: Any):
    """Tokenize, score and write one shard; returns its counts (also written to ``.teacher/``)."""
    import grain

    from jaxpref.data.packing import bucket_length
    from jaxpref.data.pipeline import account
    from jaxpref.data.report import DataReport
    from jaxpref.data.workers import mapped_rows

    report = DataReport("teacher")
    raw: list[dict[str, Any]] = []
    examples: list[dict[str, np.ndarray]] = []
    # The pipeline's per-row step (format, tokenize, length check), in worker processes when the
    # shard is large enough to pay for them (dataset_processes, workers.py); one record per row, in order.
    rows = grain.MapDataset.range(shard.start, shard.stop).map(dataset.__getitem__).map(processor)
    with mapped_rows(rows, int(cfg.dataset_processes or 1)) as records:
        for i, record in zip(range(shard.start, shard.stop), records, strict=True):
            example = account(record, report, cfg.excess_length_strategy)
            if example is not None:
                raw.append(dataset[i])
                examples.append(example)
    bar.update(report.rows_dropped)
    lengths = [len(e["input_ids"]) for e in examples]
    columns: list[tuple[Any, Any] | None] = [None] * len(examples)

    def collect(batch: list[int], result: tuple[jax.Array, jax.Array]) -> None:
        top_ids, top_lps = (np.asarray(a) for a in result)  # waits for this batch only
        for b, j in enumerate(batch):
            length = lengths[j]
            store = np.ones(length, dtype=bool)
            if cfg.teacher_positions == "trainable":
                store[1:] = examples[j]["loss_mask"][:-1]  # trainable[i] = loss_mask[i - 1]
            columns[j] = teacher_columns(top_ids[b, :length], top_lps[b, :length], store)
        bar.update(len(batch))

    pending = None  # the previous batch: converted on the host while the devices run the next one
    for batch in _batches(lengths, runner.batch_size):
        t = bucket_length(max(lengths[j] for j in batch), cfg.sequence_len)
        ids = np.zeros((runner.batch_size, t), dtype=np.int32)
        lens = np.zeros(runner.batch_size, dtype=np.int32)
        for b, j in enumerate(batch):
            ids[b, : lengths[j]] = examples[j]["input_ids"]
            lens[b] = lengths[j]
        result = runner.dispatch(ids, lens)
        if pending is not None:
            collect(*pending)
        pending = (batch, result)
    if pending is not None:
        collect(*pending)
    rows = [{**row, IDS_FIELD: c[0], LOGPROBS_FIELD: c[1]} for row, c in zip(raw, columns)]
    stats = {"shard": shard.index, "entry": shard.entry, "rows": [shard.start, shard.stop], **_report_dict(report)}
    stats["file"] = shard.file_name(cfg.teacher_format) if rows else None
    if rows:
        _write_rows_atomic(rows, out / stats["file"])
    _atomic_write_text(out / STATE_DIR / shard.stats_name(), json.dumps(stats, indent=1, sort_keys=True) + "\n")
    return stats


def dataset_entry(cfg: Any, entry: Any, files: list[str]) -> dict[str, Any]:
    """The KD ``datasets:`` entry for the shards of one input entry (pasted into a KD config)."""
    given = entry.model_dump(mode="json", exclude_unset=True)
    out: dict[str, Any] = {"data_files": files if len(files) != 1 else files[0], "ds_type": cfg.teacher_format}
    out["type"] = "chat_template"
    out.update({k: given[k] for k in TOKENIZATION_KEYS if k in given})
    out.update({"logprobs_field": LOGPROBS_FIELD, "temperature": cfg.teacher_temperature})
    out["logprobs_alignment"] = "token"
    return out


def _maybe_write_info(
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
    total = _merge_reports(stats)
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
    _atomic_write_text(out / INFO_FILE, json.dumps(info, indent=1) + "\n")
    logger.info(total.summary())
    logger.info("wrote %s; KD config entry:\n%s", out / INFO_FILE, info["kd_config_snippet"])
    total.check(cfg.max_bad_row_fraction)
    return info


# ----------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxpref.teacher", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML config (kd_teacher_model, datasets, kd_teacher_top_k, ...)")
    p.add_argument("--output", help="same as teacher_output_dir=DIR")
    p.add_argument("--process_index", type=int, help="this process's index (default: jax.process_index())")
    p.add_argument("--process_count", type=int, help="number of processes (default: jax.process_count())")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nesting (mesh.tensor=2)")
    return p.parse_intermixed_args(argv)  # flags may follow the key=value overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()

    def command() -> None:
        overrides = list(args.overrides)
        if args.output:
            overrides.append(f"teacher_output_dir={args.output}")
        cfg = load_teacher_config(args.config, overrides)
        run_teacher(
            cfg, process_index=args.process_index, process_count=args.process_count, show_progress=not args.no_progress
        )

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
