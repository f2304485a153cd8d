"""Native LoRA: PEFT export/import parity, merge, adapters-off reference, training only adapters."""

from __future__ import annotations

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from jaxpref.errors import ModelError
from jaxpref.lora import (
    ALL_LINEAR,
    BASE_PARAMS,
    FUSED_TARGET_NAMES,
    PEFT_TARGET_NAMES,
    LoraConfig,
    ModulesToSaveParam,
    apply_lora,
    export_peft_adapter,
    load_peft_adapter,
    merge_lora,
    resolve_target_modules,
    trainable_filter,
)
from jaxpref.models import from_pretrained, save_pretrained
from tests.models.tiny import build_hf, hf_logits, jax_logits, random_ids

ATOL = 1e-4


def _randomize_adapters(model, seed: int = 0) -> None:
    """Make every adapter tensor (B included) and modules_to_save copy nonzero and distinct."""
    key = jax.random.key(seed)
    for i, (_, var) in enumerate(nnx.iter_graph(model)):
        if isinstance(var, nnx.LoRAParam):
            noise = 0.05 * jax.random.normal(jax.random.fold_in(key, i), var.shape, var.dtype)
            var.set_value(var[...] + noise)


def _lora_model(path, cfg: LoraConfig, seed: int = 0):
    model = from_pretrained(path)
    apply_lora(model, cfg, rngs=nnx.Rngs(seed))
    _randomize_adapters(model, seed)
    return model


def _peft_logits(path, adapter_dir, ids):
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    return hf_logits(PeftModel.from_pretrained(base, adapter_dir).eval(), ids)


EXPORT_CASES = [
    ("llama3_rope", ("q_proj", "v_proj"), ()),
    ("llama3_rope", PEFT_TARGET_NAMES, ("embed_tokens", "lm_head")),
    ("qwen3", PEFT_TARGET_NAMES, ("lm_head",)),
    ("qwen3_tied", ("q_proj", "down_proj"), ("embed_tokens",)),
    ("qwen2", ("k_proj", "o_proj", "up_proj"), ()),
    # Phi-3's fused projections: lora_B of qkv_proj is [(N + 2K) * D, r], of gate_up_proj [2I, r].
    ("phi3_longrope", FUSED_TARGET_NAMES, ("lm_head",)),
    ("phi3_partial", ("qkv_proj", "gate_up_proj"), ("embed_tokens",)),
]
MERGE_CASES = EXPORT_CASES[1:4] + EXPORT_CASES[5:]


@pytest.mark.parametrize(("case", "targets", "saved"), EXPORT_CASES)
def test_peft_export_loads_in_peft_with_same_logits(case, targets, saved, hf_checkpoint, tmp_path):
    path, hf = hf_checkpoint(case)
    model = _lora_model(path, LoraConfig(r=4, alpha=8.0, dropout=0.0, target_modules=targets, modules_to_save=saved))
    ids = random_ids((2, 12))
    adapter_dir = tmp_path / "adapter"
    export_peft_adapter(model, adapter_dir, base_model_name_or_path=str(path))
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 4
    lora_logits = jax_logits(model, ids)
    np.testing.assert_allclose(lora_logits, _peft_logits(path, adapter_dir, ids), rtol=0, atol=ATOL)
    # Adapters off = the base model (the DPO reference without a second copy).
    np.testing.assert_allclose(jax_logits(model, ids, use_adapters=False), hf_logits(hf, ids), rtol=0, atol=ATOL)
    assert np.abs(lora_logits - hf_logits(hf, ids)).max() > 1e-3


