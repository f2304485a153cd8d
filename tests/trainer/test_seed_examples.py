"""The seed examples (axolotl's RLHF guide, ``tests/config/seed_examples``) on a complete tiny config.

Each partial YAML is merged into a base config in the style users add them to (tiny demo model, LoRA,
``rl: dpo`` and a hub dataset for the examples that name neither). Offline, every one must get past
validation, the objective and the tokenizer, and stop at the download of its hub dataset: exit code 2
and one message naming that dataset, no traceback. ``local_dataset.yaml`` with a local
``orca_rlhf.jsonl`` (Intel/orca_dpo_pairs rows) trains and exits 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jaxpref.train import main

REPO = Path(__file__).resolve().parents[2]
SEED_DIR = REPO / "tests" / "config" / "seed_examples"
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"
SEEDS = sorted(p.name for p in SEED_DIR.glob("*.yaml"))
BASE_DATASET = "Intel/orca_dpo_pairs"


def base_config(tmp_path: Path) -> dict:
    """A complete config (tiny random-init model, LoRA, DPO on a hub dataset) the seeds are added to."""
    return {
        "base_model": str(REPO / "demo" / "tiny-llama"),
        "random_init_weights": True,
        "chat_template": "chatml",
        "rl": "dpo",
        "datasets": [{"path": BASE_DATASET, "type": "chatml.intel", "split": "train"}],
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_linear": True,
        "sequence_len": 128,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 2,
        "learning_rate": 1e-4,
        "optimizer": "adamw_torch",
        "logging_steps": 1,
        "output_dir": str(tmp_path / "out"),
    }


def merged(tmp_path: Path, example: str) -> tuple[Path, dict]:
    """The seed ``example`` added to the base config, written next to nothing else in ``tmp_path``."""
    seed = yaml.safe_load((SEED_DIR / example).read_text())
    cfg = {**base_config(tmp_path), **seed}
    path = tmp_path / example
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, seed


def test_every_seed_example_is_covered():
    assert SEEDS == [
        "adapter_ref_model.yaml",
        "dpo.yaml",
        "ipo.yaml",
        "kto.yaml",
        "local_dataset.yaml",
        "orpo.yaml",
    ]


@pytest.mark.parametrize("example", [s for s in SEEDS if s != "local_dataset.yaml"])
def test_offline_seed_example_stops_at_its_hub_dataset(example, tmp_path, capsys):
    path, seed = merged(tmp_path, example)
    hub_path = seed["datasets"][0]["path"] if "datasets" in seed else BASE_DATASET
    assert main(["--config", str(path), "--no_progress"]) == 2
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(message) == 1, err
    assert f"dataset {hub_path!r} could not be downloaded from the Hugging Face Hub" in message[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.slow
def test_offline_seed_example_as_a_process_exits_2_without_traceback(tmp_path):
    path, _ = merged(tmp_path, "kto.yaml")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "jaxpref.train", "--config", str(path), "--no_progress"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "argilla/ultrafeedback-binarized-preferences-cleaned-kto" in proc.stderr
    assert "Traceback" not in proc.stderr


def orca_rows() -> list[dict]:
    """Intel/orca_dpo_pairs rows: the shipped demo pairs (same fields as the shared fixture)."""
    rows = [json.loads(line) for line in (REPO / "demo" / "data" / "pref_intel_train.jsonl").open()][:24]
    fixture = SHARED_FIXTURES / "orca_dpo_pairs.jsonl"
    if fixture.exists():  # the shape is the public dataset's, as the shared fixture shows it
        shape = {k: type(v) for k, v in json.loads(fixture.open().readline()).items()}
        assert all({k: type(v) for k, v in row.items()} == shape for row in rows)
    return rows


@pytest.mark.slow
def test_local_dataset_example_trains(tmp_path, capsys):
    with (tmp_path / "orca_rlhf.jsonl").open("w") as f:
        for row in orca_rows():
            f.write(json.dumps(row) + "\n")
    path, seed = merged(tmp_path, "local_dataset.yaml")
    assert seed["datasets"][0]["data_files"] == ["orca_rlhf.jsonl"]  # relative: found next to the config
    assert main(["--config", str(path), "--no_progress"]) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(0 < r["loss"] < 5 and "rewards/accuracies" in r for r in train)
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
