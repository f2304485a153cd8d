"""``python -m jaxpref.train`` with ``adapter: qlora``: the dry-run plan counts NF4 bytes; a run trains, saves
an orbax checkpoint, resumes from it and exports a PEFT adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from jaxpref.train import main
from tests.trainer.test_train_cli import REPO, read_metrics, small_config

# tiny-llama: 4 layers of q 128x128, k/v 128x64, o 128x128, gate/up/down 128x384
WEIGHTS = [128 * 128, 128 * 64, 128 * 64, 128 * 128, 128 * 384, 128 * 384, 128 * 384]


def test_qlora_dry_run_counts_nf4_bytes(tmp_path, capsys):
    from jaxpref.models import nf4

    cfg = small_config(tmp_path, adapter="qlora", lora_r=4, lora_target_linear=True)
    assert main(["--config", str(cfg), "--dry_run"]) == 0
    report = yaml.safe_load(capsys.readouterr().out)
    quantized = 4 * sum(nf4.quantized_bytes(n, nf4.NF4Config()) for n in WEIGHTS)
    assert report["quantized_param_bytes_per_device"] == quantized
    lora = 4 * sum(4 * (128 + n // 128) for n in WEIGHTS)  # A [in, 4] + B [4, out] per projection, float32
    floats = (512 * 128 + 4 * 2 * 128 + 128) * 4  # tied embedding and norms, float32
    assert report["param_bytes_per_device"] == quantized + floats + lora * 4
    layer = sum(WEIGHTS) + 2 * 128
    assert report["parameters"] == 512 * 128 + 4 * layer + 128 + lora


@pytest.mark.slow
def test_qlora_run_checkpoints_resumes_and_exports(tmp_path):
    from jaxpref import models

    base = models.from_config(models.load_model_config(REPO / "demo" / "tiny-llama"), seed=3)
    models.save_pretrained(base, tmp_path / "base")
    cfg = small_config(
        tmp_path, adapter="qlora", lora_r=4, lora_alpha=8, lora_target_linear=True, random_init_weights=False,
        base_model=str(tmp_path / "base"), tokenizer_config=str(REPO / "demo" / "tiny-llama"), learning_rate=1e-2,
        eval_steps=None, evals_per_epoch=0, resume_from_checkpoint="auto",
    )  # fmt: skip
    assert main(["--no_progress", "--config", str(cfg), "max_steps=2", "save_steps=2"]) == 0
    out = tmp_path / "out"
    assert (out / "checkpoints" / "2").exists()
    assert main(["--no_progress", "--config", str(cfg), "max_steps=3", "save_steps=2"]) == 0
    train = read_metrics(out)
    assert 3 in train and np.isfinite(train[3]["loss"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]  # resumed at step 2, not restarted
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4 and not (out / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        ["--config", "configs/dpo_lora.yaml", "adapter=qlora", "param_dtype=bfloat16", "bf16=true"],
        ["--config", "configs/dpo_lora.yaml", "adapter=qlora", "rl_adapter_ref_model=true"],
    ],
    ids=["dpo-adapter-off-reference-bf16", "dpo-quantized-reference-copy"],
)
def test_qlora_preference_runs(tmp_path, command, monkeypatch):
    """DPO on a 4-bit base: the reference is the adapters-off forward, or a frozen NF4 copy of the base."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    assert main([*command, "max_steps=2", f"output_dir={out}", "use_tensorboard=false", "--no_progress"]) == 0
    train = read_metrics(out)
    assert np.isfinite(train[2]["loss"]) and np.isfinite(train[2]["grad_norm"])
    assert (out / "adapter_config.json").exists()


def test_trainer_counts_nf4_weights_as_frozen_parameters(tmp_path):
    """The run's "N trainable, M frozen" line counts an NF4 weight's values, as for the float model."""
    import optax
    from flax import nnx

    from jaxpref import lora, models
    from jaxpref import sharding as shd
    from jaxpref.config import load_config
    from jaxpref.objectives import build_objective
    from jaxpref.trainer import Trainer

    objective = build_objective(load_config(small_config(tmp_path)), "sft")
    config = models.load_model_config(REPO / "demo" / "tiny-llama")
    counts = []
    for quantization in (None, models.nf4.NF4Config()):
        model = models.from_config(config, seed=0, quantization=quantization)
        lora.apply_lora(
            model, lora.LoraConfig(r=2, alpha=2.0, dropout=0.0, target_modules=("q_proj",)), rngs=nnx.Rngs(0)
        )
        trainer = Trainer(
            model, objective, optax.sgd(0.0), mesh=shd.make_mesh(None), trainable=lora.trainable_filter(model)
        )
        counts.append(trainer.num_params())
    assert counts[0] == counts[1]


def test_qlora_quantize_embeddings_dry_run_trains_and_exports(tmp_path, capsys):
    """qlora_quantize_embeddings: the plan counts the NF4 embedding (tied, 512 x 128) with the projections; a
    2-step run from a checkpoint (quantized as read) trains and exports a PEFT adapter."""
    from jaxpref import models
    from jaxpref.models import nf4

    base = models.from_config(models.load_model_config(REPO / "demo" / "tiny-llama"), seed=3)
    models.save_pretrained(base, tmp_path / "base")
    cfg = small_config(
        tmp_path, adapter="qlora", lora_r=4, lora_alpha=8, lora_target_linear=True, qlora_quantize_embeddings=True,
        random_init_weights=False, base_model=str(tmp_path / "base"),
        tokenizer_config=str(REPO / "demo" / "tiny-llama"), learning_rate=1e-2, eval_steps=None, evals_per_epoch=0,
    )  # fmt: skip
    assert main(["--config", str(cfg), "--dry_run"]) == 0
    report = yaml.safe_load(capsys.readouterr().out)
    quantized = 4 * sum(nf4.quantized_bytes(n, nf4.NF4Config()) for n in WEIGHTS)
    quantized += nf4.quantized_bytes(512 * 128, nf4.NF4Config())
    assert report["quantized_param_bytes_per_device"] == quantized
    assert report["parameters"] == 512 * 128 + 4 * (sum(WEIGHTS) + 2 * 128) + 128 + 4 * sum(
        4 * (128 + n // 128) for n in WEIGHTS
    )
    assert main(["--no_progress", "--config", str(cfg), "max_steps=2"]) == 0
    out = tmp_path / "out"
    train = read_metrics(out)
    assert np.isfinite(train[2]["loss"]) and train[2]["grad_norm"] > 0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["modules_to_save"] in (None, [])
    from safetensors.numpy import load_file

    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)  # adapters only: no embedding in the PEFT export
