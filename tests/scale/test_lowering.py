"""``--dry_run --lower_for tpu,cuda``: the real train step of shipped configs, lowered for TPU and GPU
on this CPU-only machine, carries the Pallas fused loss and the platform's attention kernel.

What the modules must contain (``jaxpref.lowering.describe_module``):
* TPU: Mosaic custom calls (``tpu_custom_call``) named ``linear_lse_*`` (the fused LM-head loss) and
  ``splash_mqa_*`` (splash attention), forward and backward.
* CUDA: Triton custom calls named ``linear_lse_*`` and cuDNN flash attention (``__cudnn$fmha*``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxpref.config import load_config
from jaxpref.lowering import lower_train_step
from jaxpref.train import main

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
KD_TRAIN = REPO / "demo" / "data" / "kd_train"
# bfloat16 compute (cuDNN attention needs it), a short step, no eval set.
TINY = ["bf16=true", "max_steps=2", "test_datasets=", "dataset_processes=1", "micro_batch_size=4"]
CASES = {
    "sft": ("sft.yaml", ["datasets.0.split=train[:16]", "sequence_len=128"]),
    "kd_stored_targets": ("kd.yaml", [f"datasets.0.data_files=[{KD_TRAIN}/part-*.parquet]",
                                      "datasets.0.split=train[:16]", "sequence_len=128"]),
    "kd_online_teacher": ("sft.yaml", ["datasets.0.split=train[:16]", "sequence_len=128", "kd_trainer=true",
                                       f"kd_teacher_model={REPO / 'demo' / 'teacher'}", "kd_teacher_top_k=8",
                                       "kd_ce_alpha=0.5"]),
    # targets from a teacher server (never asked: the lowering only needs their shapes), a scheduled T
    "kd_teacher_server": ("sft.yaml", ["datasets.0.split=train[:16]", "sequence_len=128", "kd_trainer=true",
                                       "kd_online_server_base_url=http://127.0.0.1:9", "kd_online_topk=8",
                                       "kd_temperature=2.0", "kd_temperature_min=1.0", "kd_ce_alpha=0.5"]),
    "dpo_lora_adapter_off_reference": ("dpo_lora.yaml", ["datasets.0.split=train[:8]",
                                                         "rl_adapter_ref_model=false"]),
    "kto": ("kto.yaml", ["datasets.0.split=train[:8]", "gradient_checkpointing=true"]),
    # GRPO with a KL term: the reference is the policy with its LoRA adapters off
    "grpo_lora_kl": ("grpo.yaml", ["datasets.0.split=train[:16]", "trl.num_generations=4", "trl.beta=0.04",
                                   "adapter=lora", "lora_target_linear=true", "trl.num_iterations=2"]),
}  # fmt: skip


def assert_accelerator_kernels(report: dict, *, trains_lm_head: bool) -> None:
    """The Pallas fused loss and the attention kernel, forward and backward, in both modules."""
    tpu, cuda = report["tpu"], report["cuda"]
    assert tpu["custom_calls"]["tpu_custom_call"] == sum(tpu["kernels"].values())
    assert cuda["custom_calls"]["__gpu$xla.gpu.triton"] == sum(
        n for k, n in cuda["kernels"].items() if k.startswith("linear_lse")
    )
    loss = {"linear_lse_fwd", "linear_lse_dh"} | ({"linear_lse_dw"} if trains_lm_head else set())
    for module in (tpu, cuda):
        assert loss <= set(module["kernels"]), module["kernels"]
        assert "module_bytes" in module and module["module_bytes"] > 10_000
    splash = {k for k in tpu["kernels"] if k.startswith("splash_mqa")}
    assert {"splash_mqa_fwd_segmented_residuals", "splash_mqa_dq_segmented_no_residuals",
            "splash_mqa_dkv_segmented_no_residuals"} <= splash  # fmt: skip
    assert cuda["custom_calls"].get("__cudnn$fmhaScaleBiasSoftmax", 0) >= 1
    assert cuda["custom_calls"].get("__cudnn$fmhaScaleBiasSoftmaxBackward", 0) >= 1
    # nothing that only runs on a CPU: no interpret-mode loops, no XLA attention fallback
    assert set(tpu["custom_calls"]) == {"tpu_custom_call"}


@pytest.mark.parametrize("case", list(CASES))
def test_train_step_lowers_for_tpu_and_cuda(case, tmp_path):
    config, overrides = CASES[case]
    cfg = load_config(CONFIGS / config, [*TINY, *overrides, f"output_dir={tmp_path}"])
    report = lower_train_step(cfg, ("tpu", "cuda"))
    assert report["tpu"]["devices"] == report["cuda"]["devices"] == 1
    full_model = cfg.adapter != "lora"  # LoRA here leaves the (tied) LM head frozen: no dW kernel
    assert_accelerator_kernels(report, trains_lm_head=full_model)
    if case in ("kd_online_teacher", "dpo_lora_adapter_off_reference", "kto", "grpo_lora_kl"):
        # the teacher's / the reference's forward: splash attention without a backward
        assert report["tpu"]["kernels"]["splash_mqa_fwd_segmented_no_residuals"] >= 1
    else:
        assert "splash_mqa_fwd_segmented_no_residuals" not in report["tpu"]["kernels"]


@pytest.mark.slow
def test_cli_lowers_a_sharded_step_on_eight_simulated_devices(tmp_path):
    """(data, fsdp, tensor) = (2, 2, 2): the kernels run under shard_map; the CLI simulates 8 devices."""
    out = tmp_path / "modules"
    cmd = [sys.executable, "-m", "jaxpref.train", "--config", str(CONFIGS / "dpo_lora.yaml"), "--dry_run",
           "--lower_for", "tpu,cuda", "--lower_out", str(out), *TINY, "micro_batch_size=8",
           "datasets.0.split=train[:16]", "rl_adapter_ref_model=false", "mesh.data=2", "mesh.fsdp=2",
           "mesh.tensor=2", f"output_dir={tmp_path / 'run'}"]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import yaml

    report = yaml.safe_load(proc.stdout[proc.stdout.index("lowered:"):])["lowered"]
    assert report["devices"] == 8 and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert report["tpu"]["devices"] == report["cuda"]["devices"] == 8
    assert_accelerator_kernels(report, trains_lm_head=False)
    for name in ("tpu", "cuda"):
        text = (out / f"{name}.mlir").read_text()
        assert "mhlo.num_partitions = 8" in text
        assert "sdy.manual_computation" in text or "shard_map" in text  # the kernels' shard_map
    assert "total_bytes_per_device" in proc.stdout  # the memory plan comes first


def test_a_kernel_that_cannot_lower_is_an_error_naming_it(tmp_path, capsys):
    config, overrides = CASES["sft"]
    base = ["--config", str(CONFIGS / config), "--dry_run", *TINY, *overrides, f"output_dir={tmp_path}"]
    # cuDNN attention takes bfloat16/float16 only
    assert main([*base, "--lower_for", "cuda", "bf16=false", "attention_impl=cudnn"]) == 2
    err = capsys.readouterr().err
    assert "cuDNN attention kernel cannot be lowered for gpu" in err and "float32" in err
    # Mosaic tiles are multiples of 8 rows
    assert main([*base, "--lower_for", "tpu", "fused_kernel.impl=pallas", "fused_kernel.block_n=12"]) == 2
    err = capsys.readouterr().err
    assert "fused LM-head (pallas_tpu) kernel cannot be lowered for tpu" in err and "block_n=12" in err
    assert main([*base, "--lower_for", "rocm"]) == 2
    assert "--lower_for 'rocm'" in capsys.readouterr().err


def test_lower_out_needs_lower_for(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(CONFIGS / "sft.yaml"), "--dry_run", "--lower_out", str(tmp_path)])
    assert exc.value.code == 2
