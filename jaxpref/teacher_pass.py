"""The teacher pass of ``python -m jaxpref.teacher``: the teacher over the chat rows, shard by shard.

:func:`run_teacher` tokenizes the rows as the SFT/KD pipeline does, runs ``kd_teacher_model`` in
batches (:class:`TeacherRunner`: forward + top-k log-probs, jitted per batch shape) and writes the
shards of the process through ``jaxpref.teacher_output``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

from jaxpref.errors import ConfigError, DataError, ModelError
from jaxpref.teacher_output import (
    IDS_FIELD,
    LOGPROBS_FIELD,
    STATE_DIR,
    Shard,
    atomic_write_text,
    fingerprint,
    maybe_write_info,
    merge_reports,
    plan_shards,
    prepare_output_dir,
    report_dict,
    shard_done,
    teacher_columns,
    write_rows_atomic,
)

logger = logging.getLogger("jaxpref")

SHARDS_DONE_TIMEOUT_S = 12 * 3600  # multi-host: how long a process waits for the others' last shards
CHAT_TYPES = ("chat_template",)  # plus the axolotl KD type names (formats/kd.py), same tokenization
NO_TEACHER = (
    "kd_teacher_model: not set; the teacher pass needs the teacher checkpoint (a Hugging Face model "
    "directory or hub id): kd_teacher_model: path/to/teacher in the config, or kd_teacher_model=... on the "
    "command line."
)


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


# ----------------------------------------------------------------------------------------- config


def load_teacher_config(path: str | Path, overrides: Sequence[str] = (), *, require_datasets: bool = True) -> Any:
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
    return load_config(path, [*extra, *overrides], require_datasets=require_datasets)


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


# ----------------------------------------------------------------------------------------- teacher


class TeacherRunner:
    """The teacher on a mesh and one jitted forward + top-k per batch shape.

    ``__call__(input_ids [B, T] int32, lengths [B]) -> (ids [B, T, K] int32, logprobs [B, T, K] f32)``,
    entry t of a row is the top-k for the token after t, log-probs at ``temperature`` over the full
    vocabulary (``jaxpref.teacher_topk.topk_logprobs``: row blocks, never [B*T, V] at once).
    """

    def __init__(self, model: Any, mesh: Any, k: int, temperature: float, batch_size: int):
        from flax import nnx

        from jaxpref import sharding as shd
        from jaxpref.teacher_topk import topk_logprobs

        self.mesh = mesh
        divisor = shd.batch_divisor(mesh)
        self.batch_size = -(-batch_size // divisor) * divisor
        self.sharding = shd.batch_sharding(mesh)
        graphdef, state = nnx.split(model)
        self.state = state
        softcap = model.config.final_logit_softcapping

        def forward(state: Any, ids: jax.Array, positions: jax.Array, segment_ids: jax.Array):
            m = nnx.merge(graphdef, state)
            hidden = m(ids, positions=positions, segment_ids=segment_ids, deterministic=True)
            return topk_logprobs(hidden, m.lm_head_weight(), k, temperature=temperature, softcap=softcap)

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


def run_teacher(
    cfg: Any,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    show_progress: bool = True,
    max_shards: int | None = None,
) -> dict[str, Any]:
    """Write the KD dataset of ``cfg`` (see the module doc of ``jaxpref.teacher``); returns a summary dict.

    ``max_shards`` stops after writing that many shards in this call (tests of resuming).
    """
    from tqdm import tqdm

    from jaxpref import sharding as shd
    from jaxpref.assembly import build_teacher
    from jaxpref.data import DataSettings, load_tokenizer
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
    prepare_output_dir(out, fingerprint(cfg, teacher_dir))
    if not explicit:
        from jaxpref import distributed

        distributed.check_shared_directory(out.absolute(), "teacher_output_dir")

    data_settings = DataSettings.from_config(cfg)
    tokenizer = load_tokenizer(data_settings)
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
            get_format("chat_template", kind="lm", where=f"datasets[{i}]").build(entry, data_settings, tokenizer),
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
        logger.info(merge_reports(done, "teacher (this run)").summary())
    if not explicit and pn > 1:
        # Leave together: JAX's shutdown barrier at exit is short, and shards take minutes.
        from jaxpref import distributed

        logger.info("waiting for the other processes' shards")
        distributed.barrier("teacher-shards-done", timeout_s=SHARDS_DONE_TIMEOUT_S)
    info = maybe_write_info(cfg, out, shards, entries, teacher_dir, tokenizer)
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
    stats = {"shard": shard.index, "entry": shard.entry, "rows": [shard.start, shard.stop], **report_dict(report)}
    stats["file"] = shard.file_name(cfg.teacher_format) if rows else None
    if rows:
        write_rows_atomic(rows, out / stats["file"])
    atomic_write_text(out / STATE_DIR / shard.stats_name(), json.dumps(stats, indent=1, sort_keys=True) + "\n")
    return stats
