"""``python -m jaxpref.train`` end to end on the embedded default: outputs, resume after SIGKILL, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from jaxpref.train import main

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(sequence_len=128, micro_batch_size=4, logging_steps=1, eval_steps=0.5, save_total_limit=3, warmup_steps=2)


def small_config(tmp_path: Path, **overrides) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "sft.yaml").read_text())
    cfg["base_model"] = str(REPO / "demo" / "tiny-llama")
    cfg["datasets"][0]["path"] = str(REPO / "demo" / "data" / "sft_train.jsonl")
    cfg["test_datasets"][0]["path"] = str(REPO / "demo" / "data" / "sft_eval.jsonl")
    cfg["output_dir"] = str(tmp_path / "out")
    cfg.update(SMALL)
    cfg.update(overrides)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(out: Path, split: str = "train") -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == split}


def run_cli(args, **kw):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.Popen(
        [sys.executable, "-m", "jaxpref.train", *args], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
    )


@pytest.mark.slow
def test_sft_run_writes_logs_checkpoints_and_a_transformers_model(tmp_path):
    cfg = small_config(tmp_path)
    proc = run_cli(["--config", str(cfg), "max_steps=6", "save_steps=3"])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    out = tmp_path / "out"
    assert "train: 100%" in err  # the progress bar
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
    assert list((out / "runs").glob("events.out.tfevents.*"))
    train = read_metrics(out)
    assert sorted(train) == list(range(1, 7))
    for key in ("loss", "learning_rate", "grad_norm", "tokens", "trainable_tokens", "step_time", "tokens_per_second"):
        assert np.isfinite(train[6][key]), key
    assert set(read_metrics(out, "eval")) == {3, 6}

    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxpref import models

    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = tok.apply_chat_template([{"role": "user", "content": "Compute 2+2"}], add_generation_prompt=True,
                                  return_dict=True)["input_ids"]
    ours = models.from_pretrained(out)
    logits_ours = np.asarray(ours.logits(ours(np.asarray([ids], np.int32))))
    with torch.no_grad():
        logits_hf = hf(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(logits_ours, logits_hf, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("precision", [[], ["bfloat16=true"]], ids=["float32", "bfloat16"])
def test_sigkill_and_restart_gives_the_uninterrupted_loss_curve(tmp_path, precision):
    """bfloat16 (axolotl's key: bfloat16 parameters and compute) resumes exactly too: float32 optimizer
    state in the checkpoint, stochastic rounding seeded by the step; its export is a bfloat16 model."""
    steps = ["max_steps=24", "save_steps=4", *precision]
    ref_cfg = small_config(tmp_path / "ref")
    ref = run_cli(["--config", str(ref_cfg), *steps, "--no_progress"])
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err
    reference = read_metrics(tmp_path / "ref" / "out")

    cfg = small_config(tmp_path / "killed")
    out = tmp_path / "killed" / "out"
    proc = run_cli(["--config", str(cfg), *steps, "--no_progress"])
    deadline = time.time() + 300
    while not (out / "checkpoints" / "8").is_dir():  # a finished checkpoint (written atomically)
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(read_metrics(out))
    assert killed_at < 24, "the run finished before it could be killed"

    again = run_cli(["--config", str(cfg), *steps, "--no_progress"])
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert "resumed from" in err
    resumed = read_metrics(out)
    assert sorted(resumed) == list(range(1, 25))  # rewound: no step logged twice, none missing
    for step in range(1, 25):
        assert resumed[step]["loss"] == reference[step]["loss"], step
    final_ref, final = read_metrics(tmp_path / "ref" / "out", "eval"), read_metrics(out, "eval")
    assert final[24]["loss"] == final_ref[24]["loss"]
    if precision:
        _check_bfloat16_export(out)


def _check_bfloat16_export(out: Path) -> None:
    """A bfloat16 run writes a bfloat16 checkpoint that transformers loads with jaxpref's logits."""
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from jaxpref import models

    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    ours = models.from_pretrained(out)  # float32 parameters holding the bfloat16 values
    ids = np.arange(1, 30, dtype=np.int32)[None]
    with torch.no_grad():
        logits_hf = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours.logits(ours(ids))), logits_hf, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        ["--config", "configs/sft.yaml", "param_dtype=bfloat16"],
        ["--config", "configs/dpo_lora.yaml", "param_dtype=bfloat16", "bf16=true"],
        ["--config", "configs/sft.yaml", "optimizer=adafactor"],
    ],
    ids=["sft-bf16", "dpo_lora-bf16", "sft-adafactor"],
)
def test_the_commands_that_crashed_run(tmp_path, command, monkeypatch):
    """Issue 20's reproductions (both ended in a lax.cond traceback; Adafactor in the sharding rules)."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    assert main([*command, "max_steps=2", f"output_dir={out}", "use_tensorboard=false", "--no_progress"]) == 0
    train = read_metrics(out)  # the configs log every 10 steps: the last step is logged
    assert np.isfinite(train[2]["loss"]) and np.isfinite(train[2]["grad_norm"])
    assert (out / "checkpoints" / "2").is_dir()


def test_flags_may_follow_overrides(tmp_path, capsys):
    """``... logging_steps=1 --dry_run`` used to be an argparse error."""
    cfg = small_config(tmp_path)
    assert main(["--config", str(cfg), "logging_steps=1", "--dry_run", "micro_batch_size=2"]) == 0
    assert "parameters:" in capsys.readouterr().out


def _bad(tmp_path, capsys, args):
    code = main(["--no_progress", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    return err


def test_unknown_key_and_wrong_type_exit_2(tmp_path, capsys):
    cfg = small_config(tmp_path)
    err = _bad(tmp_path, capsys, ["--config", str(cfg), "lerning_rate=1e-3"])
    assert "learning_rate" in err
    err = _bad(tmp_path, capsys, ["--config", str(cfg), "micro_batch_size=two"])
    assert "micro_batch_size" in err
    err = _bad(tmp_path, capsys, ["--config", str(tmp_path / "missing.yaml")])
    assert "missing.yaml" in err


def test_missing_model_and_dataset_paths_exit_2(tmp_path, capsys):
    cfg = small_config(tmp_path, base_model=str(tmp_path / "no-such-model"))
    err = _bad(tmp_path, capsys, ["--config", str(cfg)])
    assert "no-such-model" in err
    cfg = small_config(tmp_path)
    err = _bad(tmp_path, capsys, ["--config", str(cfg), f"datasets.0.path={tmp_path / 'nope.jsonl'}"])
    assert "nope.jsonl" in err


def test_tokenizer_without_chat_template_exit_2(tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(REPO / "demo" / "tiny-llama", model_dir)
    (model_dir / "chat_template.jinja").unlink()
    cfg = small_config(tmp_path, base_model=str(model_dir), chat_template="tokenizer_default")
    err = _bad(tmp_path, capsys, ["--config", str(cfg)])
    assert "chat template" in err.lower() or "chat_template" in err


def test_unwritable_output_dir_exit_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = small_config(tmp_path, output_dir=str(blocker / "out"))
    err = _bad(tmp_path, capsys, ["--config", str(cfg)])
    assert "output_dir" in err


def test_existing_checkpoints_without_resume_exit_2(tmp_path, capsys):
    cfg = small_config(tmp_path, resume_from_checkpoint=None)
    (tmp_path / "out" / "checkpoints" / "5").mkdir(parents=True)
    err = _bad(tmp_path, capsys, ["--config", str(cfg)])
    assert "resume_from_checkpoint: auto" in err


def test_cli_subprocess_exit_code_is_2(tmp_path):
    cfg = small_config(tmp_path)
    proc = run_cli(["--config", str(cfg), "not_a_key=1"])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "not_a_key" in err and "Traceback" not in err


def test_plugin_objective_by_import_path(tmp_path):
    cfg = small_config(tmp_path, objective="tests.trainer.plugin_example:build")
    assert main(["--no_progress", "--config", str(cfg), "max_steps=2", "eval_steps=2"]) == 0
    train = read_metrics(tmp_path / "out")
    assert train[2]["plugin_tokens"] == pytest.approx(1.0)  # a contribution: sums to 1 over the step
    assert read_metrics(tmp_path / "out", "eval")[2]["plugin_tokens"] == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_lora_sft_run_exports_a_peft_adapter(tmp_path, param_dtype, capsys):
    """Also: LoRA dropout's RNG state is not counted as frozen parameters, and with an eval set but no
    eval cadence the run evaluates once, after the last step (it used to never evaluate)."""
    pytest.importorskip("peft")
    import jax.numpy as jnp
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jaxpref import lora, models

    cfg = small_config(
        tmp_path, adapter="lora", lora_r=4, lora_alpha=8, lora_dropout=0.1, lora_target_linear=True,
        random_init_weights=False, base_model=str(tmp_path / "base"), learning_rate=1e-2,
        tokenizer_config=str(REPO / "demo" / "tiny-llama"), param_dtype=param_dtype, eval_steps=None,
    )
    base = models.from_config(models.load_model_config(REPO / "demo" / "tiny-llama"), seed=3)
    models.save_pretrained(base, tmp_path / "base")
    assert main(["--no_progress", "--config", str(cfg), "max_steps=3", "save_steps=3"]) == 0
    out = tmp_path / "out"
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    n_base = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(base, nnx.Param)))
    assert f"trainable, {n_base:,} frozen" in capsys.readouterr().err
    assert set(read_metrics(out, "eval")) == {3}

    dtype = jnp.dtype(param_dtype)
    ours = models.from_pretrained(tmp_path / "base", param_dtype=dtype)
    lora.load_peft_adapter(ours, out)
    ids = np.arange(1, 20, dtype=np.int32)[None]
    logits_ours = np.asarray(ours.logits(ours(ids)))
    base_logits = np.asarray(base.logits(base(ids)))
    assert np.abs(logits_ours - base_logits).max() > 1e-4  # the adapter learned something
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[param_dtype]
    hf_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch_dtype).float()  # as computed
    hf = PeftModel.from_pretrained(hf_base, out).eval()
    with torch.no_grad():
        logits_hf = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(logits_ours, logits_hf, atol=1e-4)


def test_dry_run_reports_sizes_without_weights(tmp_path, capsys):
    cfg = small_config(tmp_path)
    assert main(["--config", str(cfg), "--dry_run"]) == 0
    report = yaml.safe_load(capsys.readouterr().out)
    # tiny-llama: tied 512 x 128 embedding, 4 layers of (q 128x128, k/v 128x64, o 128x128, mlp 3 x 128x384,
    # 2 norms), final norm
    layer = 128 * 128 * 2 + 128 * 64 * 2 + 3 * 128 * 384 + 2 * 128
    assert report["parameters"] == 512 * 128 + 4 * layer + 128
    assert report["param_bytes_per_device"] == report["parameters"] * 4
    assert not (tmp_path / "out").exists()


def test_plan_steps_counts_micro_batches_as_one_stream():
    from types import SimpleNamespace

    from jaxpref.errors import ConfigError
    from jaxpref.train import plan_steps

    cfg = lambda **kw: SimpleNamespace(**{"gradient_accumulation_steps": 4, "max_steps": None, "num_epochs": 1, **kw})
    assert plan_steps(cfg(), 10) == (2, 2)  # 10 micro-batches: 2 full steps, 2 left over
    assert plan_steps(cfg(num_epochs=3), 10) == (7, 2)  # epochs continue the stream: 30 // 4
    assert plan_steps(cfg(num_epochs=0.5), 10) == (1, 2)
    assert plan_steps(cfg(max_steps=50), 10) == (50, 2)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        plan_steps(cfg(), 3)


def test_eval_cadence_zero_means_no_evaluation():
    from types import SimpleNamespace

    from jaxpref.train import eval_cadence

    cfg = lambda **kw: SimpleNamespace(**{"eval_steps": None, "evals_per_epoch": None, **kw})
    assert eval_cadence(cfg(), True, 10, 30) == 30  # default: once, after the last step
    assert eval_cadence(cfg(evals_per_epoch=0), True, 10, 30) is None  # the schema's "no evaluation"
    assert eval_cadence(cfg(evals_per_epoch=2), True, 10, 30) == 5
    assert eval_cadence(cfg(eval_steps=0.5), True, 10, 30) == 15
    assert eval_cadence(cfg(eval_steps=7), False, 10, 30) is None  # no eval set
