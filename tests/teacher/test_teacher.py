"""``python -m jaxpref.teacher``: the stored targets are the teacher's own top-k at every trainable
position after the KD pipeline (brute force from full logits), online == offline KD, resume, errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from flax import nnx

from jaxpref import models
from jaxpref.config import load_config
from jaxpref.data import build_lm_data, load_tokenizer
from jaxpref.data.settings import DataSettings
from jaxpref.objectives import build_objective
from jaxpref.teacher import main
from jaxpref.teacher_output import shortest_float32, teacher_columns
from jaxpref.teacher_pass import load_teacher_config, run_teacher
from tests.teacher.conftest import DEMO_MODEL, GOOD_ROWS, REPO, save_teacher, teacher_config

K, T_GEN = 5, 1.5


def run_main(args: list[str], capsys) -> tuple[int, str]:
    rc = main([*args, "--no_progress"])
    return rc, capsys.readouterr().err


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def log_softmax64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def kd_config(tmp_path: Path, teacher_dir: Path, info: dict, **overrides) -> Path:
    """A KD training config whose datasets are the teacher pass's own pasted snippet."""
    cfg = {
        "base_model": str(teacher_dir),
        "chat_template": "chatml",
        "kd_trainer": True,
        "learning_rate": 1e-3,
        "sequence_len": 96,
        "micro_batch_size": 4,
        "dataset_processes": 1,
        **yaml.safe_load(info["kd_config_snippet"]),
        **overrides,
    }
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_shortest_float32_reads_back_exactly_and_short():
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            (rng.normal(size=5000) * 3).astype(np.float32),
            -np.exp(rng.uniform(-60, 5, size=5000)).astype(np.float32),  # down to 1e-26: the slow path too
            np.array([0, -1.5, -0.1, 1e-38, -np.inf], np.float32),
        ]
    )
    y = shortest_float32(x.reshape(-1, 5)).ravel()
    np.testing.assert_array_equal(y.astype(np.float32), x)  # every value reads back as the same float32
    lengths = np.array([len(repr(v)) for v in y.tolist()])
    numpy_shortest = np.array([len(repr(float(str(v)))) for v in x])
    assert np.all(lengths <= numpy_shortest)
    assert y[-5:].tolist() == [0.0, -1.5, -0.1, 1e-38, -np.inf]


def test_teacher_columns_are_token_aligned():
    """Entry t (the prediction at position t) becomes row t + 1; row 0 and unstored tokens are null."""
    ids = np.arange(12).reshape(4, 3)
    lps = -np.arange(12, dtype=np.float32).reshape(4, 3) / 4
    out_ids, out_lps = teacher_columns(ids, lps, np.array([True, True, False, True]))
    assert out_ids == [None, [0, 1, 2], None, [6, 7, 8]]
    assert out_lps == [None, [0.0, -0.25, -0.5], None, [-1.5, -1.75, -2.0]]


@pytest.fixture(scope="module")
def kd_output(tmp_path_factory, teacher_dir, chat_rows):
    """One teacher pass (jsonl, K=5, T_gen=1.5) shared by the read-back tests."""
    tmp = tmp_path_factory.mktemp("kd_output")
    rc = main(["--config", str(teacher_config(tmp, teacher_dir, chat_rows)), "--no_progress"])
    assert rc == 0
    return tmp / "kd"


def test_output_files_and_counts(kd_output):
    info = json.loads((kd_output / "teacher_info.json").read_text())
    assert info["top_k"] == K and info["temperature"] == T_GEN and info["vocab_size"] == 512
    assert info["chat_template"] == "chatml" and info["train_on_inputs"] is False
    assert info["files"] == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
    assert (info["rows_in"], info["rows_out"]) == (GOOD_ROWS + 2, GOOD_ROWS)
    assert info["dropped"] == {"missing_field": 1, "too_long": 1}
    (entry,) = info["datasets"]
    assert entry["temperature"] == T_GEN and entry["logprobs_field"] == "logprobs" and entry["type"] == "chat_template"
    rows = [json.loads(line) for f in info["files"] for line in (kd_output / f).read_text().splitlines()]
    assert len(rows) == GOOD_ROWS
    for row in rows:
        ids, lps = row["target_token_ids"], row["logprobs"]
        assert ids[0] is None and lps[0] is None  # token-aligned: nothing predicts token 0
        assert all(len(r) == K for r in ids[1:]) and all(len(r) == K for r in lps[1:])
        probs = np.exp(np.asarray(lps[1:]))
        assert np.all(np.diff(lps[1:], axis=-1) <= 0) and np.all(probs.sum(-1) <= 1 + 1e-6)
    # the input rows' order within the file is kept (the messages column as read)
    assert (
        rows[0]["messages"] == json.loads((REPO / "demo/data/sft_eval.jsonl").read_text().splitlines()[0])["messages"]
    )


