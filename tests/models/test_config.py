"""config.json parsing: both RoPE spellings, unsupported features, checkpoint errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxpref.errors import ModelError
from jaxpref.models import ModelConfig, from_pretrained, load_model_config, save_pretrained
from tests.models.tiny import LLAMA3_ROPE, TINY, hf_logits, jax_logits, random_ids

BASE = {**TINY, "model_type": "llama", "hidden_act": "silu"}


def _rewrite_config(path, edit):
    cfg_path = path / "config.json"
    d = json.loads(cfg_path.read_text())
    edit(d)
    cfg_path.write_text(json.dumps(d))


def test_rope_spellings_parse_the_same():
    new = ModelConfig.from_hf_dict({**BASE, "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 5e5}})
    old = ModelConfig.from_hf_dict({**BASE, "rope_theta": 5e5, "rope_scaling": dict(LLAMA3_ROPE)})
    legacy_key = {**LLAMA3_ROPE, "type": "llama3"}
    del legacy_key["rope_type"]
    older = ModelConfig.from_hf_dict({**BASE, "rope_theta": 5e5, "rope_scaling": legacy_key})
    assert new == old == older
    assert new.rope_theta == 5e5 and new.rope_scaling == LLAMA3_ROPE
    plain = ModelConfig.from_hf_dict({**BASE, "rope_theta": 1e4, "rope_scaling": None})
    assert plain.rope_scaling is None and plain == ModelConfig.from_hf_dict(
        {**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
    )
    # Saving keeps the spelling the checkpoint used.
    assert "rope_scaling" in old.to_hf_dict() and "rope_parameters" not in old.to_hf_dict()
    assert new.to_hf_dict()["rope_parameters"]["rope_type"] == "llama3"


def test_defaults_and_derived_fields():
    cfg = ModelConfig.from_hf_dict({**BASE, "num_key_value_heads": None, "head_dim": None})
    assert cfg.num_key_value_heads == 4 and cfg.head_dim == 8
    qwen2 = ModelConfig.from_hf_dict({**BASE, "model_type": "qwen2", "use_sliding_window": False, "sliding_window": 32})
    assert qwen2.attention_bias and not qwen2.o_proj_bias
    qwen3 = ModelConfig.from_hf_dict({**BASE, "model_type": "qwen3", "head_dim": 16, "attention_bias": True})
    assert qwen3.qk_norm and qwen3.o_proj_bias and qwen3.head_dim == 16
    mistral = ModelConfig.from_hf_dict({**BASE, "model_type": "mistral", "sliding_window": 64})
    assert not mistral.attention_bias and mistral.sliding_window == 64
    assert mistral.layer_types == ("sliding_attention",) * 2 and mistral.attention_kinds[0].window == 64
    assert qwen2.sliding_window is None and qwen2.layer_types == ()  # use_sliding_window false: full
    qwen2_window = ModelConfig.from_hf_dict(
        {**BASE, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}
    )
    assert qwen2_window.layer_types == ("full_attention", "sliding_attention")
    assert qwen2_window.layer_kind_ids == (0, 1) and [k.window for k in qwen2_window.attention_kinds] == [None, 8]
    llama = ModelConfig.from_hf_dict({**BASE, "sliding_window": 4})  # Llama has no windows
    assert llama.sliding_window is None and len(llama.attention_kinds) == 1
    assert hash(cfg) == hash(ModelConfig.from_hf_dict({**BASE, "num_key_value_heads": None, "head_dim": None}))


def test_old_spelling_checkpoint_matches_transformers(hf_checkpoint):
    path, hf = hf_checkpoint("llama3_rope")

    def to_old(d):
        params = d.pop("rope_parameters")
        d["rope_theta"] = params.pop("rope_theta")
        d["rope_scaling"] = params

    _rewrite_config(path, to_old)
    assert load_model_config(path).rope_scaling["rope_type"] == "llama3"
    ids = random_ids((1, 20))
    np.testing.assert_allclose(jax_logits(from_pretrained(path), ids), hf_logits(hf, ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"model_type": "gemma"}, "model_type"),
        ({"model_type": "mixtral"}, "model_type"),
        ({"model_type": "qwen3_moe"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"num_experts": 8}, "num_experts"),
        ({"model_type": "mistral", "sliding_window": 0}, "sliding_window"),
        ({"model_type": "qwen2", "use_sliding_window": True, "layer_types": ["full_attention"]}, "layer_types"),
        ({"model_type": "qwen3", "layer_types": ["chunked_attention", "full_attention"]}, "layer_types"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope_type"),
        ({"rope_scaling": {"rope_type": "linear"}}, "factor"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": None}, "hidden_size"),
    ],
)
def test_unsupported_config_names_the_field(overrides, field):
    with pytest.raises(ModelError, match=field):
        ModelConfig.from_hf_dict({**BASE, **overrides})


def test_unsupported_checkpoint_fails_at_load(hf_checkpoint):
    path, _ = hf_checkpoint("mistral", sliding_window=8)
    _rewrite_config(path, lambda d: d.update(layer_types=["chunked_attention"] * 2))
    with pytest.raises(ModelError, match="layer_types"):
        from_pretrained(path)


def test_missing_and_unexpected_tensors_are_listed(hf_checkpoint):
    path, _ = hf_checkpoint("llama")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(3, np.float32)  # ignored
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError) as err:
        from_pretrained(path)
    msg = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "model.layers.0.extra.weight" in msg
    assert "inv_freq" not in msg


def test_wrong_tensor_shape(hf_checkpoint):
    path, _ = hf_checkpoint("llama")
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"] = np.ones(5, np.float32)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="model.norm.weight"):
        from_pretrained(path)


def test_missing_files_and_offline_hub_id(tmp_path, hf_checkpoint):
    with pytest.raises(ModelError, match="not a checkpoint directory"):
        from_pretrained(tmp_path / "does-not-exist")
    path, _ = hf_checkpoint("llama")
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="model.safetensors"):
        from_pretrained(path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="config.json"):
        load_model_config(empty)
    # conftest sets HF_HUB_OFFLINE=1: a hub id must fail with a clear message, not a traceback.
    with pytest.raises(ModelError, match="Hugging Face Hub"):
        load_model_config("jaxpref-test/no-such-model")


def test_save_writes_dtype_and_architecture(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("qwen3")
    save_pretrained(from_pretrained(path), tmp_path / "out")
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    assert d["architectures"] == ["Qwen3ForCausalLM"] and d["dtype"] == "float32" and d["head_dim"] == 16
