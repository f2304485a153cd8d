"""Phi-3 specifics: LongRoPE per packed sequence and its tables against transformers' own functions,
config spellings of real checkpoints, LoRA target names, PEFT-made adapters, fused-axis sharding.

(Logits parity, packed sequences, HF round trip, PEFT export and the LoRA training step of the phi3
cases run in test_parity.py and test_lora.py; greedy generation across the LongRoPE switch in
tests/generation/test_sampler.py; the --dry_run sizes in tests/scale/test_dry_run.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, Phi3Config, Phi3ForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jaxpref.errors import ModelError
from jaxpref.lora import ALL_LINEAR, FUSED_TARGET_NAMES, LoraConfig, load_peft_adapter, model_target_modules
from jaxpref.models import ModelConfig, from_pretrained
from jaxpref.models.rope import longrope_inverse_frequencies
from jaxpref.sharding import LOGICAL_AXES, abstract_mesh, logical_to_spec
from tests.models.tiny import hf_logits, jax_logits, random_ids

ATOL = 1e-4
REPO = Path(__file__).resolve().parents[2]


def test_longrope_packed_rows_choose_factors_per_sequence(hf_checkpoint):
    """A packed row holds sequences on both sides of the original context (16): each one's logits
    are transformers' for that sequence alone (long factors for 20 and 17 tokens, short for 16 and
    fewer). transformers itself, given the packed row, would pick one set for the whole batch."""
    path, hf = hf_checkpoint("phi3_longrope")
    model = from_pretrained(path)
    lengths = [[20, 12, 8], [16, 17, 3]]
    t = 40
    ids = random_ids((2, t), seed=3)
    segment_ids = np.zeros((2, t), np.int32)
    positions = np.zeros((2, t), np.int32)
    for row, lens in enumerate(lengths):
        start = 0
        for seg, n in enumerate(lens, start=1):
            segment_ids[row, start : start + n] = 7 * seg  # any ids: sequences are the runs
            positions[row, start : start + n] = np.arange(n)
            start += n
    logits = jax_logits(model, ids, positions=positions, segment_ids=segment_ids)
    assert np.isfinite(logits).all()
    for row, lens in enumerate(lengths):
        start = 0
        for n in lens:
            alone = hf_logits(hf, ids[row : row + 1, start : start + n])[0]
            np.testing.assert_allclose(logits[row, start : start + n], alone, rtol=0, atol=ATOL)
            start += n


def _hub_configs() -> dict[str, dict]:
    """config.json shapes of Phi-3-mini-128k (old ``rope_scaling`` spelling, head_dim 96) and
    Phi-4-mini (partial_rotary_factor 0.75 of head_dim 128, tied), with random factors."""
    rng = np.random.default_rng(0)
    factors = lambda n: [float(x) for x in 1.0 + 10 * rng.random(n)]  # noqa: E731
    common = dict(model_type="phi3", architectures=["Phi3ForCausalLM"], vocab_size=32064, num_hidden_layers=2,
                  hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0)  # fmt: skip
    phi3_mini_128k = {
        **common, "hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "sliding_window": 262144,
        "rope_scaling": {"type": "longrope", "short_factor": factors(48), "long_factor": factors(48)},
    }  # fmt: skip
    phi4_mini = {
        **common, "hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 24, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75,
        "tie_word_embeddings": True, "vocab_size": 200064, "rope_theta": 10000.0, "sliding_window": 262144,
        "rope_scaling": {"type": "longrope", "short_factor": factors(48), "long_factor": factors(48)},
    }  # fmt: skip
    with_attention_factor = {
        **phi4_mini,
        "rope_scaling": {**phi4_mini["rope_scaling"], "attention_factor": 1.3, "factor": 99.0},
    }
    return {"phi3_mini_128k": phi3_mini_128k, "phi4_mini": phi4_mini, "attention_factor": with_attention_factor}


@pytest.mark.parametrize("name", list(_hub_configs()))
def test_longrope_tables_and_config_round_trip_equal_transformers(name):
    """Short/long inverse frequencies and the attention factor equal transformers' own
    ``_compute_longrope_parameters`` for the original config.json and for jaxpref's re-export of it."""
    d = _hub_configs()[name]
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.rotary_dim == 96 and cfg.sliding_window == 262144
    short, long = longrope_inverse_frequencies(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)
    original = cfg.rope_scaling["original_max_position_embeddings"]
    for source in (d, cfg.to_hf_dict()):
        hf_cfg = Phi3Config(**{k: v for k, v in source.items() if k not in ("model_type", "architectures")})
        init = ROPE_INIT_FUNCTIONS["longrope"]
        hf_short, factor = init(hf_cfg, None)
        hf_long, _ = init(hf_cfg, None, seq_len=original + 1)
        np.testing.assert_allclose(short, hf_short.numpy(), rtol=1e-6)
        np.testing.assert_allclose(long, hf_long.numpy(), rtol=1e-6)
        assert cfg.rope_scaling["attention_factor"] == pytest.approx(factor, rel=1e-12)
        assert ModelConfig.from_hf_dict(source) == cfg
    if name == "attention_factor":
        assert cfg.rope_scaling["attention_factor"] == 1.3
    else:  # sqrt(1 + ln(131072 / 4096) / ln(4096))
        assert cfg.rope_scaling["attention_factor"] == pytest.approx(np.sqrt(1 + np.log(32) / np.log(4096)))