@pytest.mark.slow
def test_trainable_positions_only(tmp_path, kd_output, teacher_dir, chat_rows):
    """teacher_positions: trainable stores rows only for trained tokens, with the same values, and the
    KD pipeline reads it without dropping a row."""
    cfg = teacher_config(tmp_path, teacher_dir, chat_rows, teacher_positions="trainable")
    assert main(["--config", str(cfg), "--no_progress"]) == 0
    info = json.loads((tmp_path / "kd" / "teacher_info.json").read_text())
    read = lambda d: [json.loads(x) for f in info["files"] for x in (d / f).read_text().splitlines()]  # noqa: E731
    tokenizer = load_tokenizer(DataSettings.from_config(load_teacher_config(cfg)))
    from jaxpref.data.formats.sft import ChatTemplateFormat

    chat = ChatTemplateFormat(load_teacher_config(cfg).datasets[0], load_teacher_config(cfg), tokenizer)
    for part, full in zip(read(tmp_path / "kd"), read(kd_output), strict=True):
        trainable = chat(part)["trainable"]
        assert [r is not None for r in part["target_token_ids"]] == [bool(t) and i > 0 for i, t in enumerate(trainable)]
        assert all(p in (None, f) for p, f in zip(part["logprobs"], full["logprobs"]))
    data = build_lm_data(DataSettings.from_config(load_config(kd_config(tmp_path, teacher_dir, info))), tokenizer)
    assert data.report.rows_out == GOOD_ROWS and not data.report.dropped


@pytest.mark.slow
@pytest.mark.parametrize("kd_temperature", [T_GEN, 1.0])
def test_pipeline_targets_are_the_teachers_topk_at_each_trainable_position(
    tmp_path, kd_output, teacher_dir, kd_temperature
):
    """teacher CLI -> build_lm_data (KD run): target[t] = top-K of the teacher's full-vocabulary
    softmax at position t (predicting token t + 1), rescaled p^(T_gen/T_kd) and renormalised."""
    info = json.loads((kd_output / "teacher_info.json").read_text())
    cfg = load_config(kd_config(tmp_path, teacher_dir, info, kd_temperature=kd_temperature))
    data = build_lm_data(DataSettings.from_config(cfg), load_tokenizer(DataSettings.from_config(cfg)))
    assert data.report.rows_out == GOOD_ROWS and not data.report.dropped
    batches = list(data.train_iterator(1))
    # The teacher's full logits for every batch row at once ([rows, 96, V]: small test sizes only);
    # causal attention: the zero padding after a row does not change its positions.
    width = 96
    all_ids = np.concatenate([np.pad(b["input_ids"], ((0, 0), (0, width - b["input_ids"].shape[1]))) for b in batches])
    teacher = models.from_pretrained(teacher_dir)
    all_logits = np.asarray(teacher.logits(teacher(all_ids.astype(np.int32))))
    scale = T_GEN / kd_temperature
    seen = checked = 0
    for i, batch in enumerate(batches):
        for b in range(len(batch["input_ids"])):
            length = int((batch["segment_ids"][b] > 0).sum())
            if not length:
                continue
            seen += 1
            logits = all_logits[i * len(batch["input_ids"]) + b, :length]
            logp = log_softmax64(logits / T_GEN)
            top = np.argsort(-logp, axis=-1, kind="stable")[:, :K]
            expected = log_softmax64(np.take_along_axis(logp, top, -1) * scale)
            mask = batch["loss_mask"][b, :length]
            assert mask.any()
            np.testing.assert_array_equal(batch["target_mask"][b, :length], np.repeat(mask[:, None], K, 1))
            np.testing.assert_array_equal(batch["target_token_ids"][b, :length][mask], top[mask])
            np.testing.assert_allclose(batch["target_logprobs"][b, :length][mask], expected[mask], atol=2e-5)
            assert not batch["target_mask"][b, length:].any()
            checked += int(mask.sum())
    assert seen == GOOD_ROWS and checked == data.report.trainable_tokens


