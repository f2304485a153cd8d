"""Gemma checkpoints through ``python -m jaxpref.train``: a few SFT steps (full and LoRA), the outputs
read back by transformers and PEFT with jaxpref's logits; ``--dry_run`` counts Gemma's parameters."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from transformers import AutoModelForCausalLM

from jaxpref import lora, models
from jaxpref.train import main
from tests.models.tiny import build_hf, capped_logits, hf_logits
from tests.trainer.test_train_cli import REPO, read_metrics, small_config

TOKENIZER = REPO / "demo" / "tiny-llama"  # 512 tokens
RUN = ["--no_progress", "max_steps=3", "save_steps=3", "sequence_len=64", "micro_batch_size=2", "eval_steps=",
       "test_datasets=", "use_tensorboard=false", "datasets.0.split=train[:64]"]  # fmt: skip


def _base(tmp_path, case: str):
    """A tiny random transformers Gemma with the demo tokenizer's vocabulary, saved as the base model."""
    hf = build_hf(case, vocab_size=512, pad_token_id=0, eos_token_id=2, bos_token_id=None)
    hf.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _ours(model, ids):
    return np.asarray(capped_logits(model, model(ids)))


@pytest.mark.parametrize(("case", "adapter"), [("gemma2_window", None), ("gemma3", "lora")])
def test_sft_steps_then_transformers_reads_the_result(case, adapter, tmp_path, capsys):
    base = _base(tmp_path, case)
    extra = dict(adapter="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_linear=True) if adapter else {}
    cfg = small_config(tmp_path, base_model=str(base), random_init_weights=False, tokenizer_config=str(TOKENIZER),
                       learning_rate=1e-2, **extra)  # fmt: skip
    assert main(["--config", str(cfg), *RUN]) == 0
    out = tmp_path / "out"
    losses = [read_metrics(out)[s]["loss"] for s in (1, 2, 3)]
    assert np.isfinite(losses).all()
    ids = np.arange(1, 40, dtype=np.int32)[None]  # longer than the windows (5 and 6)
    if adapter:
        ours = models.from_pretrained(base)
        lora.load_peft_adapter(ours, out)
        from peft import PeftModel

        hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
    else:
        ours = models.from_pretrained(out)
        hf = AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(hf).__name__ == "Gemma2ForCausalLM"
    before = hf_logits(AutoModelForCausalLM.from_pretrained(base).eval(), ids)
    after = hf_logits(hf, ids)
    assert np.abs(after - before).max() > 1e-3  # the steps changed the model
    np.testing.assert_allclose(_ours(ours, ids), after, rtol=0, atol=1e-4)


def test_dry_run_counts_gemma_parameters(tmp_path, capsys):
    """Gemma 3: per layer q/k/v/o, three MLP projections, four hidden-size norms and the q/k norms;
    the tied table once; the final norm."""
    base = _base(tmp_path, "gemma3")  # hidden 32, 4 layers, heads 4 x 16, kv 2 x 16, MLP 64
    cfg = small_config(tmp_path, base_model=str(base), tokenizer_config=str(TOKENIZER))
    assert main(["--config", str(cfg), "--dry_run", "mesh.fsdp=2", "mesh.tensor=2", "mesh.data=1"]) == 0
    report = yaml.safe_load(capsys.readouterr().out)
    layer = 32 * 64 + 2 * 32 * 32 + 64 * 32 + 3 * 32 * 64 + 4 * 32 + 2 * 16
    assert report["parameters"] == 512 * 32 + 4 * layer + 32
    assert report["devices"] == 4


def test_gemma_train_step_lowers_for_tpu_and_cuda(tmp_path, capsys):
    """The Gemma 3 step (sliding and full layers under the layer scan, bfloat16, the final cap in the
    fused loss) lowers for TPU and GPU from shapes alone on this CPU machine."""
    base = _base(tmp_path, "gemma3")
    cfg = small_config(tmp_path, base_model=str(base), tokenizer_config=str(TOKENIZER))
    args = ["--config", str(cfg), "--dry_run", "--lower_for", "tpu,cuda", "bf16=true", "max_steps=2",
            "test_datasets=", "dataset_processes=1", "micro_batch_size=4", "datasets.0.split=train[:16]"]  # fmt: skip
    assert main(args) == 0
    out = yaml.safe_load(capsys.readouterr().out.split("lowered:")[1])
    assert {"linear_lse_fwd", "linear_lse_dh", "linear_lse_dw"} <= set(out["tpu"]["kernels"])
    assert {"linear_lse_fwd", "linear_lse_dh", "linear_lse_dw"} <= set(out["cuda"]["kernels"])