@pytest.mark.parametrize(("case", "targets", "saved"), MERGE_CASES)
def test_merge_and_adapter_reload(case, targets, saved, hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint(case)
    cfg = LoraConfig(r=2, alpha=16.0, dropout=0.0, target_modules=targets, modules_to_save=saved)
    model = _lora_model(path, cfg)
    ids = random_ids((2, 10))
    lora_logits = jax_logits(model, ids)

    merged = merge_lora(model)
    assert merged.lora_config is None and not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    np.testing.assert_allclose(jax_logits(merged, ids), lora_logits, rtol=0, atol=1e-5)
    save_pretrained(merged, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(hf_logits(reloaded, ids), lora_logits, rtol=0, atol=ATOL)

    export_peft_adapter(model, tmp_path / "adapter")
    fresh = from_pretrained(path)
    load_peft_adapter(fresh, tmp_path / "adapter")
    assert fresh.lora_config == cfg
    np.testing.assert_array_equal(jax_logits(fresh, ids), lora_logits)


def test_tied_model_trains_one_table_and_says_so(hf_checkpoint, tmp_path, caplog):
    """[embed_tokens, lm_head] on a tied model are one table: one copy, a warning, and the adapter
    config PEFT itself writes (modules_to_save [embed_tokens], ensure_weight_tying), which PEFT loads."""
    path, _ = hf_checkpoint("qwen3_tied")
    saved = ("embed_tokens", "lm_head")
    cfg = LoraConfig(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj",), modules_to_save=saved)
    with caplog.at_level("WARNING", logger="jaxpref.lora"):
        model = _lora_model(path, cfg)
    assert "this model ties lm_head to embed_tokens" in caplog.text
    assert model.lora_config.modules_to_save == ("embed_tokens",)
    assert len(jax.tree.leaves(nnx.state(model, ModulesToSaveParam))) == 1
    export_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["modules_to_save"] == ["embed_tokens"] and written["ensure_weight_tying"] is True
    ids = random_ids((2, 12))
    np.testing.assert_allclose(jax_logits(model, ids), _peft_logits(path, tmp_path / "adapter", ids), atol=ATOL)


def test_bfloat16_base_gets_float32_adapters_that_peft_loads(hf_checkpoint, tmp_path):
    """PEFT's autocast_adapter_dtype: float32 adapters on a bfloat16 base, written as float32."""
    from safetensors import safe_open

    path, _ = hf_checkpoint("qwen3")
    model = from_pretrained(path, param_dtype=jnp.bfloat16)
    apply_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "down_proj")), rngs=nnx.Rngs(0))
    _randomize_adapters(model)
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))} == {jnp.dtype(jnp.float32)}
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model, BASE_PARAMS))} == {jnp.dtype(jnp.bfloat16)}
    export_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # noqa: SIM118
    # the base as PEFT sees it: bfloat16 weights (computed in float32, as jaxpref's compute_dtype here)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).float().eval()
    ids = random_ids((2, 12))
    expected = hf_logits(PeftModel.from_pretrained(base, tmp_path / "adapter").eval(), ids)
    np.testing.assert_allclose(jax_logits(model, ids), expected, rtol=0, atol=ATOL)


def test_adapter_made_by_peft_loads(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("qwen3")
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    peft_model = get_peft_model(
        base,
        PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"], modules_to_save=["lm_head"]),
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = random_ids((2, 10))
    expected = hf_logits(peft_model.eval(), ids)
    model = from_pretrained(path)
    load_peft_adapter(model, tmp_path / "adapter")
    np.testing.assert_allclose(jax_logits(model, ids), expected, rtol=0, atol=ATOL)


def _ce_loss(model, ids, key):
    hidden = model(ids, deterministic=False, dropout_key=key)
    logp = jax.nn.log_softmax(model.logits(hidden)[:, :-1])
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()


def _snapshot(model, filt):
    return jax.tree.map(np.array, nnx.state(model, filt))


@pytest.mark.parametrize("case", ["qwen3", "llama3_rope", "phi3_longrope"])
def test_train_step_then_export_both_formats(case, hf_checkpoint, tmp_path):
    """The issue's done-when: load, match, train a LoRA step, export PEFT and merged, read back."""
    path, hf = hf_checkpoint(case)
    model = from_pretrained(path)
    ids = jnp.asarray(random_ids((2, 12)))
    np.testing.assert_allclose(jax_logits(model, ids), hf_logits(hf, np.asarray(ids)), rtol=0, atol=ATOL)
    cfg = LoraConfig(r=4, alpha=8.0, dropout=0.1, target_modules=(ALL_LINEAR,), modules_to_save=("lm_head",))
    apply_lora(model, cfg, rngs=nnx.Rngs(0))
    family = FUSED_TARGET_NAMES if case.startswith("phi3") else PEFT_TARGET_NAMES
    assert model.lora_config.target_modules == family
    filt = trainable_filter(model)
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=filt)
    base_before, adapters_before = _snapshot(model, BASE_PARAMS), _snapshot(model, nnx.LoRAParam)

    @nnx.jit
    def step(model, opt, ids, key):
        loss, grads = nnx.value_and_grad(_ce_loss, argnums=nnx.DiffState(0, filt))(model, ids, key)
        opt.update(model, grads)
        return loss

    for i in range(2):
        assert np.isfinite(step(model, opt, ids, jax.random.key(i)))

    # Base weights untouched, every adapter tensor and the lm_head copy moved.
    jax.tree.map(np.testing.assert_array_equal, _snapshot(model, BASE_PARAMS), base_before)
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), _snapshot(model, nnx.LoRAParam), adapters_before)
    assert all(jax.tree.leaves(changed))
    assert isinstance(model.lm_head.kernel_copy, ModulesToSaveParam)
    # Optimizer state (adam mu, nu) exists for the adapters only.
    n_adapter = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    opt_arrays = [x for x in jax.tree.leaves(nnx.state(opt.opt_state)) if x.size > 1]
    assert sum(x.size for x in opt_arrays) == 2 * n_adapter

    check = random_ids((1, 9), seed=5)
    lora_logits = jax_logits(model, check)
    export_peft_adapter(model, tmp_path / "adapter")
    np.testing.assert_allclose(_peft_logits(path, tmp_path / "adapter", check), lora_logits, rtol=0, atol=ATOL)
    save_pretrained(merge_lora(model), tmp_path / "merged")
    merged_hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(hf_logits(merged_hf, check), lora_logits, rtol=0, atol=ATOL)