@pytest.mark.slow
@pytest.mark.parametrize("scheduled", [False, True])
def test_online_teacher_equals_stored_teacher_dataset(tmp_path, kd_output, teacher_dir, scheduled):
    """The KD objective with kd_teacher_model (online, top-k at kd_temperature) and the objective
    reading the stored dataset (T_gen = 1.5 rescaled to kd_temperature = 2) give the same loss and
    gradient on the same batch: same K, same alignment. With kd_temperature_min (at T = 1.7 this step)
    both keep their targets at T = 1 and rescale them in the step."""
    info = json.loads((kd_output / "teacher_info.json").read_text())
    options = dict(kd_temperature=2.0, kd_teacher_top_k=K, kd_beta=0.3, kd_ce_alpha=0.4, micro_batch_size=2)
    if scheduled:
        options["kd_temperature_min"] = 1.0
    offline_cfg = load_config(kd_config(tmp_path, teacher_dir, info, **options))
    online_cfg = offline_cfg.model_copy(update={"kd_teacher_model": str(teacher_dir)})
    offline, online = build_objective(offline_cfg, "kd"), build_objective(online_cfg, "kd")
    assert online.companions == ("teacher",) and not offline.companions
    companions = {"teacher": models.from_pretrained(teacher_dir)}
    student = models.from_config(
        dataclasses.replace(models.load_model_config(DEMO_MODEL), num_hidden_layers=1), seed=11
    )
    data = build_lm_data(DataSettings.from_config(offline_cfg), load_tokenizer(DataSettings.from_config(offline_cfg)))

    def loss_and_grad(objective):
        @nnx.jit
        def fn(student, batch, companions):
            kw = {"companions": companions} if objective.companions else {}
            n = objective.count(batch)
            return nnx.value_and_grad(lambda m: objective.loss(m, batch, n, train=False, **kw)[0])(student)

        return fn

    offline_fn, online_fn = loss_and_grad(offline), loss_and_grad(online)
    for _, batch in zip(range(1), data.train_iterator(1)):
        if scheduled:
            batch = {**batch, "kd_temperature": np.float32(1.7)}
        off_loss, off_grad = offline_fn(student, batch, {})
        on_batch = {k: batch[k] for k in (*online.batch_keys, *(["kd_temperature"] if scheduled else []))}
        on_loss, on_grad = online_fn(student, on_batch, companions)
        assert float(off_loss) > 0.1
        np.testing.assert_allclose(float(on_loss), float(off_loss), rtol=2e-5)
        for a, b in zip(jax_leaves(on_grad), jax_leaves(off_grad)):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6 * max(1.0, np.abs(b).max()))


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_resume_is_byte_identical_and_a_changed_config_is_refused(tmp_path, teacher_dir, chat_rows, capsys, fmt):
    cfg_path = teacher_config(tmp_path, teacher_dir, chat_rows, teacher_format=fmt)
    out = tmp_path / "kd"
    assert run_main(["--config", str(cfg_path)], capsys)[0] == 0
    full = snapshot(out)
    assert f"part-00002.{fmt}" in full and "teacher_info.json" in full

    shutil.rmtree(out)  # interrupted after the first shard
    result = run_teacher(load_teacher_config(cfg_path), show_progress=False, max_shards=1)
    assert result["shards_written"] == 1 and result["info"] is None
    assert sorted(p for p in snapshot(out) if not p.startswith(".teacher")) == [f"part-00000.{fmt}"]
    first = (out / f"part-00000.{fmt}").stat().st_mtime_ns
    rc, err = run_main(["--config", str(cfg_path)], capsys)
    assert rc == 0 and "1 already written" in err
    assert snapshot(out) == full
    assert (out / f"part-00000.{fmt}").stat().st_mtime_ns == first  # skipped, not rewritten

    (out / f"part-00002.{fmt}").unlink()  # a lost shard file is written again
    assert run_main(["--config", str(cfg_path)], capsys)[0] == 0
    assert snapshot(out) == full

    rc, err = run_main(["--config", str(cfg_path), "kd_teacher_top_k=3"], capsys)
    assert rc == 2 and "different config" in err and "kd_teacher_top_k" in err and "Traceback" not in err
    assert snapshot(out) == full


