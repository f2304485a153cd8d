"""``--dry_run`` sizes per device for a mesh this machine does not have, from shapes alone.

Expected bytes are counted by hand from tiny-llama's config.json (tied 512 x 128 embedding, 4
layers, hidden 128, 4 heads / 2 kv heads of 32, MLP 384): every weight has an ``embed`` axis of 128,
which FSDP splits; only the 9 norm vectors of 128 (2 per layer + the final one) stay whole.
The activation formula is checked against XLA's own buffer sizes for the compiled train step.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml

from jaxpref import memory, models
from jaxpref.config import load_config
from jaxpref.objectives import build_objective
from jaxpref.sharding import make_mesh
from jaxpref.train import dry_run, main
from jaxpref.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
LAYER = 128 * 128 * 2 + 128 * 64 * 2 + 3 * 128 * 384 + 2 * 128
PARAMS = 512 * 128 + 4 * LAYER + 128
NORMS = 9 * 128


def cfg(*overrides: str):
    return load_config(REPO / "configs" / "sft.yaml", ["micro_batch_size=8", *overrides])


def test_bfloat16_parameters_plan_float32_optimizer_state():
    """The dtype policy (jaxpref/precision.py) in the plan: bfloat16 parameters and single-micro-batch
    gradients, float32 moments, a float32 accumulator when accumulating; Adafactor's factored state."""
    f32 = dry_run(cfg("mesh.data=1"), devices=1)
    bf16 = dry_run(cfg("mesh.data=1", "bfloat16=true"), devices=1)
    assert bf16["param_bytes_per_device"] == f32["param_bytes_per_device"] // 2 == 2 * PARAMS
    assert bf16["optimizer_bytes_per_device"] == f32["optimizer_bytes_per_device"]  # float32 moments either way
    assert bf16["gradient_bytes_per_device"] == 2 * PARAMS
    accum = dry_run(cfg("mesh.data=1", "bfloat16=true", "gradient_accumulation_steps=2"), devices=1)
    assert accum["gradient_bytes_per_device"] == 4 * PARAMS
    factored = dry_run(cfg("mesh.data=1", "bfloat16=true", "optimizer=adafactor"), devices=1)
    # factored second moments are far smaller than Adam's two full moments, and still float32
    assert 0 < factored["optimizer_bytes_per_device"] < f32["optimizer_bytes_per_device"] / 2