def test_dropout_only_when_not_deterministic(hf_checkpoint):
    path, _ = hf_checkpoint("llama")
    model = _lora_model(path, LoraConfig(r=4, alpha=8.0, dropout=0.5, target_modules=("q_proj", "up_proj")))
    ids = jnp.asarray(random_ids((1, 8)))

    @partial(nnx.jit, static_argnames=("use_adapters", "deterministic"))
    def hidden(model, key=None, use_adapters=True, deterministic=True):
        return model(ids, use_adapters=use_adapters, deterministic=deterministic, dropout_key=key)

    det = np.asarray(hidden(model))
    key = jax.random.key(3)
    drop = np.asarray(hidden(model, key, deterministic=False))
    assert not np.allclose(det, drop)
    np.testing.assert_array_equal(drop, np.asarray(hidden(model, key, deterministic=False)))
    # Without a key the model's own dropout stream advances.
    a, b = (np.asarray(hidden(model, deterministic=False)) for _ in range(2))
    assert not np.allclose(a, b)
    base = np.asarray(hidden(model, use_adapters=False))
    np.testing.assert_array_equal(np.asarray(hidden(model, key, use_adapters=False, deterministic=False)), base)


def test_fresh_adapters_do_not_change_the_model(hf_checkpoint):
    path, hf = hf_checkpoint("qwen2")
    model = from_pretrained(path)
    apply_lora(model, LoraConfig(r=8, alpha=16.0, dropout=0.0, target_modules=PEFT_TARGET_NAMES), rngs=nnx.Rngs(0))
    a = model.layers.mlp.down_proj.lora_a[...]
    assert a.shape == (2, 64, 8) and np.abs(np.asarray(a)).max() <= 1 / np.sqrt(64)
    assert np.all(np.asarray(model.layers.mlp.down_proj.lora_b[...]) == 0)
    assert model.layers.self_attn.q_proj.lora_b.get_metadata()["out_sharding"] == (
        "layers",
        "lora_rank",
        "heads",
        "head_dim",
    )
    ids = random_ids((1, 8))
    np.testing.assert_allclose(jax_logits(model, ids), hf_logits(hf, ids), rtol=0, atol=ATOL)


def test_target_resolution_and_validation():
    assert resolve_target_modules(None, target_linear=True) == (ALL_LINEAR,)
    assert resolve_target_modules("all-linear") == (ALL_LINEAR,)
    assert resolve_target_modules(["v_proj", "q_proj"]) == ("q_proj", "v_proj")
    assert resolve_target_modules(["gate_up_proj", "qkv_proj"]) == ("qkv_proj", "gate_up_proj")
    with pytest.raises(ModelError, match="lora_target_modules"):
        resolve_target_modules(["wqkv"])
    with pytest.raises(ModelError, match="lora_target_modules"):
        resolve_target_modules([])
    with pytest.raises(ModelError, match="lora_modules_to_save"):
        LoraConfig(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj",), modules_to_save=("norm",))
    with pytest.raises(ModelError, match="lora_r"):
        LoraConfig(r=0, alpha=8.0, dropout=0.0, target_modules=("q_proj",))
    with pytest.raises(ModelError, match="lora_dropout"):
        LoraConfig(r=2, alpha=8.0, dropout=1.0, target_modules=("q_proj",))


def test_lora_errors(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("llama")
    cfg = LoraConfig(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj",))
    model = _lora_model(path, cfg)
    assert trainable_filter(model) is nnx.LoRAParam and trainable_filter(from_pretrained(path)) is nnx.Param
    with pytest.raises(ModelError, match="merge_lora"):
        save_pretrained(model, tmp_path / "x")
    with pytest.raises(ModelError, match="already has LoRA"):
        apply_lora(model, cfg, rngs=nnx.Rngs(0))
    export_peft_adapter(model, tmp_path / "adapter")
    other = from_pretrained(path)
    apply_lora(other, LoraConfig(r=2, alpha=8.0, dropout=0.0, target_modules=("q_proj",)), rngs=nnx.Rngs(0))
    with pytest.raises(ModelError, match="does not match"):
        load_peft_adapter(other, tmp_path / "adapter")
    with pytest.raises(ModelError, match="adapter_config.json"):
        load_peft_adapter(from_pretrained(path), tmp_path)
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "use_dora": True}))
    with pytest.raises(ModelError, match="use_dora"):
        load_peft_adapter(from_pretrained(path), tmp_path / "adapter")


def test_build_hf_is_deterministic():
    a, b = build_hf("llama", seed=4), build_hf("llama", seed=4)
    ids = random_ids((1, 5))
    np.testing.assert_array_equal(hf_logits(a, ids), hf_logits(b, ids))
