"""KD from a teacher server end to end: the same targets and loss as the stored KD dataset that
``python -m jaxpref.teacher`` writes for the same teacher, a whole training run, and a server killed
mid-run (a clear error, a checkpoint the rerun resumes from)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxpref.assembly import with_served_targets
from jaxpref.config import load_config
from jaxpref.data import DataSettings, build_lm_data, load_tokenizer
from jaxpref.serve import build_api
from jaxpref.teacher_client import TeacherServerError
from jaxpref.teacher_pass import load_teacher_config, run_teacher
from jaxpref.teacher_server import BackgroundServer, ServeSettings
from tests.teacher.conftest import GOOD_ROWS, REPO, teacher_config

K = 5


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    """22 good demo conversations (no dropped rows: both pipelines shuffle the same row count)."""
    lines = (REPO / "demo" / "data" / "sft_eval.jsonl").read_text().splitlines()[:GOOD_ROWS]
    path = tmp_path_factory.mktemp("served_rows") / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def stored(tmp_path_factory, teacher_dir, rows) -> dict:
    """The teacher pass at T_gen = 1 (a server's prompt log-probs are at temperature 1)."""
    tmp = tmp_path_factory.mktemp("stored")
    cfg = load_teacher_config(teacher_config(tmp, teacher_dir, rows, teacher_temperature=1.0))
    run_teacher(cfg, show_progress=False)
    return json.loads((tmp / "kd" / "teacher_info.json").read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory, teacher_dir, rows):
    cfg = load_teacher_config(teacher_config(tmp_path_factory.mktemp("serve"), teacher_dir, rows))
    with BackgroundServer(build_api(cfg, ServeSettings(max_top_k=K, max_model_len=96))) as srv:
        yield srv


def kd_yaml(tmp_path: Path, teacher_dir: Path, datasets: list, **overrides) -> Path:
    cfg = {
        "base_model": str(teacher_dir),
        "chat_template": "chatml",
        "kd_trainer": True,
        "learning_rate": 1e-3,
        "sequence_len": 96,
        "micro_batch_size": 2,
        "dataset_processes": 1,
        "datasets": datasets,
        "kd_temperature": 2.0,
        "kd_beta": 0.3,
        "kd_ce_alpha": 0.4,
        "val_set_size": 0.2,
        "sample_packing": True,
        "seed": 5,
        **overrides,
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"kd-{len(list(tmp_path.glob('kd-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def served(tmp_path, teacher_dir, rows, url, **overrides) -> Path:
    entry = [{"path": str(rows), "type": "chat_template"}]
    return kd_yaml(tmp_path, teacher_dir, entry, kd_online_server_base_url=url, kd_online_topk=K, **overrides)


def offline(tmp_path, teacher_dir, stored, **overrides) -> Path:
    return kd_yaml(tmp_path, teacher_dir, yaml.safe_load(stored["kd_config_snippet"])["datasets"], **overrides)


def test_served_targets_equal_the_stored_teacher_dataset(tmp_path, teacher_dir, rows, stored, server):
    """Same packed micro-batches, same targets (ids, log-probs after the T_gen / T_kd rescale, masks),
    same KD loss: train and eval."""
    from flax import nnx

    from jaxpref import models
    from jaxpref.objectives import build_objective

    off_cfg = load_config(offline(tmp_path, teacher_dir, stored))
    on_cfg = load_config(served(tmp_path, teacher_dir, rows, server.url))
    tokenizer = load_tokenizer(DataSettings.from_config(off_cfg))
    off = build_lm_data(DataSettings.from_config(off_cfg), tokenizer)
    on = with_served_targets(on_cfg, build_lm_data(DataSettings.from_config(on_cfg), tokenizer), tokenizer)
    try:
        pairs = list(zip(off.train_iterator(1), on.train_iterator(1)))
        pairs += list(zip(off.eval_batches(), on.eval_batches()))
    finally:
        on.close()
    assert len(pairs) == off.micro_batches_per_epoch + len(off.eval_batches()) > 4
    objective = build_objective(off_cfg, "kd")
    student = models.from_config(models.load_model_config(teacher_dir), seed=11)
    loss = nnx.jit(lambda m, b: objective.loss(m, b, objective.count(b), train=False)[0])
    for a, b in pairs:
        assert set(b) == set(a)
        for key in ("input_ids", "segment_ids", "loss_mask", "target_mask"):
            np.testing.assert_array_equal(b[key], a[key], err_msg=key)
        np.testing.assert_array_equal(b["target_token_ids"], a["target_token_ids"])
        np.testing.assert_allclose(b["target_logprobs"], a["target_logprobs"], atol=2e-6)
        assert a["target_mask"].any()
        np.testing.assert_allclose(float(loss(student, b)), float(loss(student, a)), rtol=1e-5)


@pytest.mark.slow
def test_training_from_the_server_logs_the_losses_of_training_on_the_stored_dataset(
    tmp_path, teacher_dir, rows, stored, server
):
    from jaxpref.train import run

    common = dict(max_steps=3, logging_steps=1, eval_steps=3, use_tensorboard=False)
    out = {}
    for name, path in (
        ("stored", offline(tmp_path, teacher_dir, stored, output_dir=str(tmp_path / "stored"), **common)),
        ("served", served(tmp_path, teacher_dir, rows, server.url, output_dir=str(tmp_path / "served"), **common)),
    ):
        run(load_config(path), show_progress=False)
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        out[name] = [(r["step"], r["split"], r["loss"]) for r in lines if "loss" in r]
    assert len(out["served"]) == 4  # 3 train steps + 1 eval
    for (s1, p1, l1), (s2, p2, l2) in zip(out["served"], out["stored"]):
        assert (s1, p1) == (s2, p2)
        np.testing.assert_allclose(l1, l2, rtol=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(config: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "jaxpref.serve", "--config", str(config), "--port", str(port),
           "--max_top_k", str(K), "--batch_wait_ms", "150"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if re.search(r"serving .* on http://", log.read_text()):
            return proc
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {log.read_text()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the server did not start: {log.read_text()}")


@pytest.mark.slow
def test_a_server_killed_mid_run_stops_the_run_with_a_clear_error_and_the_rerun_resumes(tmp_path, teacher_dir, rows):
    """The server dies after checkpoint 2: the run stops with the error (naming the server and the last
    checkpoint), the checkpoint is whole, and with the server back the rerun goes on from it."""
    from jaxpref.train import run

    port = free_port()
    serve_cfg = teacher_config(tmp_path / "serve", teacher_dir, rows)
    out_dir = tmp_path / "run"
    path = served(
        tmp_path, teacher_dir, rows, f"http://127.0.0.1:{port}", output_dir=str(out_dir), max_steps=30, save_steps=2,
        logging_steps=1, use_tensorboard=False, kd_online_retries=1, kd_online_timeout=10, kd_online_concurrency=2,
    )  # fmt: skip
    proc = start_server(serve_cfg, port, tmp_path / "server1.log")

    def kill_after_checkpoint() -> None:
        while not (out_dir / "checkpoints" / "2").exists() and proc.poll() is None:
            time.sleep(0.05)
        proc.kill()

    killer = threading.Thread(target=kill_after_checkpoint, daemon=True)
    killer.start()
    try:
        with pytest.raises(TeacherServerError) as e:
            run(load_config(path), show_progress=False)
    finally:
        proc.kill()
        killer.join(10)
    message = str(e.value)
    assert f"127.0.0.1:{port}" in message and "did not answer" in message
    last = int(re.search(r"last checkpoint is step (\d+)", message).group(1))
    assert 2 <= last < 30
    proc = start_server(serve_cfg, port, tmp_path / "server2.log")
    try:
        resumed = load_config(path, ["resume_from_checkpoint=auto", f"max_steps={last + 2}"])
        result = run(resumed, show_progress=False)
    finally:
        proc.kill()
    assert result["steps"] == last + 2
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["split"] == "train"][-2:] == [last + 1, last + 2]


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_on_policy_steps_get_their_targets_from_the_server(tmp_path, teacher_dir, rows, server, ratio):
    """kd_on_policy_ratio with a teacher server: the rebuilt micro-batches are scored by the server
    (at 1.0 the data's own rows are never sent)."""
    from jaxpref.train import run

    path = served(tmp_path, teacher_dir, rows, server.url, output_dir=str(tmp_path / "out"), max_steps=2,
                  logging_steps=1, use_tensorboard=False, val_set_size=0, kd_on_policy_ratio=ratio,
                  kd_on_policy_max_new_tokens=16)
    result = run(load_config(path), show_progress=False)
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["split"] == "train"]
    assert result["steps"] == 2 and [r["on_policy"] for r in train] == ([0.0, 1.0] if ratio < 1 else [1.0, 1.0])
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in train)
    assert train[-1]["sampling_seconds"] > 0 and train[-1]["completion_tokens"] > 0