def test_fsdp_and_tensor_shards_by_hand():
    # 16 devices planned on a 1-device machine: data 2 x fsdp 4 x tensor 2
    r = dry_run(cfg("mesh.data=2", "mesh.fsdp=4", "mesh.tensor=2"), processes=2)
    assert r["devices"] == 16 and r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 2}
    assert r["parameters"] == r["trainable_parameters"] == PARAMS
    # every non-norm weight is split 8 ways (embed over fsdp=4, and vocab/heads/kv_heads/mlp over tensor=2)
    assert r["param_bytes_per_device"] == 4 * ((PARAMS - NORMS) // 8 + NORMS)
    assert r["gradient_bytes_per_device"] == r["param_bytes_per_device"]  # float32 accumulators
    # AdamW: two float32 moments shaped like the parameters, plus small step counters
    assert 0 <= r["optimizer_bytes_per_device"] - 2 * r["param_bytes_per_device"] <= 64
    # 8 rows x 2 processes over data x fsdp = 8 devices: 2 rows of sequence_len 256 per device
    assert (r["activations"]["rows_per_device"], r["activations"]["tokens_per_device"]) == (2, 512)
    assert r["total_bytes_per_device"] == sum(
        r[k]
        for k in (
            "param_bytes_per_device",
            "optimizer_bytes_per_device",
            "gradient_bytes_per_device",
            "activation_bytes_per_device",
            "loss_bytes_per_device",
            "companion_bytes_per_device",
        )
    )
    # the fused loss: float32 hidden states and their gradient, three float32 [512 rows, 512 vocab] blocks
    assert r["loss_bytes_per_device"] == 512 * 128 * 8 + 3 * 512 * 512 * 4
    assert r["steps"] == 300  # max_steps


def test_yaml_rules_and_lora_change_the_sizes():
    # embed replicated by the YAML rules: FSDP over 8 devices then splits nothing
    r = dry_run(cfg("mesh.fsdp=8", "mesh.data=1", "logical_axis_rules=[[embed, null]]"))
    assert r["param_bytes_per_device"] == 4 * PARAMS
    # LoRA r=8 on q and v: A [4, 128, 8] and B [4, 8, heads or kv_heads, 32] trainable, base frozen
    r = dry_run(
        cfg(
            "mesh.fsdp=8",
            "mesh.data=1",
            "adapter=lora",
            "lora_r=8",
            "lora_alpha=16",
            "lora_target_modules=[q_proj,v_proj]",
        )
    )
    lora = 4 * (128 * 8 + 8 * 128) + 4 * (128 * 8 + 8 * 64)
    assert r["trainable_parameters"] == lora and r["parameters"] == PARAMS + lora
    assert r["gradient_bytes_per_device"] == 4 * (4 * 8 * 128 // 8 + 4 * 8 * 128 + 4 * 8 * 128 // 8 + 4 * 8 * 64)


def test_cli_plans_for_other_machines_and_explains_missing_steps(capsys):
    config = str(REPO / "configs" / "sft.yaml")
    assert (
        main(
            [
                "--config",
                config,
                "--dry_run",
                "--dry_run_devices",
                "64",
                "--dry_run_processes",
                "16",
                "mesh.fsdp=-1",
                "max_steps=",
                "num_epochs=1",
            ]
        )
        == 0
    )
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["devices"] == 64 and out["mesh"] == {"data": 1, "fsdp": 64, "tensor": 1}
    assert out["steps"].startswith("unknown before the data is read")
    # micro_batch_size 8 x 1 process cannot feed 64 devices on the batch axes
    assert main(["--config", config, "--dry_run", "--dry_run_devices", "64", "mesh.fsdp=-1"]) == 2
    assert "must be a multiple of the 64 devices" in capsys.readouterr().err


def test_dry_run_compile_reports_the_real_steps_xla_memory(capsys):
    """``--dry_run_compile``: the plan, then the real step compiled here from shapes. XLA's arguments are
    the plan's parameters and optimizer state plus the batch (a bfloat16 base held as uint16 on CPU is
    the same bytes: jaxpref.bit_patterns)."""
    lora = ["param_dtype=bfloat16", "compute_dtype=bfloat16", "adapter=lora", "lora_r=4", "lora_alpha=8",
            "lora_target_linear=true", "micro_batch_size=2", "sequence_len=256", "mesh.data=1"]  # fmt: skip
    config = str(REPO / "configs" / "sft.yaml")
    assert main(["--config", config, "--dry_run_compile", *lora]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    here = out["compiled_here"]
    assert here["platform"] == "cpu" and here["devices"] == 1
    assert here["total"] == here["arguments"] + here["temporaries"] + here["outputs"]
    batch = 2 * 256 * (4 + 4 + 4 + 4 + 1)  # input_ids, labels, positions, segment_ids (int32), loss_mask
    plan = out["param_bytes_per_device"] + out["optimizer_bytes_per_device"] + batch
    assert plan - 8 <= here["arguments"] <= plan + 8, (here, plan)  # + the step number (a scalar), or not
    assert here["temporaries"] > 0


@pytest.mark.slow
def test_activation_estimate_tracks_xla_buffers():
    """Estimate vs XLA's temporary buffers of the compiled train step, per remat policy: the same
    order (none > dots > dots_with_no_batch_dims > full) and within a factor 2.5 (XLA's number also
    holds gradients, loss blocks and fusion temporaries)."""
    mcfg = models.ModelConfig.from_hf_dict(
        {**models.load_model_config(REPO / "demo" / "tiny-llama").hf_config, "num_hidden_layers": 2}
    )
    rows, seq = 4, 256
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(0, 512, (1, rows, seq)).astype(np.int32),
        "labels": rng.integers(0, 512, (1, rows, seq)).astype(np.int32),
        "loss_mask": np.ones((1, rows, seq), bool),
        "positions": np.tile(np.arange(seq, dtype=np.int32), (1, rows, 1)),
        "segment_ids": np.ones((1, rows, seq), np.int32),
    }
    objective = build_objective(SimpleNamespace(fused_kernel=None), "sft")
    xla, est = {}, {}
    for policy in memory.REMAT_POLICIES:
        tr = Trainer(models.from_config(mcfg, remat_policy=policy), objective, optax.sgd(0.1), mesh=make_mesh(None))
        args = (tr.params, tr.frozen, tr.companions, tr.opt_state, jax.tree.map(jnp.asarray, batch), jnp.int32(0))
        xla[policy] = tr._train_step.lower(*args).compile().memory_analysis().temp_size_in_bytes
        est[policy] = memory.activation_bytes(
            rows_per_device=rows,
            sequence_len=seq,
            hidden_size=128,
            intermediate_size=384,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            tensor=1,
            remat_policy=policy,
            compute_bytes=4,
        ).bytes
    order = sorted(memory.REMAT_POLICIES, key=lambda p: -xla[p])
    assert (
        order
        == sorted(memory.REMAT_POLICIES, key=lambda p: -est[p])
        == ["none", "dots", "dots_with_no_batch_dims", "full"]
    ), (xla, est)
    for policy in memory.REMAT_POLICIES:
        assert 1 / 2.5 <= xla[policy] / est[policy] <= 2.5, (policy, xla, est)


def test_phi3_fused_projections_shard_by_hand(tmp_path):
    """tiny-llama's shapes as a Phi-3 (fused qkv_proj [128, 8 heads x 32], gate_up_proj [128, 2 x 384],
    LongRoPE): the same parameter count; qkv_proj's fused head axis stays whole over tensor (split 4
    ways by fsdp only), every other weight 8 ways. LoRA on all-linear means Phi-3's four projections."""
    import json

    d = json.loads((REPO / "demo" / "tiny-llama" / "config.json").read_text())
    d.update(model_type="phi3", architectures=["Phi3ForCausalLM"], original_max_position_embeddings=128,
             rope_scaling={"type": "longrope", "short_factor": [1.0] * 16, "long_factor": [2.0] * 16})  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(d))
    phi3 = f"base_model_config={tmp_path}"
    r = dry_run(cfg("mesh.data=2", "mesh.fsdp=4", "mesh.tensor=2", phi3), processes=2)
    assert r["parameters"] == PARAMS
    qkv = 4 * 128 * 256
    assert r["param_bytes_per_device"] == 4 * ((PARAMS - NORMS - qkv) // 8 + qkv // 4 + NORMS)
    r = dry_run(cfg("mesh.fsdp=8", "mesh.data=1", "adapter=lora", "lora_r=8", "lora_target_linear=true", phi3))
    # A [4, 128 or 384, 8], B [4, 8, out]: qkv 256, o 128, gate_up 2 x 384, down 128
    lora = 4 * 8 * ((128 + 256) + (128 + 128) + (128 + 768) + (384 + 128))
    assert r["trainable_parameters"] == lora


def test_phi3_mini_plans_its_published_size():
    """Phi-3-mini-4k-instruct's config.json (fused projections, sliding window 2047): 3,821,079,552
    parameters, the count Microsoft publishes; bfloat16 over fsdp 8 x tensor 2."""
    phi3 = f"base_model_config={REPO / 'configs' / 'models' / 'Phi-3-mini-4k-instruct'}"
    r = dry_run(cfg("mesh.data=1", "mesh.fsdp=8", "mesh.tensor=2", "bfloat16=true", phi3))
    assert r["parameters"] == 3_821_079_552
    # per layer: qkv_proj [3072, 96 heads x 96] split by fsdp only, the rest by fsdp and tensor
    qkv, norms = 32 * 3072 * 9216, 65 * 3072
    assert r["param_bytes_per_device"] == 2 * ((3_821_079_552 - qkv - norms) // 16 + qkv // 8 + norms)


def test_activation_estimate_counts_gemma_norms_and_phi3_unsplit_qkv():
    """Gemma's two extra norms add 2H per token and layer when nothing is recomputed; Phi-3's fused
    q/k/v stay whole over tensor, so tensor=4 divides only the MLP there."""
    shapes = dict(rows_per_device=1, sequence_len=8, hidden_size=64, intermediate_size=256, num_layers=1,
                  num_heads=8, num_kv_heads=4, head_dim=16, tensor=4, remat_policy="none", compute_bytes=1,
                  xla_attention=False)  # fmt: skip
    base = memory.activation_bytes(**shapes)
    gemma = memory.activation_bytes(**shapes, extra_norms=2)
    phi3 = memory.activation_bytes(**shapes, split_qkv=False)
    assert gemma.elements_per_token_layer - base.elements_per_token_layer == 2 * 64
    # 3Q + 3KV with Q = 8 x 16 and KV = 4 x 16 whole instead of a quarter each
    assert phi3.elements_per_token_layer - base.elements_per_token_layer == 3 * (128 + 64) * (1 - 1 / 4)
