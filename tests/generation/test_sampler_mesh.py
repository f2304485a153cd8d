"""``generate`` on a mesh and across processes (subprocesses with simulated CPU devices:
tests/generation/mesh_worker.py).

* On 8 devices, meshes {data: 8}, {data: 2, tensor: 4}, {fsdp: 2, tensor: 4} and {data: 2, fsdp: 2,
  tensor: 2} give the one-device tokens exactly (float32, greedy and sampled with a fixed key), and the
  compiled program on a tensor mesh all-gathers no tensor-split weight (the same check on a control
  program that forces the weights whole inside finds those all-gathers).
* On-policy KD on {data: 2, tensor: 2} (4 devices) logs its on-policy metrics and trains on the same
  samples as one device: the same first-step loss.
* Two processes (2 devices each) on one mesh: each passes its own prompts and gets its own completions.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
TEACHER = REPO / "demo" / "teacher"
STUDENT = REPO / "demo" / "tiny-llama"


# Programs with collectives that XLA:CPU loads from the persistent compilation cache (tests/conftest.py turns
# it on) can deadlock between simulated devices: the KD train step on {data: 2, tensor: 2} (4 devices; with
# or without on-policy steps) aborted on a collective's rendezvous timeout in 7 of 19 runs that loaded it
# from the cache, in none of 20 that compiled it. So the subprocesses here compile afresh.


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROC"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _start(case: str, out: Path, devices: int, *args: str, **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.generation.mesh_worker", case, str(out), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(devices, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def _wait(*procs: subprocess.Popen, timeout: int = 600) -> None:
    errs = []
    for p in procs:
        try:
            errs.append(p.communicate(timeout=timeout)[1])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert not any(p.returncode for p in procs), "\n".join(f"--- exit {p.returncode}:\n{e[-4000:]}"
                                                            for p, e in zip(procs, errs))  # fmt: skip


# Two on-policy KD steps of the demo student (random init) with the demo teacher in the step.
KD = [
    "kd_trainer=true", f"kd_teacher_model={TEACHER}", f"base_model={STUDENT}", "random_init_weights=true",
    "kd_teacher_top_k=8", "kd_on_policy_ratio=1.0", "kd_on_policy_max_new_tokens=24", "max_steps=2",
    "micro_batch_size=2", "warmup_steps=0", "datasets.0.split=train[:16]", "sequence_len=128", "test_datasets=",
    "use_tensorboard=false", "dataset_processes=1", "logging_steps=1",
]  # fmt: skip


def kd_config(out_dir: str | Path, *overrides: str):
    """configs/sft.yaml with ``KD``, ``output_dir`` and ``overrides``."""
    from jaxpref.config import load_config

    return load_config(CONFIGS / "sft.yaml", [*KD, f"output_dir={out_dir}", *overrides])


def _train_log(out_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


# ------------------------------------------------------------------------------ 8 devices


@pytest.fixture(scope="module")
def meshes(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("sampler_mesh")
    _wait(_start("meshes", tmp / "meshes.json", 8, str(tmp / "model")))
    return json.loads((tmp / "meshes.json").read_text())


@pytest.mark.slow
def test_meshes_give_the_one_device_tokens(meshes):
    one = meshes["one"]
    assert len({len(t) for t in one["greedy"]}) == 1 and one["sampled"] != one["greedy"]
    keys = [k for k in meshes if k != "one"]
    assert len(keys) == 4 and sum("groups" in meshes[k] for k in keys) == 1
    for key in keys:
        got = meshes[key]
        assert got["greedy"] == one["greedy"], key
        assert got.get("groups", one["greedy"]) == one["greedy"], key  # 2 groups of 3 rows (padded) = 1 of 5
        assert got["sampled"][0] == got["sampled"][1], key  # a fixed key samples the same twice
        # the padding rows after the prompts don't change their samples: as on one device
        assert got["sampled"][0] == one["sampled"], key


@pytest.mark.slow
def test_tensor_parallel_decode_gathers_no_weight(meshes):
    """The compiled program's all-gathers: none gives a tensor-split weight gathered along ``tensor``
    (one layer's or the stack, in any reshaped form: mesh_worker.tensor_weight_shapes); forcing the
    weights whole inside the program (the control) makes the same check find every one of them, and
    the program's temporaries grow. The weights enter split and the KV cache stays split."""
    tensor_meshes = [k for k in meshes if k != "one" and "tensor" in json.loads(k)]
    assert len(tensor_meshes) == 3
    for key in tensor_meshes:
        got = meshes[key]
        assert len(got["tensor_weights"]) == 9, got["tensor_weights"]  # q k v o gate up down, embedding, lm_head
        assert got["weight_gathers"] == [], (key, got["weight_gathers"])
        # the control: the check finds every one of them gathered
        assert got["control_weights_found"] == got["tensor_weights"], (key, got["control_weight_gathers"])
        assert got["control_temp_bytes"] > got["temp_bytes"], key
        # the weights enter the program split: q_proj [layers, hidden, heads, head_dim], heads over tensor
        sizes = {"data": 1, "fsdp": 1, **json.loads(key)}
        q = next(v for k, v in got["weight_shards"].items() if "q_proj" in k and "kernel" in k)
        assert q == [2, 48 // sizes["fsdp"], 12 // sizes["tensor"], 6], (key, q)
        # the KV cache: rows over data x fsdp (5 rows padded to a multiple), KV heads over tensor, never whole
        rows, kv = -(-5 // (sizes["data"] * sizes["fsdp"])), 4 // sizes["tensor"]
        assert got["cache_blocks"] == [f"f32[2,{rows},76,{kv},6]"], (key, got["cache_blocks"])
    # {data: 2, fsdp: 2, tensor: 2}: left to XLA, the embedding lookup gathers the (small) table along
    # the vocabulary; placement.embed looks it up in each device's slice instead
    mixed = meshes[json.dumps({"data": 2, "fsdp": 2, "tensor": 2})]
    assert mixed["xla_lookup_weight_gathers"] == [
        "f32[128, 24]: ['embed_tokens']['embedding'] or ['lm_head']['kernel']"
    ]
    # {fsdp: 2, tensor: 4}: the fsdp-split weights are gathered per layer over fsdp (still split over
    # tensor), so the program does all-gather weights, just never along tensor
    gathers = meshes[json.dumps({"fsdp": 2, "tensor": 4})]["all_gathers"]
    assert "f32[48, 18]" in gathers, gathers  # q_proj: [hidden, heads * head_dim / 4]


# -------------------------------------------------------------------------- on-policy KD


@pytest.mark.slow
def test_on_policy_kd_on_a_mesh_equals_one_device(tmp_path):
    """2 on-policy KD steps on {data: 2, tensor: 2} (4 devices, a subprocess) and on one device (here):
    the same samples (one key), so the same first-step loss; the on-policy metrics are logged."""
    from jaxpref.train import run

    mesh_out = tmp_path / "mesh"
    proc = _start("kd", tmp_path / "kd.json", 4, str(mesh_out))
    one = run(kd_config(tmp_path / "one"), show_progress=False)
    _wait(proc)
    on_mesh = json.loads((tmp_path / "kd.json").read_text())
    assert on_mesh["steps"] == one["steps"] == 2
    logged = {"one": _train_log(tmp_path / "one"), "mesh": _train_log(mesh_out)}
    for log in logged.values():
        assert [m["step"] for m in log] == [1, 2]
        assert all(m["on_policy"] == 1.0 and m["sampling_seconds"] > 0 and m["completion_tokens"] > 0 for m in log)
    first = [logged[k][0] for k in ("one", "mesh")]
    assert first[0]["completion_tokens"] == first[1]["completion_tokens"]
    assert first[1]["loss"] == pytest.approx(first[0]["loss"], abs=1e-4), first


# ------------------------------------------------------------------------------ processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _coordinated(pid: int, port: int) -> dict[str, str]:
    return dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))


@pytest.mark.slow
def test_each_process_gets_its_own_completions(tmp_path):
    from tests.generation.mesh_worker import MODEL
    from tests.models.tiny import build_hf

    build_hf("llama", seed=6, **MODEL).save_pretrained(tmp_path / "model")
    port = _free_port()
    out = tmp_path / "processes.json"
    _wait(*[_start("processes", out, 2, str(tmp_path / "model"), **_coordinated(pid, port)) for pid in (0, 1)])
    for pid in (0, 1):
        got = json.loads(out.with_name(f"{out.name}.{pid}").read_text())
        assert got["process"] == pid and got["devices"] == [2, 4]
        assert len(got["greedy"]) == (2 if pid == 0 else 5)
        assert got["greedy"] == got["greedy_reference"], pid
        assert got["sampled"] == got["sampled_reference"], pid
        assert got["empty"] == ([] if pid == 0 else got["greedy"][:1]), pid


def _train(out_dir: Path, devices: int, *overrides: str, **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jaxpref.train", "--config", str(CONFIGS / "sft.yaml"), "--no_progress", *KD,
           f"output_dir={out_dir}", *overrides]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, env=_env(devices, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


@pytest.mark.slow
def test_on_policy_kd_on_two_processes_equals_one(tmp_path):
    """On {data: 2, tensor: 2}, two processes of 2 devices (``micro_batch_size: 2`` each) train the same
    2 on-policy steps as one process of 4 devices (``micro_batch_size: 4``).

    Greedy sampling and one sequence per row (no packing): with a temperature a prompt's sample depends
    on its row in the sampling batch, and the data pipeline deals the global batch's rows to processes
    alternately (process p gets rows p, p + 2, ...), so the two runs sample the same prompts in other
    rows; with packing, each process packs its own sequences into its own rows (other drops possible).
    """
    common = ["mesh.data=2", "mesh.tensor=2", "sample_packing=false", "kd_on_policy_temperature=0"]
    port = _free_port()
    one = _train(tmp_path / "one", 4, *common, "micro_batch_size=4")
    two = [_train(tmp_path / "two", 2, *common, **_coordinated(pid, port)) for pid in (0, 1)]
    _wait(one, *two)
    logs = [_train_log(tmp_path / "one"), _train_log(tmp_path / "two")]
    for log in logs:
        assert [m["step"] for m in log] == [1, 2] and all(m["on_policy"] == 1.0 for m in log)
    for a, b in zip(*logs):
        assert b["completion_tokens"] == a["completion_tokens"] > 0  # summed over the processes
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-5), (a, b)