def test_config_errors_name_the_field():
    d = _hub_configs()["phi4_mini"]
    with pytest.raises(ModelError, match="short_factor must list 48"):
        ModelConfig.from_hf_dict({**d, "rope_scaling": {**d["rope_scaling"], "short_factor": [1.0] * 64}})
    with pytest.raises(ModelError, match="rope_type='dynamic' is not supported for phi3"):
        ModelConfig.from_hf_dict({**d, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(ModelError, match="partial_rotary_factor"):
        ModelConfig.from_hf_dict({**d, "model_type": "llama"})


def test_lora_target_names_per_family():
    phi3 = ModelConfig.from_hf_dict(_hub_configs()["phi4_mini"])
    assert model_target_modules(phi3, (ALL_LINEAR,)) == FUSED_TARGET_NAMES
    assert model_target_modules(phi3, ("qkv_proj", "o_proj")) == ("qkv_proj", "o_proj")
    separate = LoraConfig(r=2, alpha=4.0, dropout=0.0, target_modules=("v_proj", "q_proj")).target_modules
    with pytest.raises(ModelError, match=r"\['q_proj', 'v_proj'\] do not exist in phi3 .* qkv_proj"):
        model_target_modules(phi3, separate)
    llama = dict(_hub_configs()["phi4_mini"], model_type="llama", partial_rotary_factor=1.0, rope_scaling=None)
    llama = ModelConfig.from_hf_dict(llama)
    with pytest.raises(ModelError, match="fused projections; this llama model has separate ones"):
        model_target_modules(llama, ("gate_up_proj",))


def test_adapter_made_by_peft_loads(hf_checkpoint, tmp_path):
    """PEFT's own LoRA on Phi-3's fused modules (lora_B [(N + 2K) * D, r] on qkv_proj) loads into jaxpref."""
    path, _ = hf_checkpoint("phi3_window")
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    peft_model = get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    qkv_b = peft_model.base_model.model.model.layers[0].self_attn.qkv_proj.lora_B["default"].weight
    assert tuple(qkv_b.shape) == ((4 + 2 * 1) * 8, 4)
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = random_ids((2, 10))
    expected = hf_logits(peft_model.eval(), ids)
    model = from_pretrained(path)
    load_peft_adapter(model, tmp_path / "adapter")
    assert model.lora_config.target_modules == ("qkv_proj", "gate_up_proj")
    np.testing.assert_allclose(jax_logits(model, ids), expected, rtol=0, atol=ATOL)


def test_fused_axes_shard_only_where_valid(hf_checkpoint):
    """qkv_proj's fused head axis stays whole over `tensor` (an even split would cut across q/k/v);
    gate_up_proj's [2, I] output splits I like down_proj's input."""
    path, _ = hf_checkpoint("phi3")
    model = from_pretrained(path)
    mesh = abstract_mesh({"data": 1, "fsdp": 2, "tensor": 2}, 4)

    def spec(var):
        return tuple(logical_to_spec(var.get_metadata()["out_sharding"], var.shape, mesh))

    assert spec(model.layers.self_attn.qkv_proj.kernel) == (None, "fsdp", None, None)
    assert spec(model.layers.self_attn.o_proj.kernel) == (None, "tensor", None, "fsdp")
    assert spec(model.layers.mlp.gate_up_proj.kernel) == (None, "fsdp", None, "tensor")
    assert spec(model.layers.mlp.down_proj.kernel) == (None, "tensor", "fsdp")
    for var in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)):
        assert set(var.get_metadata()["out_sharding"]) <= set(LOGICAL_AXES)


