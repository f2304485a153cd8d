"""Two JAX processes on localhost (jax.distributed, gloo CPU collectives) train KD like one process.

``python -m jaxpref.train`` runs as the multi-host user runs it: the same command in every process,
with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set (jaxpref.distributed joins the
runtime), each process reading its own slice of every global batch. One process with 4 CPU devices
and ``micro_batch_size: 4`` sees the same global batches as two processes with 2 devices each and
``micro_batch_size: 2``; the mesh is ``fsdp: -1`` (weights split over both processes, so each writes
its own checkpoint shards).

Runs (a module fixture): A = one process, 4 steps, checkpoint at 3 and 4; B = two processes, 3 steps.
Then C = one process resuming from B's step-3 checkpoint and D = two processes resuming from A's:
both must reproduce A's 4th step.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxpref.data.settings import DataSettings

REPO = Path(__file__).resolve().parents[2]
K = 4
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)


def _kd_dataset(path: Path, model_dir: Path, n: int = 24) -> None:
    """Format-(b) KD rows for ``n`` short chats: token-aligned teacher top-K (leading null row)."""
    from jaxpref.data import load_tokenizer
    from jaxpref.data.formats import get_format
    from jaxpref.data.formats.kd import kd_row, write_kd_dataset
    from tests.data.helpers import config, ds_config

    cfg = config(base_model=str(model_dir), chat_template="chatml")
    settings = DataSettings.from_config(cfg)
    tok = load_tokenizer(settings)
    build = get_format("chat_template", kind="lm").build(ds_config(type="chat_template"), settings, tok)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        messages = [
            {"role": "user", "content": f"question {i:03d}: " + "abc"[i % 3] * (2 + i % 7)},
            {"role": "assistant", "content": f"answer {i:03d} " + "xyz"[i % 3] * (3 + 5 * (i % 4))},
        ]
        tokens = build({"messages": messages})["input_ids"].tolist()
        ids, lps = [None], [None]
        for t in tokens[1:]:
            others = rng.choice(np.setdiff1d(np.arange(len(tok)), [t]), K - 1, replace=False)
            raw = np.sort(rng.normal(size=K))[::-1]
            ids.append([t, *others.tolist()])
            lps.append((raw - np.log(np.exp(raw).sum()) - 0.1).tolist())
        rows.append(kd_row(messages, ids, lps))
    write_kd_dataset(rows, path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    return make_setup(tmp_path_factory.mktemp("multiprocess"))


def make_setup(root: Path) -> Path:
    """A 2-layer tiny-llama (config + tokenizer), a KD dataset and the config, under ``root``."""
    model = root / "tiny"
    shutil.copytree(REPO / "demo" / "tiny-llama", model)
    hf = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**hf, **TINY}))
    _kd_dataset(root / "kd.jsonl", model)
    cfg = {
        "base_model": str(model),
        "random_init_weights": True,
        "chat_template": "chatml",
        "datasets": [{"path": str(root / "kd.jsonl"), "type": "chat_template"}],
        "kd_trainer": True,
        "kd_alpha": 1.0,
        "kd_ce_alpha": 0.5,
        "sequence_len": 128,
        "micro_batch_size": 4,
        "optimizer": "adamw_torch",
        "learning_rate": 1.0e-2,
        "lr_scheduler": "constant",
        "max_steps": 4,
        "save_steps": 3,
        "logging_steps": 1,
        "use_tensorboard": False,
        "mesh": {"fsdp": -1},
        "seed": 3,
    }
    (root / "kd.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(root: Path, processes: int, overrides: list[str]) -> list[subprocess.Popen]:
    """Start the train CLI in ``processes`` processes (4 CPU devices in all)."""
    port = _free_port()
    procs = []
    for pid in range(processes):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROC"))}
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={4 // processes}")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        if processes > 1:
            env.update(
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(pid)
            )
        cmd = [
            sys.executable,
            "-m",
            "jaxpref.train",
            "--config",
            str(root / "kd.yaml"),
            "--no_progress",
            f"micro_batch_size={4 // processes}",
            *overrides,
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


def wait(*runs: list[subprocess.Popen], timeout: int = 900) -> list[list[str]]:
    """Wait for every process of ``runs`` (started together: they share the cores); their stderr."""
    procs = [p for run in runs for p in run]
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        errs.append(err)
    if any(p.returncode for p in procs):
        report = "\n".join(
            f"--- process {i} (exit {p.returncode}):\n{e[-3000:]}" for i, (p, e) in enumerate(zip(procs, errs))
        )
        raise AssertionError(report)
    out, i = [], 0
    for run in runs:
        out.append(errs[i : i + len(run)])
        i += len(run)
    return out


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert len({r["step"] for r in train}) == len(train)  # one writer: no step logged twice
    return {r["step"]: r["loss"] for r in train}


@pytest.fixture(scope="module")
def runs(setup) -> dict[str, Path]:
    a, b = setup / "A", setup / "B"
    _, errs = wait(start(setup, 1, [f"output_dir={a}"]), start(setup, 2, [f"output_dir={b}", "max_steps=3"]))
    assert "process 1 of 2: 2 local / 4 global devices" in errs[1]
    return {"A": a, "B": b}


@pytest.mark.slow
def test_two_processes_train_like_one(runs):
    one, two = losses(runs["A"]), losses(runs["B"])
    assert sorted(one) == [1, 2, 3, 4] and sorted(two) == [1, 2, 3]
    assert len({round(v, 4) for v in one.values()}) == 4  # the steps change the loss
    for step in (1, 2, 3):
        np.testing.assert_allclose(two[step], one[step], rtol=2e-5, err_msg=f"step {step}")
    # process 0 alone wrote logs and the exported model; both wrote checkpoint shards
    for out in runs.values():
        assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    step3 = runs["B"] / "checkpoints" / "3"
    assert (step3 / "params").is_dir() and (step3 / "meta").exists()


@pytest.mark.slow
def test_checkpoints_restore_across_process_counts(runs, setup):
    a4 = losses(runs["A"])[4]
    c, d = setup / "C", setup / "D"
    wait(
        start(setup, 1, [f"output_dir={c}", f"resume_from_checkpoint={runs['B'] / 'checkpoints'}"]),  # the latest: 3
        start(setup, 2, [f"output_dir={d}", f"resume_from_checkpoint={runs['A'] / 'checkpoints' / '3'}"]),
    )
    for out in (c, d):
        resumed = losses(out)
        assert sorted(resumed) == [4], resumed  # resumed at step 3: only step 4 ran
        np.testing.assert_allclose(resumed[4], a4, rtol=2e-5)