@pytest.mark.slow
def test_two_processes_split_the_shards_and_the_last_writes_the_info(tmp_path, teacher_dir, chat_rows, capsys):
    single = tmp_path / "single"
    assert run_main(["--config", str(teacher_config(single, teacher_dir, chat_rows))], capsys)[0] == 0
    split = tmp_path / "split"
    cfg_path = teacher_config(split, teacher_dir, chat_rows)
    cfg = load_teacher_config(cfg_path)
    first = run_teacher(cfg, process_index=1, process_count=2, show_progress=False)
    assert first["shards_written"] == 1 and first["info"] is None  # shard 1 of 0, 1, 2
    assert sorted(p.name for p in (split / "kd").glob("part-*")) == ["part-00001.jsonl"]
    second = run_teacher(cfg, process_index=0, process_count=2, show_progress=False)
    assert second["shards_written"] == 2 and second["info"] is not None
    a, b = snapshot(single / "kd"), snapshot(split / "kd")
    info_a, info_b = (json.loads(s.pop("teacher_info.json")) for s in (a, b))
    assert a == b
    assert info_a["kd_config_snippet"].replace(str(single), str(split)) == info_b["kd_config_snippet"]


# ----------------------------------------------------------------------------------------- exit 2


@pytest.fixture(scope="module")
def small_vocab_teacher(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("small") / "teacher", seed=0, vocab_size=256)


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing_teacher", "not a checkpoint directory"),
        ("small_vocab", "vocab_size 256 but the tokenizer has 512"),
        ("no_datasets", "datasets"),
        ("unwritable_output", "cannot write to"),
        ("no_teacher_key", "kd_teacher_model: not set"),
        ("no_output_dir", "teacher_output_dir: not set"),
        ("not_chat", "type: chat_template"),
        ("missing_dataset_file", "not exist"),
        ("foreign_files", "no teacher pass recorded"),
    ],
)
def test_bad_input_exits_2_with_one_paragraph(
    tmp_path, teacher_dir, chat_rows, small_vocab_teacher, capsys, case, expected
):
    overrides: dict = {}
    if case == "missing_teacher":
        overrides["kd_teacher_model"] = str(tmp_path / "no-such-teacher")
    elif case == "small_vocab":
        overrides.update(kd_teacher_model=str(small_vocab_teacher), tokenizer_config=str(teacher_dir))
    elif case == "no_datasets":
        overrides["datasets"] = []
    elif case == "unwritable_output":
        (tmp_path / "a_file").write_text("")
        overrides["teacher_output_dir"] = str(tmp_path / "a_file" / "kd")
    elif case == "no_teacher_key":
        overrides.update(kd_teacher_model=None, base_model=str(teacher_dir))
    elif case == "no_output_dir":
        overrides["teacher_output_dir"] = None
    elif case == "not_chat":
        overrides["datasets"] = [{"path": str(chat_rows), "type": "completion"}]
    elif case == "foreign_files":
        (tmp_path / "kd").mkdir(parents=True)
        (tmp_path / "kd" / "part-00000.jsonl").write_text("{}\n")
    elif case == "missing_dataset_file":
        overrides["datasets"] = [{"path": str(tmp_path / "missing.jsonl"), "type": "chat_template"}]
    rc, err = run_main(["--config", str(teacher_config(tmp_path, teacher_dir, chat_rows, **overrides))], capsys)
    assert rc == 2, err
    message = err[err.index("error: ") :]  # after any progress lines of the dataset loader
    assert expected in message and message.count("error:") == 1 and "Traceback" not in err


def test_a_run_that_failed_before_any_shard_does_not_lock_the_directory(
    tmp_path, teacher_dir, chat_rows, small_vocab_teacher, capsys
):
    bad = teacher_config(
        tmp_path, teacher_dir, chat_rows, kd_teacher_model=str(small_vocab_teacher), tokenizer_config=str(teacher_dir)
    )
    assert run_main(["--config", str(bad)], capsys)[0] == 2
    good = teacher_config(tmp_path, teacher_dir, chat_rows, teacher_shard_rows=100)
    rc, err = run_main(["--config", str(good)], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "kd" / "teacher_info.json").read_text())["rows_out"] == GOOD_ROWS