MESH_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import AxisType
    from jaxpref.generation import SamplingSettings, generate
    from jaxpref.lora import LoraConfig, apply_lora
    from jaxpref.models import from_pretrained

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    ids = np.random.default_rng(0).integers(0, 128, (2, 24)).astype(np.int32)
    plain, sharded = from_pretrained(sys.argv[1]), from_pretrained(sys.argv[1], mesh=mesh)
    for m in (plain, sharded):
        apply_lora(m, LoraConfig(r=4, alpha=8.0, dropout=0.0, target_modules=("all-linear",)), rngs=nnx.Rngs(0),
                   mesh=mesh if m is sharded else None)
        for _, v in nnx.iter_graph(m):
            if isinstance(v, nnx.LoRAParam):
                v.set_value(v[...] + 0.05)
    b = sharded.layers.mlp.gate_up_proj.lora_b[...]
    assert tuple(b.sharding.spec) == (None, None, None, "tensor"), b.sharding.spec
    logits = jax.jit(lambda g, s: (lambda m: m.logits(m(ids)))(nnx.merge(g, s)))
    np.testing.assert_allclose(np.asarray(logits(*nnx.split(sharded))), np.asarray(logits(*nnx.split(plain))),
                               rtol=0, atol=1e-5)
    prompts = [list(ids[0, :11]), list(ids[1, :5])]
    settings = SamplingSettings(max_new_tokens=8)
    assert generate(sharded, prompts, settings, mesh=mesh).tokens == generate(plain, prompts, settings).tokens
    print("OK")
    """
)


def test_sharded_forward_and_generation_on_8_cpu_devices(hf_checkpoint, tmp_path):
    """LoRA'd phi3_longrope on a {data 2, fsdp 2, tensor 2} mesh: the logits and the greedy tokens
    (one row crossing the LongRoPE switch) of one device."""
    path, _ = hf_checkpoint("phi3_longrope")
    script = tmp_path / "sharded.py"
    script.write_text(MESH_SCRIPT)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, str(script), str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@pytest.fixture
def tiny_phi3_checkpoint(tmp_path):
    """demo/tiny-llama's shapes (vocab 512, the demo tokenizer's) as a random Phi-3 with LongRoPE and
    partial rotary dims, saved by transformers."""
    d = {k: v for k, v in json.loads((REPO / "demo" / "tiny-llama" / "config.json").read_text()).items()
         if k not in ("model_type", "architectures", "rope_scaling", "head_dim", "attention_bias", "mlp_bias")}
    cfg = Phi3Config(**{**d, "partial_rotary_factor": 0.5, "original_max_position_embeddings": 64,
                        "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [3.0] * 8}})
    torch.manual_seed(0)
    Phi3ForCausalLM(cfg).save_pretrained(tmp_path / "phi3")
    return tmp_path / "phi3"  # fmt: skip


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_sft_run_trains_and_exports(tiny_phi3_checkpoint, tmp_path, tuning):
    """`python -m jaxpref.train` on the shipped SFT config with a Phi-3 base (LongRoPE, original context 64,
    packed rows of 128): it trains two steps and exports what transformers (PEFT over the base) loads."""
    from jaxpref.train import main

    out = tmp_path / "out"
    lora = ["adapter=lora", "lora_r=4", "lora_alpha=8", "lora_target_linear=true"] if tuning == "lora" else []
    args = ["--no_progress", "--config", str(REPO / "configs" / "sft.yaml"), "max_steps=2", "micro_batch_size=2",
            "datasets.0.split=train[:16]", "sequence_len=128", "test_datasets=", "use_tensorboard=false",
            "dataset_processes=1", f"base_model={tiny_phi3_checkpoint}", "random_init_weights=false",
            f"tokenizer_config={REPO / 'demo' / 'tiny-llama'}", f"output_dir={out}", "save_steps=0", *lora]  # fmt: skip
    assert main(args) == 0
    ids = torch.tensor(random_ids((1, 80), vocab=512))
    if tuning == "lora":
        assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == list(FUSED_TARGET_NAMES)
        base = AutoModelForCausalLM.from_pretrained(tiny_phi3_checkpoint).eval()
        exported = PeftModel.from_pretrained(base, out).eval()
    else:
        exported = AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(exported) is Phi3ForCausalLM
    trained = from_pretrained(tiny_phi3_checkpoint) if tuning == "full" else None
    with torch.no_grad():
        logits = exported(ids).logits.numpy()
    assert np.isfinite(logits).all()
    if trained is not None:  # the export is not the untouched base
        assert np.abs(logits - jax_logits(trained, ids.numpy())).max() > 1e-4
