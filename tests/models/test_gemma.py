"""Gemma 2 / Gemma 3 text: hub configs as transformers reads them, both RoPE spellings of Gemma 3,
parameter shapes of the real sizes, the features jaxpref refuses, LoRA + PEFT round trips.
(Logit parity, packed sequences and the HF round trip are in test_parity.py's cases.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from jaxpref.errors import ModelError
from jaxpref.lora import PEFT_TARGET_NAMES, LoraConfig, export_peft_adapter, load_peft_adapter, merge_lora
from jaxpref.models import ModelConfig, from_pretrained, save_pretrained
from jaxpref.models.hf_io import abstract_model
from tests.models.test_lora import _lora_model, _peft_logits
from tests.models.tiny import TINY, hf_logits, jax_logits, random_ids

REPO = Path(__file__).resolve().parents[2]
REAL = {name: json.loads((REPO / "configs" / "models" / name / "config.json").read_text())
        for name in ("gemma-2-2b", "gemma-3-1b-it")}  # fmt: skip
GEMMA2 = {**TINY, "model_type": "gemma2", "head_dim": 8}
GEMMA3 = {**TINY, "model_type": "gemma3_text", "head_dim": 8}


def _transformers_config(d: dict):
    return AutoConfig.for_model(**{k: v for k, v in d.items() if k not in ("architectures", "transformers_version")})


@pytest.mark.parametrize("name", list(REAL))
def test_hub_configs_parse_as_transformers_reads_them(name):
    d = REAL[name]
    cfg = ModelConfig.from_hf_dict(d)
    ref = _transformers_config(d)
    assert cfg.layer_types == tuple(ref.layer_types) and cfg.sliding_window == ref.sliding_window
    assert cfg.tie_word_embeddings and ref.tie_word_embeddings  # gemma-2-2b leaves it to the default
    assert (cfg.head_dim, cfg.query_pre_attn_scalar, cfg.hidden_act) == (256, 256, "gelu_pytorch_tanh")
    assert cfg.final_logit_softcapping == ref.final_logit_softcapping
    if name == "gemma-2-2b":
        assert cfg.attn_logit_softcapping == 50.0 and cfg.rope_variants == ((10000.0, None),)
        assert cfg.layer_kind_ids == (0, 1) * 13
    else:  # 1B: every 6th layer global; global base 1e6, sliding 1e4; no soft-caps
        assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11, 17, 23]
        assert cfg.rope_variants == ((1e6, None), (1e4, None)) and cfg.attn_logit_softcapping is None
        assert cfg.qk_norm
    # written back, transformers reads the same architecture
    back = _transformers_config(cfg.to_hf_dict())
    for key in ("layer_types", "sliding_window", "query_pre_attn_scalar", "final_logit_softcapping",
                "hidden_activation", "tie_word_embeddings", "head_dim", "rope_parameters"):  # fmt: skip
        assert getattr(back, key) == getattr(ref, key), key


@pytest.mark.parametrize(("name", "hf_count"), [("gemma-2-2b", 2_614_341_888), ("gemma-3-1b-it", 999_885_952)])
def test_real_sizes_have_transformers_parameter_count(name, hf_count):
    """Shapes only (no memory): every parameter of the real models, q/k and sandwich norms included."""
    abstract = abstract_model(ModelConfig.from_hf_dict(REAL[name]))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(_transformers_config(REAL[name]))
    assert ours == sum(p.numel() for p in hf.parameters()) == hf_count


def test_gemma3_rope_spellings_parse_the_same():
    nested = ModelConfig.from_hf_dict(
        {**GEMMA3, "sliding_window_pattern": 2, "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    )  # fmt: skip
    legacy = ModelConfig.from_hf_dict(
        {**GEMMA3, "sliding_window_pattern": 2, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
         "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    )  # fmt: skip
    assert nested == legacy
    assert nested.rope_variants == ((1e6, {"rope_type": "linear", "factor": 8.0}), (1e4, None))
    assert nested.layer_attention(0).rope == 1 and nested.layer_attention(1).rope == 0
    defaults = ModelConfig.from_hf_dict({**GEMMA3, "sliding_window_pattern": 2})
    assert defaults.rope_variants == ((1e6, None), (1e4, None))  # Gemma3TextConfig's default bases
    # each saves in the spelling it came in
    assert "rope_parameters" in nested.to_hf_dict() and "rope_local_base_freq" not in nested.to_hf_dict()
    assert legacy.to_hf_dict()["rope_local_base_freq"] == 1e4 and "rope_parameters" not in legacy.to_hf_dict()


def test_gemma3_legacy_spelling_checkpoint_matches_transformers(hf_checkpoint):
    """A Gemma 3 checkpoint as transformers 4.5x wrote it (rope_theta, rope_local_base_freq,
    rope_scaling for the global layers), read by both."""
    path, _ = hf_checkpoint("gemma3")
    cfg_path = path / "config.json"
    d = json.loads(cfg_path.read_text())
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope["full_attention"].pop("rope_theta")
    d["rope_scaling"] = rope["full_attention"]
    d["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    del d["layer_types"]  # from sliding_window_pattern
    cfg_path.write_text(json.dumps(d))
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    assert hf.config.rope_parameters["full_attention"]["rope_type"] == "linear"
    ids = random_ids((2, 20))
    np.testing.assert_allclose(jax_logits(from_pretrained(path), ids), hf_logits(hf, ids), rtol=0, atol=1e-4)


def test_gemma3_ignores_attention_soft_cap_as_transformers_does(hf_checkpoint):
    path, _ = hf_checkpoint("gemma3_pattern3", attn_logit_softcapping=0.1)
    assert from_pretrained(path).config.attn_logit_softcapping is None
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = random_ids((1, 12))
    np.testing.assert_allclose(jax_logits(from_pretrained(path), ids), hf_logits(hf, ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({**GEMMA3, "use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({**GEMMA2, "use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({**GEMMA2, "hidden_activation": "gelu"}, "hidden_activation"),
        ({**GEMMA2, "query_pre_attn_scalar": None}, "query_pre_attn_scalar"),
        ({**GEMMA2, "attn_logit_softcapping": -1.0}, "attn_logit_softcapping"),
        ({**GEMMA2, "final_logit_softcapping": 0.0}, "final_logit_softcapping"),
        ({**GEMMA2, "sliding_window": 0}, "sliding_window"),
        ({**GEMMA3, "sliding_window_pattern": 0}, "sliding_window_pattern"),
        ({**GEMMA3, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "per layer type"),
        ({**GEMMA3, "rope_parameters": {"chunked_attention": {"rope_type": "default"}}}, "chunked_attention"),
        ({**GEMMA3, "rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0}}}, "rope_type"),
    ],
)
def test_unsupported_gemma_config_names_the_field(overrides, field):
    with pytest.raises(ModelError, match=field):
        ModelConfig.from_hf_dict(overrides)


@pytest.mark.parametrize(
    ("case", "targets", "saved"),
    [
        ("gemma2", PEFT_TARGET_NAMES, ("embed_tokens",)),  # tied: the scaled table's copy is the head too
        ("gemma3", ("q_proj", "k_proj", "down_proj"), ()),
        ("gemma3_pattern3", ("v_proj", "o_proj", "gate_proj", "up_proj"), ("lm_head",)),
    ],
)
def test_lora_peft_round_trip(case, targets, saved, hf_checkpoint, tmp_path):
    """jaxpref LoRA -> PEFT adapter -> PEFT's logits on the transformers model; the adapter read back
    and the merged model saved for transformers give the same logits."""
    path, hf = hf_checkpoint(case)
    cfg = LoraConfig(r=4, alpha=8.0, dropout=0.0, target_modules=targets, modules_to_save=saved)
    model = _lora_model(path, cfg)
    ids = random_ids((2, 12))
    lora_logits = jax_logits(model, ids)
    assert np.abs(lora_logits - hf_logits(hf, ids)).max() > 1e-3
    export_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    np.testing.assert_allclose(lora_logits, _peft_logits(path, tmp_path / "adapter", ids), rtol=0, atol=1e-4)
    fresh = from_pretrained(path)
    load_peft_adapter(fresh, tmp_path / "adapter")
    np.testing.assert_array_equal(jax_logits(fresh, ids), lora_logits)
    save_pretrained(merge_lora(model), tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(hf_logits(merged, ids), lora_logits, rtol=0, atol=1e-4)


MESH_SCRIPT = """
import sys
import jax, numpy as np
from jaxpref.generation import SamplingSettings, generate
from jaxpref.models import from_pretrained
from jaxpref.sharding import make_mesh

mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2})
plain, sharded = from_pretrained(sys.argv[1]), from_pretrained(sys.argv[1], mesh=mesh)
layer = sharded.layers
specs = {name: tuple(norm.scale[...].sharding.spec) for name, norm in [
    ("q_norm", layer.self_attn.q_norm), ("pre_ff", layer.pre_feedforward_layernorm),
    ("post_ff", layer.post_feedforward_layernorm), ("final", sharded.norm)]}
assert specs == {"q_norm": (None, None), "pre_ff": (None, None), "post_ff": (None, None), "final": (None,)}, specs
assert tuple(sharded.embed_tokens.embedding[...].sharding.spec) == ("tensor", "fsdp")
ids = np.random.default_rng(0).integers(0, 128, (2, 16)).astype(np.int32)
np.testing.assert_allclose(np.asarray(sharded.logits(sharded(ids))), np.asarray(plain.logits(plain(ids))), atol=1e-5)
# on the mesh the sampler embeds with the vocabulary split over tensor (then the model scales)
prompts = [[5, 9, 2, 77, 3, 1, 8, 60, 4], [11, 12]]
settings = SamplingSettings(max_new_tokens=10)
assert generate(sharded, prompts, settings, mesh=mesh) == generate(plain, prompts, settings)
print("OK")
"""


def test_sharded_load_forward_and_generate_on_4_cpu_devices(hf_checkpoint, tmp_path):
    """The new parameters (q/k norms, sandwich norms) follow the logical-axis rules; the sharded model
    computes and generates (embedding looked up with the vocabulary split) as on one device."""
    path, _ = hf_checkpoint("gemma3")
    script = tmp_path / "mesh.py"
    script.write_text(MESH_SCRIPT)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, str(script), str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("case", ["gemma2_window", "gemma3"])
def test_reward_model_export_loads_as_transformers_sequence_classifier(case, hf_checkpoint, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from jaxpref.models.reward import add_score_head, save_reward_model, sequence_rewards

    path, _ = hf_checkpoint(case)
    model = add_score_head(from_pretrained(path), seed=3, std=0.5)
    save_reward_model(model, tmp_path / "rm", pad_token_id=0)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert type(hf).__name__ == {"gemma2_window": "Gemma2ForSequenceClassification",
                                 "gemma3": "Gemma3TextForSequenceClassification"}[case]  # fmt: skip
    ids = random_ids((3, 14), vocab=127, seed=2) + 1  # no pad (0) inside
    seg = np.ones_like(ids)
    seg[1, 9:] = 0
    ids[1, 9:] = 0
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(seg)).logits[:, 0].numpy()
    got = np.asarray(sequence_rewards(model, ids, segment_ids=seg))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.std(want) > 1e-2


@pytest.mark.parametrize("case", ["gemma2", "gemma3"])
def test_sft_loss_equals_transformers_loss(case, hf_checkpoint):
    """The training path (fused LM-head loss with the final soft-cap, packed-free batch) gives
    transformers' own ``labels=`` loss on the soft-capped logits."""
    from types import SimpleNamespace

    import jax.numpy as jnp

    from jaxpref.objectives.sft import build_sft

    path, hf = hf_checkpoint(case)
    ids = random_ids((2, 20), seed=4)
    labels = np.concatenate([ids[:, 1:], np.full((2, 1), -100)], axis=1).astype(np.int32)
    labels[0, :5] = -100  # a prompt
    with torch.no_grad():
        hf_labels = np.concatenate([np.full((2, 1), -100), labels[:, :-1]], axis=1)
        want = float(hf(torch.tensor(ids), labels=torch.tensor(hf_labels, dtype=torch.long)).loss)
    batch = {
        "input_ids": jnp.asarray(ids),
        "positions": jnp.broadcast_to(jnp.arange(20, dtype=jnp.int32), (2, 20)),
        "segment_ids": jnp.ones((2, 20), jnp.int32),
        "labels": jnp.asarray(labels),
        "loss_mask": jnp.asarray(labels >= 0),
    }
    model = from_pretrained(path)
    sft = build_sft(SimpleNamespace(fused_kernel=None))
    got = sft.loss(model, batch, jnp.float32((labels >= 0).sum()), train=False)
    np.testing.assert_allclose(float(got[0]), want, rtol=1e-5, atol=1e-5)


def test_bfloat16_embedding_scale_is_rounded_as_transformers_rounds_it(hf_checkpoint, tmp_path):
    """sqrt(32) = 5.657 is 5.65625 in bfloat16: the embeddings equal transformers' bfloat16 ones bit for
    bit (a float32 factor would differ in the last bit of some)."""
    import jax.numpy as jnp

    path, _ = hf_checkpoint("gemma3")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    model = from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ids = random_ids((2, 30))
    with torch.no_grad():
        want = hf.model.embed_tokens(torch.tensor(ids)).float().numpy()
    got = np.asarray(model.embed_tokens(jnp.asarray(ids)).astype(jnp.float32))
    np.testing.assert_array_equal(got, want)
    rows = jnp.take(model.embed_tokens.embedding[...], jnp.asarray(ids), axis=0)
    unrounded = np.asarray((rows.astype(jnp.float32) * 32**0.5).astype(jnp.bfloat16).astype(jnp.float32))
    assert (unrounded != want).any()