@pytest.mark.slow
def test_sharded_teacher_on_four_devices_gives_the_same_rows(tmp_path, kd_output, teacher_dir, chat_rows):
    """mesh data=2, tensor=2 on 4 simulated CPU devices (parameters sharded by the logical-axis rules,
    a batch of 3 rounded up to 4): the same top-k ids and log-probs as on one device."""
    cfg = teacher_config(tmp_path, teacher_dir, chat_rows, micro_batch_size=3)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    args = ["--config", str(cfg), "--no_progress", "mesh.data=2", "mesh.tensor=2"]
    proc = subprocess.run(
        [sys.executable, "-m", "jaxpref.teacher", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "teacher on 4 device(s), mesh {'data': 2, 'fsdp': 1, 'tensor': 2}, 4 rows per batch" in proc.stderr
    read = lambda d: [json.loads(x) for f in sorted(d.glob("part-*")) for x in f.read_text().splitlines()]  # noqa: E731
    sharded, single = read(tmp_path / "kd"), read(kd_output)
    assert len(sharded) == len(single) == GOOD_ROWS
    for a, b in zip(sharded, single):
        assert a["target_token_ids"] == b["target_token_ids"]
        np.testing.assert_allclose(np.asarray(a["logprobs"][1:]), np.asarray(b["logprobs"][1:]), atol=1e-5)


@pytest.mark.slow
def test_two_dataset_entries_get_their_own_kd_entries(tmp_path, teacher_dir, chat_rows):
    """Each input entry's shards get their own KD entry with that entry's chat keys; the KD pipeline
    reads the pasted snippet and keeps every row."""
    lines = (REPO / "demo" / "data" / "sft_eval.jsonl").read_text().splitlines()[40:52]
    sharegpt = tmp_path / "sharegpt.jsonl"
    sharegpt.write_text(
        "".join(
            json.dumps(
                {"conversation": [{"from": m["role"], "value": m["content"]} for m in json.loads(x)["messages"]]}
            )
            + "\n"
            for x in lines
        )
    )
    second = {
        "path": str(sharegpt),
        "type": "chat_template",
        "field_messages": "conversation",
        "message_property_mappings": {"role": "from", "content": "value"},
    }
    datasets = [{"path": str(chat_rows), "type": "chat_template"}, second]
    cfg = teacher_config(tmp_path, teacher_dir, chat_rows, datasets=datasets)
    assert main(["--config", str(cfg), "--no_progress"]) == 0
    info = json.loads((tmp_path / "kd" / "teacher_info.json").read_text())
    first, other = info["datasets"]
    assert first["data_files"] == [str(tmp_path / "kd" / f"part-0000{i}.jsonl") for i in range(3)]
    assert other["data_files"] == [str(tmp_path / "kd" / f"part-0000{i}.jsonl") for i in (3, 4)]
    assert other["field_messages"] == "conversation" and other["message_property_mappings"]["content"] == "value"
    assert info["rows_out"] == GOOD_ROWS + 12
    tokenizer = load_tokenizer(DataSettings.from_config(load_teacher_config(cfg)))
    data = build_lm_data(DataSettings.from_config(load_config(kd_config(tmp_path, teacher_dir, info))), tokenizer)
    assert data.report.rows_out == GOOD_ROWS + 12 and not data.report.dropped


@pytest.mark.slow
def test_two_jax_processes_split_the_shards(tmp_path, kd_output, teacher_dir, chat_rows):
    """Launched as 2 JAX processes (JAX_COORDINATOR_ADDRESS, as a multi-host launcher sets it): each
    joins the runtime, writes its own shards, and together they write the single-process files."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = teacher_config(tmp_path, teacher_dir, chat_rows)
    procs = []
    for pid in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROC"))}
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        cmd = [sys.executable, "-m", "jaxpref.teacher", "--config", str(cfg), "--no_progress"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert "(2 for process 0 of 2, 0 already written)" in errs[0]
    assert "(1 for process 1 of 2, 0 already written)" in errs[1]
    assert all("waiting for the other processes' shards" in e for e in errs)  # they leave together
    parts = lambda d: {k: v for k, v in snapshot(d).items() if k.startswith("part-")}  # noqa: E731
    assert parts(tmp_path / "kd") == parts(kd_output)
    info = json.loads((tmp_path / "kd" / "teacher_info.json").read_text())
    assert info["rows_out"] == GOOD_ROWS and info["files"] == sorted(parts(kd_output))


# ------------------------------------------------------------------------------------------ kd_temperature_min


def axolotl_temperature(start: float, minimum: float, global_step: int, max_steps: int) -> float:
    """axolotl's KDTemperatureSchedulerCallback.on_step_end, written out (integrations/kd/callbacks.py)."""
    import math

    progress = global_step / max_steps
    decay_factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return start - (start - minimum) * (1.0 - decay_factor)


def test_the_temperature_schedule_is_axolotls_cosine():
    from jaxpref.objectives.kd import kd_temperature_schedule

    fn = kd_temperature_schedule(2.0, 0.7, 10)
    for step in range(11):
        np.testing.assert_allclose(float(fn(step)), axolotl_temperature(2.0, 0.7, step, 10), rtol=1e-6)


@pytest.mark.parametrize("options", [dict(kd_ce_alpha=0.4, kd_beta=0.3), dict(kd_zscore_base_temp=1.5, kd_alpha=0.5)])
def test_a_scheduled_temperature_trains_as_the_fixed_one_at_that_temperature(tmp_path, kd_output, teacher_dir, options):
    """kd_temperature_min: targets stay at T = 1 in the data and are rescaled in the step, the student's
    logits are those of hidden / T. At the same T the loss, metrics and gradient equal the fixed path's."""
    import jax

    info = json.loads((kd_output / "teacher_info.json").read_text())
    common = dict(kd_temperature=2.0, kd_teacher_top_k=K, micro_batch_size=2, **options)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    fixed_cfg = load_config(kd_config(tmp_path / "a", teacher_dir, info, **common))
    sched_cfg = load_config(kd_config(tmp_path / "b", teacher_dir, info, kd_temperature_min=2.0, **common))
    student = models.from_config(
        dataclasses.replace(models.load_model_config(DEMO_MODEL), num_hidden_layers=1), seed=11
    )
    results = []
    for cfg, extra in ((fixed_cfg, {}), (sched_cfg, {"kd_temperature": np.float32(2.0)})):
        objective = build_objective(cfg, "kd")
        assert (objective.schedules is None) == (not extra)
        settings = DataSettings.from_config(cfg)
        batch = {**next(build_lm_data(settings, load_tokenizer(settings)).train_iterator(1)), **extra}

        @nnx.jit
        def fn(student, batch, objective=objective):
            loss = lambda m: objective.loss(m, batch, objective.count(batch), train=False)
            return nnx.value_and_grad(loss, has_aux=True)(student)

        results.append(fn(student, batch))
    ((fixed_loss, fixed_metrics), fixed_grad), ((loss, metrics), grad) = results
    np.testing.assert_allclose(float(loss), float(fixed_loss), rtol=2e-5)
    # without a CE term a scheduled run skips the CE pass, so it has no ce_loss metric
    assert set(metrics) == set(fixed_metrics) - (set() if options.get("kd_ce_alpha") else {"ce_loss"})
    for key in metrics:
        np.testing.assert_allclose(float(metrics[key]), float(fixed_metrics[key]), rtol=2e-5, atol=1e-7, err_msg=key)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(fixed_grad)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-6 * max(1.0, np.abs(b).max()))


@pytest.mark.slow
def test_a_run_with_kd_temperature_min_logs_the_schedule(tmp_path, kd_output, teacher_dir):
    from jaxpref.train import run

    info = json.loads((kd_output / "teacher_info.json").read_text())
    cfg = kd_config(
        tmp_path, teacher_dir, info, kd_temperature=3.0, kd_temperature_min=1.0, max_steps=4, logging_steps=1,
        use_tensorboard=False, output_dir=str(tmp_path / "out"), kd_teacher_top_k=K,
    )  # fmt: skip
    run(load_config(cfg), show_progress=False)
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["kd_temperature"] for r in lines if r["split"] == "train"]
    np.testing.assert_allclose(logged, [axolotl_temperature(3.0, 1.0, s, 4) for s in range(4)], rtol=1e-6)
