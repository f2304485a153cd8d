"""The real-size configs (``configs/real/``: Qwen3-0.6B, Llama-3.2-1B, Gemma-3-1B and Phi-3-mini
shapes, LoRA KD and LoRA DPO, 2048 tokens per micro-batch, remat) validate, plan and lower; running
them takes minutes per step on 2 cores, so that lives in ``scripts/bench_real_size.py``, not here."""

from __future__ import annotations

from pathlib import Path

import pytest

from jaxpref.config import load_config
from jaxpref.lowering import lower_train_step
from jaxpref.train import dry_run

REPO = Path(__file__).resolve().parents[2]
REAL = REPO / "configs" / "real"
# config: (parameters of the base, LoRA r=16 on q/k/v/o/gate/up/down)
EXPECTED = {
    "qwen3_0.6b_kd_lora.yaml": (596_049_920, 10_092_544),
    "qwen3_0.6b_dpo_lora.yaml": (596_049_920, 10_092_544),
    "llama3.2_1b_kd_lora.yaml": (1_235_814_400, 11_272_192),
    "llama3.2_1b_dpo_lora.yaml": (1_235_814_400, 11_272_192),
    # transformers' own counts for gemma-3-1b-it and Phi-3-mini-4k-instruct (meta-device models);
    # LoRA by hand: Gemma 3 26 x 16 x (2 x (1152 + 1024) + 2 x (1152 + 256) + 3 x (1152 + 6912)),
    # Phi-3 (fused) 32 x 16 x ((3072 + 9216) + (3072 + 3072) + (3072 + 16384) + (8192 + 3072))
    "gemma3_1b_kd_lora.yaml": (999_885_952, 13_045_760),
    "phi3_mini_dpo_lora.yaml": (3_821_079_552, 25_165_824),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_real_size_configs_plan_2048_tokens_per_micro_batch_with_remat(name, tmp_path):
    cfg = load_config(REAL / name, [f"output_dir={tmp_path}"])
    report = dry_run(cfg, devices=1)
    base, adapters = EXPECTED[name]
    assert report["parameters"] - report["trainable_parameters"] == base
    assert report["trainable_parameters"] == adapters
    assert report["activations"]["tokens_per_device"] == 2048  # KD: one 2048-token row; DPO: 2 x 1024
    assert report["activations"]["remat_policy"] == "full"
    # bfloat16 base (2 bytes per parameter), float32 adapters; Adam moments only for the adapters
    assert report["param_bytes_per_device"] == 2 * base + 4 * adapters
    assert report["optimizer_bytes_per_device"] < 3 * 4 * adapters
    assert report["companion_bytes_per_device"] == 0  # stored teacher targets; adapter-off reference


@pytest.mark.slow
def test_the_llama_kd_step_lowers_for_tpu(tmp_path):
    """A 1B-class step lowers from shapes alone (nothing initialised): about 30 s on 2 cores."""
    cfg = load_config(REAL / "llama3.2_1b_kd_lora.yaml", [f"output_dir={tmp_path}"])
    report = lower_train_step(cfg, ("tpu",))
    kernels = report["tpu"]["kernels"]
    assert {"linear_lse_fwd", "linear_lse_dh", "splash_mqa_fwd_segmented_residuals"} <= set(kernels)
    assert report["batch"]["input_ids"] == "int32[1, 1, 2048]"


@pytest.mark.slow
def test_the_gemma3_kd_step_lowers_for_tpu_with_windows_and_q_k_norms(tmp_path):
    """Gemma-3-1B from shapes: sliding (512) and global layers under one layer scan, both through splash."""
    cfg = load_config(REAL / "gemma3_1b_kd_lora.yaml", [f"output_dir={tmp_path}"])
    report = lower_train_step(cfg, ("tpu",))
    kernels = report["tpu"]["kernels"]
    assert {"linear_lse_fwd", "linear_lse_dh", "splash_mqa_fwd_segmented_residuals"} <= set(kernels)
    assert set(report["tpu"]["custom_calls"]) == {"tpu_custom_call"}
