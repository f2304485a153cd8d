"""scripts/bench_grpo_step.py: the --quick smoke run (TRL's GRPOTrainer and jaxpref's GRPO loop on a tiny
Llama, one timed step each, the table) and the script's pure helpers. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "bench_grpo_step.py"


def load_bench():
    sys.path.insert(0, str(SCRIPT.parent))  # it imports bench_kd_step from its folder
    spec = importlib.util.spec_from_file_location("bench_grpo_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_grpo_step"] = module  # dataclasses resolve the module's annotations through it
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def test_reward_is_the_share_of_even_ids():
    assert bench.even_ids_reward(["t4 t7 t10 t3", "t5", ""]) == [0.5, 0.0, 0.0]


def test_prompts_round_trip_to_exactly_p_ids():
    shape = bench.CONFIGS["quick"]
    tok = bench.tokenizer(shape.vocab)
    texts = bench.prompt_texts(shape)
    assert len(texts) == shape.prompts
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert all(len(i) == shape.prompt_len and min(i) >= 3 for i in ids)
    assert tok.decode(ids[0]) == texts[0] and tok.eos_token_id == 2
    assert shape.tokens_per_step == 2 * 4 * (8 + 8)


@pytest.mark.slow
def test_quick_run_gives_both_rows_with_full_length_completions(tmp_path):
    out, raw = tmp_path / "table.md", tmp_path / "raw.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--json", str(raw)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads(raw.read_text())["results"]
    assert [r["impl"] for r in results] == ["trl", "jaxpref"]
    shape = bench.CONFIGS["quick"]
    for r in results:
        assert "error" not in r, r
        assert r["mean_length"] == shape.completion_len  # no completion ended early, on either side
        assert r["tokens_per_step"] == shape.tokens_per_step and r["tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0
        assert 0 < r["sampling_share"] < 1 and len(r["times_s"]) == 1 and len(r["losses"]) == 2
        assert abs(r["losses"][0]) < 1e-4  # ratio 1, centred advantages, equal lengths: 0 by construction
    entropies = [r["entropy_step1"] for r in results]  # same weights, similar contexts: about log(V) at init
    assert abs(entropies[0] - entropies[1]) < 0.01
    text = out.read_text()
    assert text.startswith("Machine: ") and "| quick (2 layers" in text and "tokens/s vs TRL" in text
