"""scripts/device_check.sh: the smoke run's table (CPU, toy sizes) and the script's pure helpers.

The smoke run goes through every code path of the GPU check (fused loss in Pallas interpret mode, KD and
DPO train steps of a tiny Llama through jaxpref's training path, the table); no timing is asserted.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "device_check.py"


def load_device_check():
    """scripts/device_check.py as a module (it imports nothing heavy at the top: no JAX)."""
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_check"] = module  # dataclasses resolve the module's annotations through it
    spec.loader.exec_module(module)
    return module


dc = load_device_check()


def parse_table(text: str) -> dict[str, dict[str, str]]:
    """Rows of the markdown table by their first cell: {"setting", "result", "status"}."""
    rows = {}
    for line in text.splitlines():
        if not line.startswith("| ") or line.startswith("| ---") or line.startswith("| check |"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 4, line
        rows[cells[0]] = {"setting": cells[1], "result": cells[2], "status": cells[3]}
    return rows


@pytest.mark.slow
def test_smoke_run_fills_every_row_and_passes_every_check(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "OUT")}  # one CPU device
    env["PYTHON"] = sys.executable  # the .sh runs device_check.py with it; --smoke installs nothing
    out, raw = tmp_path / "table.md", tmp_path / "raw.json"
    cmd = ["bash", str(REPO / "scripts" / "device_check.sh"), "--smoke", "--out", str(out), "--json", str(raw)]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "device_check.sh:" not in done.stderr  # --smoke neither installs wheels nor looks for them

    text = out.read_text()
    assert text in done.stdout  # the same table on stdout
    rows = parse_table(text)
    assert rows["machine"]["status"] == "info" and "jax" in rows["machine"]["result"]
    for part in dc.PARTS:
        for name, kind in dc.expected_rows(part):
            assert name in rows, f"missing row {name!r}"
            assert rows[name]["status"] == ("pass" if kind == "check" else "measured"), (name, rows[name])
    for impl in dc.FUSED_IMPLS:
        assert "temporaries" in rows[dc.fused_time_row(impl)]["result"]
    for name in ("KD train step", "DPO train step"):
        assert "tokens/s" in rows[name]["result"] and "MFU" in rows[name]["result"]
        assert "remat full" in rows[name]["setting"]

    results = json.loads(raw.read_text())["results"]
    assert set(results) == set(dc.PARTS)
    assert all(r["error"] is None for r in results.values())
    dpo = next(r for r in results["dpo"]["rows"] if r["name"] == "DPO train step")["raw"]
    assert dpo["tokens_per_s"] > 0 and dpo["peak_bytes"] > 0


def test_matmul_params_of_llama_3_2_1b_are_its_parameters_without_norms():
    config = json.loads((REPO / "configs" / "models" / "Llama-3.2-1B" / "config.json").read_text())
    norms = 2048 * (2 * 16 + 1)  # two per layer and the final one; the tied embedding is the LM head
    assert dc.matmul_params(config) == 1_235_814_400 - norms


def test_model_flops_formula():
    config = {
        "num_hidden_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 4, "intermediate_size": 16, "vocab_size": 10,
    }  # fmt: skip
    p = 2 * (8 * 8 + 2 * 8 * 4 + 8 * 8 + 3 * 8 * 16) + 8 * 10
    assert dc.matmul_params(config) == p
    rows, t = 3, 5
    forward = 2 * p * rows * t + 2 * 2 * 2 * 4 * t**2 * rows
    assert dc.model_flops(config, rows, t, reference_forward=False) == 3 * forward
    assert dc.model_flops(config, rows, t, reference_forward=True) == 4 * forward


@pytest.mark.parametrize(
    "kind, peak",
    [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA H100 PCIe", 756e12), ("cpu", None)],
)
def test_peak_flops(kind, peak):
    assert dc.peak_flops(kind) == peak


def test_a_failed_part_lists_its_rows_as_failures():
    results = {
        "kd": {"machine": None, "rows": [], "notes": [], "error": "timed out after 150 s", "seconds": 150.0},
        "dpo": {
            "machine": {"device_kind": "cpu", "platform": "cpu", "devices": 1, "jax": "x", "jaxlib": "x",
                        "flax": "x", "optax": "x", "pydantic": "x", "python": "3"},
            "rows": [{"name": n, "setting": "", "result": "ok", "status": "pass" if k == "check" else "measured"}
                     for n, k in dc.expected_rows("dpo")],
            "notes": [], "error": None, "seconds": 1.0,
        },
    }  # fmt: skip
    rows = parse_table(dc.render_table(results, dc.SMOKE))
    assert rows["KD train step"]["status"] == "fail" and "timed out" in rows["KD train step"]["result"]
    assert rows["DPO train step"]["status"] == "measured"
    assert rows["machine"]["result"].startswith("cpu (cpu, 1 device(s))")
    assert not dc.all_passed(results)
    del results["kd"]
    assert dc.all_passed(results)


def test_batches_follow_jaxpref_layouts():
    kd = dc.kd_batch(rows=2, seq_len=6, vocab=512, top_k=8)
    assert kd["target_token_ids"].shape == (2, 6, 8)
    assert all(len(set(row)) == 8 for row in kd["target_token_ids"][:, :-1].reshape(-1, 8))  # distinct ids
    probs = dc.np.exp(kd["target_logprobs"][:, :-1]).sum(-1)
    assert dc.np.allclose(probs, 1.0, atol=1e-5) and not kd["loss_mask"][:, -1].any()
    dpo = dc.dpo_batch(pairs=2, seq_len=10, prompt_len=4, vocab=512)
    for side in ("chosen", "rejected"):
        assert dpo[f"{side}_input_ids"].shape == (2, 10)
        assert dpo[f"{side}_loss_mask"].sum(1).tolist() == [6, 6]  # predictions of the 6 completion tokens
    assert math.isclose(dc.rel_err([1.0, 2.0], [1.0, 4.0]), 0.5)
