"""QLoRA: NF4 quantization against bitsandbytes and an independent numpy reference, the quantized forward,
loading, PEFT export and merge."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from jaxpref.errors import ModelError
from jaxpref.lora import BASE_PARAMS, LoraConfig, apply_lora, export_peft_adapter, merge_lora, trainable_filter
from jaxpref.models import ModelConfig, from_config, from_pretrained, nf4, save_pretrained
from jaxpref.models.quantize import base_weight_bytes, block_linears, dequantized_kernel, quantize_model
from tests.models.test_lora import _randomize_adapters
from tests.models.tiny import hf_logits, jax_logits, random_ids

bnb = pytest.importorskip("bitsandbytes.functional")

# ------------------------------------------------------------------ independent numpy reference


def ref_dynamic_map() -> np.ndarray:
    """bitsandbytes' signed dynamic map, from its definition in float64 then rounded: each value may differ
    from bitsandbytes' float32 arithmetic by an ulp, so it is compared with a tolerance."""
    vals = []
    for i in range(7):
        b = np.linspace(0.1, 1.0, 2**i + 1)
        means = (b[:-1] + b[1:]) / 2 * 10.0 ** (i - 6)
        vals += list(means) + list(-means)
    return np.sort(np.array(vals + [0.0, 1.0])).astype(np.float32)


def ref_nearest(x: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Index of the nearest code value (ties to the lower index: argmin takes the first)."""
    return np.argmin(np.abs(x[:, None].astype(np.float64) - code[None, :].astype(np.float64)), axis=1)


def ref_quantize(w: np.ndarray, dyn: np.ndarray) -> dict[str, np.ndarray]:
    """QLoRA's NF4 + double quantization written from the paper/bitsandbytes' description, in numpy."""
    x = w.reshape(-1).astype(np.float32).reshape(-1, 64)
    absmax = np.abs(x).max(axis=1)
    scaled = np.clip(x * (np.float32(1) / absmax)[:, None], -1, 1).reshape(-1)
    q = ref_nearest(scaled, nf4.NF4_CODE).astype(np.uint8)
    packed = (q[0::2] << 4) | q[1::2]
    offset = absmax.mean(dtype=np.float64).astype(np.float32)
    centred = absmax - offset
    pad = np.concatenate([centred, np.zeros(-centred.size % 256, np.float32)]).reshape(-1, 256)
    absmax2 = np.abs(pad).max(axis=1)
    q8 = ref_nearest((pad / absmax2[:, None]).reshape(-1)[: centred.size], dyn).astype(np.uint8)
    return dict(codes=packed, absmax=q8, absmax2=absmax2, offset=offset, absmax_f32=absmax)


def ref_dequantize(r: dict[str, np.ndarray], dyn: np.ndarray, shape) -> np.ndarray:
    nb = r["absmax"].size
    am = np.concatenate([dyn[r["absmax"]], np.zeros(-nb % 256, np.float32)]).reshape(-1, 256)
    am = (am * r["absmax2"][:, None]).reshape(-1)[:nb] + r["offset"]
    q = np.stack([r["codes"] >> 4, r["codes"] & 15], axis=1).reshape(-1)
    return (nf4.NF4_CODE[q].reshape(-1, 64) * am[:, None]).reshape(shape)


SHAPES = [(64, 128), (96, 1000), (512, 256)]  # 1000 x 96 / 64 = 1500 blocks: a partial last absmax block


@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_matches_the_numpy_reference(shape):
    rng = np.random.default_rng(shape[0])
    w = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    w[0, :7] = 0.0  # exact zeros and an outlier
    w[1, 3] = 0.5
    ours = nf4.quantize(jnp.asarray(w), nf4.NF4Config())
    dyn = nf4.dynamic_map()
    np.testing.assert_allclose(dyn, ref_dynamic_map(), rtol=1e-6, atol=0)
    ref = ref_quantize(w, dyn)
    np.testing.assert_array_equal(np.asarray(ours.codes), ref["codes"])
    np.testing.assert_allclose(np.asarray(ours.offset), ref["offset"], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(ours.absmax2), ref["absmax2"])
    np.testing.assert_array_equal(np.asarray(ours.absmax), ref["absmax"])
    deq = np.asarray(nf4.dequantize(ours, shape, jnp.float32))
    np.testing.assert_allclose(deq, ref_dequantize(ref, dyn, shape), rtol=1e-6, atol=1e-9)
    # quantization error: at most half the widest NF4 gap (0.16) of the block's absmax, plus the absmax's error
    err = np.abs(deq - w).reshape(-1, 64).max(axis=1) / ref["absmax_f32"]
    assert err.max() < 0.17
    plain = nf4.quantize(jnp.asarray(w), nf4.NF4Config(double_quant=False))
    np.testing.assert_array_equal(np.asarray(plain.absmax), ref["absmax_f32"])
    assert plain.absmax2 is None and plain.offset is None


def _bnb_state(q: nf4.NF4Arrays, shape, dtype=torch.float32):
    """A bitsandbytes QuantState holding our arrays."""
    state2 = bnb.QuantState(
        absmax=torch.from_numpy(np.asarray(q.absmax2)),
        code=torch.from_numpy(nf4.dynamic_map()),
        blocksize=256,
        dtype=torch.float32,
    )
    return bnb.QuantState(
        absmax=torch.from_numpy(np.asarray(q.absmax)),
        shape=torch.Size(shape),
        code=torch.from_numpy(nf4.NF4_CODE),
        blocksize=64,
        quant_type="nf4",
        dtype=dtype,
        offset=torch.tensor(np.asarray(q.offset)),
        state2=state2,
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_matches_bitsandbytes(shape):
    """bitsandbytes' own CPU functions: the same 4-bit codes, scales and dynamic map; its dequantization of
    our arrays equals ours bit for bit (and ours of its arrays equals its own).

    The 8-bit absmax codes: bitsandbytes' CPU kernel does not always round to the nearest level (on a few
    of every thousand blocks it picks a level one or two steps away from the nearest); this module rounds
    to the nearest (as the numpy reference). Where they differ ours is the nearer one.
    """
    torch.manual_seed(shape[0])
    w = 0.02 * torch.randn(shape)
    q_bnb, st = bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = nf4.quantize(jnp.asarray(w.numpy()), nf4.NF4Config())
    np.testing.assert_array_equal(nf4.dynamic_map(), bnb.create_dynamic_map(signed=True).numpy())
    np.testing.assert_array_equal(nf4.NF4_CODE, bnb.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(np.asarray(ours.codes), q_bnb.numpy().reshape(-1))
    np.testing.assert_allclose(np.asarray(ours.offset), st.offset.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.absmax2), st.state2.absmax.numpy(), rtol=1e-6)
    differ = np.asarray(ours.absmax) != st.absmax.numpy()
    assert differ.mean() < 0.01
    # where they differ, ours is the nearer level to the value being quantized
    _, plain = bnb.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    target = (plain.absmax.numpy() - st.offset.numpy()) / np.repeat(st.state2.absmax.numpy(), 256)[: differ.size]
    dyn = nf4.dynamic_map()
    ours_err, bnb_err = np.abs(dyn[np.asarray(ours.absmax)] - target), np.abs(dyn[st.absmax.numpy()] - target)
    assert (ours_err <= bnb_err + 1e-7).all()
    # dequantization: bit for bit, both ways
    ours_deq = np.asarray(nf4.dequantize(ours, shape, jnp.float32))
    bnb_of_ours = bnb.dequantize_4bit(torch.from_numpy(np.asarray(ours.codes)[:, None]), _bnb_state(ours, shape))
    np.testing.assert_array_equal(ours_deq, bnb_of_ours.numpy())
    theirs = nf4.NF4Arrays(
        jnp.asarray(q_bnb.numpy().reshape(-1)),
        jnp.asarray(st.absmax.numpy()),
        jnp.asarray(st.state2.absmax.numpy()),
        jnp.asarray(st.offset.numpy()),
    )
    np.testing.assert_array_equal(
        np.asarray(nf4.dequantize(theirs, shape, jnp.float32)), bnb.dequantize_4bit(q_bnb, st)
    )
    # without double quantization everything is exact
    q2, st2 = bnb.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    plain = nf4.quantize(jnp.asarray(w.numpy()), nf4.NF4Config(double_quant=False))
    np.testing.assert_array_equal(np.asarray(plain.codes), q2.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(plain.absmax), st2.absmax.numpy())
    np.testing.assert_array_equal(
        np.asarray(nf4.dequantize(plain, shape, jnp.float32)), bnb.dequantize_4bit(q2, st2).numpy()
    )


# ------------------------------------------------------------------ the model


def _float_twin(qmodel, path):
    """The float model of the same checkpoint with every block kernel replaced by the dequantized one."""
    twin = from_pretrained(path)
    for a, b in zip(block_linears(twin), block_linears(qmodel), strict=True):
        a.kernel.set_value(dequantized_kernel(b, jnp.float32))
    return twin


def test_loading_quantizes_each_hf_tensor_as_bitsandbytes(hf_checkpoint):
    """from_pretrained(quantization=...) stores, per layer, the codes bitsandbytes gives the transformers
    weight; the same arrays as quantizing the float model after loading."""
    path, hf = hf_checkpoint("llama_mqa_bias")
    q = from_pretrained(path, quantization=nf4.NF4Config())
    q_proj = q.layers.self_attn.q_proj
    codes, _ = bnb.quantize_4bit(hf.model.layers[1].self_attn.q_proj.weight.data, blocksize=64, quant_type="nf4")
    np.testing.assert_array_equal(np.asarray(q_proj.nf4_codes[...][1]), codes.numpy().reshape(-1))
    assert q_proj.kernel is None and q_proj.bias is not None  # biases stay float, as in bitsandbytes
    after = from_pretrained(path)
    quantize_model(after, nf4.NF4Config())
    for a, b in zip(block_linears(q), block_linears(after), strict=True):
        for x, y in zip(a.nf4_arrays(), b.nf4_arrays(), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    sizes = base_weight_bytes(q)
    assert sizes["quantized"] > 0 and q.embed_tokens.embedding[...].dtype == jnp.float32


@pytest.mark.parametrize("case", ["llama", "llama_tied"])
def test_qlora_forward_equals_the_float_model_with_dequantized_weights(case, hf_checkpoint):
    path, _ = hf_checkpoint(case)
    q = from_pretrained(path, quantization=nf4.NF4Config())
    cfg = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
    twin = _float_twin(q, path)
    ids = random_ids((2, 12))
    np.testing.assert_allclose(jax_logits(q, ids), jax_logits(twin, ids), rtol=0, atol=1e-5)
    apply_lora(q, cfg, rngs=nnx.Rngs(1))
    apply_lora(twin, cfg, rngs=nnx.Rngs(1))
    _randomize_adapters(q, 3)
    for a, b in zip(block_linears(twin), block_linears(q), strict=True):
        if b.lora_a is not None:
            a.lora_a.set_value(b.lora_a[...])
            a.lora_b.set_value(b.lora_b[...])
    np.testing.assert_allclose(jax_logits(q, ids), jax_logits(twin, ids), rtol=0, atol=1e-5)
    # only adapters train; the NF4 arrays are base weights, not parameters
    assert not jax.tree.leaves(nnx.state(q, nnx.All(trainable_filter(q), nf4.NF4Weight)))
    assert jax.tree.leaves(nnx.state(q, nnx.All(BASE_PARAMS, nf4.NF4Weight)))


def test_peft_loads_the_exported_adapter(hf_checkpoint, tmp_path):
    """The adapter tensors on disk are ours exactly; peft on the full-precision base loads them, and peft
    on a base holding our dequantized weights gives our logits (to 1e-4)."""
    path, _ = hf_checkpoint("llama3_rope")
    q = from_pretrained(path, quantization=nf4.NF4Config())
    apply_lora(
        q, LoraConfig(r=4, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj", "up_proj")), rngs=nnx.Rngs(0)
    )
    _randomize_adapters(q, 5)
    export_peft_adapter(q, tmp_path / "adapter", base_model_name_or_path=str(path))
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    a = np.asarray(q.layers.mlp.up_proj.lora_a[...][1])  # [in, r]
    np.testing.assert_array_equal(saved["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"], a.T)
    ids = random_ids((2, 10))
    full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "adapter").eval()
    assert np.isfinite(hf_logits(full, ids)).all()
    dequantized = _float_twin(q, path)
    save_pretrained(dequantized, tmp_path / "dequantized")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized")
    peft = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    np.testing.assert_allclose(hf_logits(peft, ids), jax_logits(q, ids), rtol=0, atol=1e-4)


def test_merge_dequantizes_the_base(hf_checkpoint):
    path, _ = hf_checkpoint("llama")
    q = from_pretrained(path, quantization=nf4.NF4Config())
    apply_lora(q, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("o_proj", "gate_proj")), rngs=nnx.Rngs(0))
    _randomize_adapters(q, 2)
    merged = merge_lora(q)
    assert merged.quantization is None and merged.layers.mlp.gate_proj.kernel is not None
    ids = random_ids((2, 12))
    np.testing.assert_allclose(jax_logits(merged, ids), jax_logits(q, ids), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(
        np.asarray(merged.layers.mlp.up_proj.kernel[...]),
        np.asarray(dequantized_kernel(q.layers.mlp.up_proj, jnp.float32)),
    )


LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    tie_word_embeddings=True,
)


def test_llama_1b_base_weight_bytes():
    """The quantized block weights are 0.258x their bfloat16 bytes; with the bfloat16 embedding (kept, as
    bitsandbytes/PEFT QLoRA keep it) the whole base model is 0.42x."""
    config = ModelConfig.from_hf_dict({"model_type": "llama", **LLAMA_1B})
    make = lambda q: nnx.eval_shape(  # noqa: E731
        lambda: from_config(config, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, quantization=q)
    )
    bf16, quant = base_weight_bytes(make(None)), base_weight_bytes(make(nf4.NF4Config()))
    linear_bf16 = bf16["float"] - quant["float"]
    assert quant["quantized"] / linear_bf16 == pytest.approx(0.258, abs=0.001)
    assert sum(quant.values()) / bf16["float"] == pytest.approx(0.42, abs=0.01)


SHARDED = """
import sys
import jax, numpy as np
from flax import nnx
from jax.sharding import AxisType
from jaxpref.lora import LoraConfig, apply_lora
from jaxpref.models import from_pretrained, nf4

assert jax.device_count() == 8
mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
ids = np.random.default_rng(0).integers(0, 128, (2, 10)).astype(np.int32)
emb = sys.argv[2] == "emb"
quantization = nf4.NF4Config(quantize_embeddings=emb)
plain = from_pretrained(sys.argv[1], quantization=quantization)
sharded = from_pretrained(sys.argv[1], quantization=quantization, mesh=mesh)
codes = sharded.layers.mlp.up_proj.nf4_codes[...]
assert tuple(codes.sharding.spec) == (None, "fsdp"), codes.sharding.spec
np.testing.assert_array_equal(np.asarray(codes), np.asarray(plain.layers.mlp.up_proj.nf4_codes[...]))
for table in [sharded.embed_tokens, sharded.lm_head] if emb else []:
    # rows over tensor (as the float table's vocabulary), each row's codes over fsdp (its one block scale here
    # stays whole: hidden 64)
    assert tuple(table.nf4_codes[...].sharding.spec) == ("tensor", "fsdp"), table.nf4_codes[...].sharding.spec
    assert tuple(table.nf4_absmax[...].sharding.spec)[0] == "tensor", table.nf4_absmax[...].sharding.spec
    np.testing.assert_array_equal(np.asarray(table.nf4_codes[...]), np.asarray(plain.embed_tokens.nf4_codes[...])
                                  if table is sharded.embed_tokens else np.asarray(plain.lm_head.nf4_codes[...]))
cfg = LoraConfig(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "up_proj"))
for m in (plain, sharded):
    apply_lora(m, cfg, rngs=nnx.Rngs(0), mesh=mesh if m is sharded else None)

def loss(model):
    return model.logits(model(ids)).std()

grads = [nnx.jit(lambda m: nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(m))(m) for m in (plain, sharded)]
for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
print("OK")
"""


@pytest.mark.parametrize("tables", ["float", "emb"])
def test_qlora_loads_into_shards_and_trains_on_8_cpu_devices(tables, hf_checkpoint, tmp_path):
    """NF4 codes split over fsdp like any weight (NF4 embedding / LM head rows over tensor too); the adapters'
    gradients equal the single-device ones."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    path, _ = hf_checkpoint("llama", **({"hidden_size": 64} if tables == "emb" else {}))
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(script), str(path), tables]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


RSS_SCRIPT = """
import json, os, sys
import numpy as np

path, mode = sys.argv[1], sys.argv[2]
h, i, layers = 1024, 4096, 12
if mode == "write":
    from safetensors.numpy import save_file

    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=h, intermediate_size=i,
                  num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                  vocab_size=8192, rms_norm_eps=1e-5, tie_word_embeddings=True, torch_dtype="float32")
    json.dump(config, open(path + "/config.json", "w"))
    rng = np.random.default_rng(0)
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (256, h), "self_attn.v_proj": (256, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    float_bytes, weight_map = 0, {}
    for layer in range(layers):
        tensors = {f"model.layers.{layer}.{k}.weight": (0.02 * rng.standard_normal(s)).astype(np.float32)
                   for k, s in shapes.items()}
        float_bytes += sum(t.nbytes for t in tensors.values())
        tensors |= {f"model.layers.{layer}.{n}.weight": np.ones(h, np.float32)
                    for n in ("input_layernorm", "post_attention_layernorm")}
        weight_map |= {k: f"model-{layer:05d}.safetensors" for k in tensors}
        save_file(tensors, f"{path}/model-{layer:05d}.safetensors")
    rest = {"model.embed_tokens.weight": np.zeros((8192, h), np.float32), "model.norm.weight": np.ones(h, np.float32)}
    save_file(rest, f"{path}/model-rest.safetensors")
    weight_map |= {k: "model-rest.safetensors" for k in rest}
    json.dump({"weight_map": weight_map}, open(path + "/model.safetensors.index.json", "w"))
    print(json.dumps(dict(float_bytes=float_bytes)))
else:
    import jax.numpy as jnp
    from jaxpref.models import from_pretrained, nf4

    jnp.zeros(1).block_until_ready()
    with open("/proc/self/status") as f:
        before = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak starts again from the current RSS
    model = from_pretrained(path, quantization=nf4.NF4Config() if mode == "nf4" else None)
    with open("/proc/self/status") as f:  # VmHWM: ru_maxrss may keep a peak from before the reset
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    print(json.dumps(dict(load_delta=peak - before)))
"""


def test_quantized_load_never_holds_the_float_weights(tmp_path):
    """Loading a checkpoint with 696 MiB of float32 projection weights into NF4 (90 MiB, plus the 32 MiB float32
    embedding) raises the peak RSS by less than half of those float weights (a loader that held them would
    exceed them all, as the float32 load does): each tensor is quantized as it is read. Measured: +0.22 GiB for
    NF4, +0.76 GiB for float32.
    """
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "rss.py"
    script.write_text(RSS_SCRIPT)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    root = Path(__file__).resolve().parents[2]
    # a clean environment: the test process's (persistent compilation cache, variables set by the libraries
    # other tests import) changed both loads' peaks by up to 400 MiB
    env = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    env |= {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)}

    def run(mode: str) -> dict:
        out = subprocess.run(
            [sys.executable, str(script), str(ckpt), mode], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    float_bytes = run("write")["float_bytes"]
    quantized, full = run("nf4")["load_delta"], run("float")["load_delta"]
    assert full > float_bytes, (quantized, full, float_bytes)  # the float load holds the weights
    assert quantized < 0.5 * float_bytes, (quantized, full, float_bytes)


@pytest.mark.parametrize("case", ["phi3", "gemma2", "gemma3"])
def test_qlora_on_the_other_families(case, hf_checkpoint):
    """Phi-3's fused qkv/gate_up projections and Gemma's blocks: every stored weight's codes are bitsandbytes'
    of the transformers tensor, and the forward equals the float model holding the dequantized weights."""
    from jaxpref.models.hf_io import hf_module_name, iter_modules
    from jaxpref.models.layers import Linear

    path, hf = hf_checkpoint(case)
    q = from_pretrained(path, quantization=nf4.NF4Config())
    weights = hf.state_dict()
    for mod_path, lin in iter_modules(q):
        if isinstance(lin, Linear) and mod_path[0] == "layers":
            w = weights[hf_module_name(mod_path, 1) + ".weight"]
            codes, _ = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
            np.testing.assert_array_equal(np.asarray(lin.nf4_codes[...][1]), codes.numpy().reshape(-1))
    ids = random_ids((2, 12))
    np.testing.assert_allclose(jax_logits(q, ids), jax_logits(_float_twin(q, path), ids), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ NF4 embeddings (qlora_quantize_embeddings)

EMB = nf4.NF4Config(quantize_embeddings=True)


def test_table_rows_dequantize_as_the_whole_tensor():
    """quantize_table (chunks of rows) = quantize of the whole [V, H] tensor; dequantize_rows of gathered ids
    = those rows of dequantize (600 blocks: more than one second-level block)."""
    t = jax.random.normal(jax.random.key(0), (300, 128)) * 0.02
    for cfg in (nf4.NF4Config(), nf4.NF4Config(double_quant=False)):
        whole, table = nf4.quantize(t, cfg), nf4.quantize_table(t, cfg, rows_per_chunk=64)
        for a, b in zip(whole, table, strict=True):
            np.testing.assert_array_equal(np.asarray(a).reshape(-1), np.asarray(b).reshape(-1))
        ids = jnp.array([[0, 5, 299], [17, 17, 3]])
        np.testing.assert_array_equal(
            np.asarray(nf4.dequantize_rows(table, ids, jnp.float32)),
            np.asarray(nf4.dequantize(whole, (300, 128), jnp.float32)[ids]),
        )


def _float_twin_with_tables(qmodel, path):
    """The float twin with the dequantized embedding and (untied) LM head too."""
    twin = _float_twin(qmodel, path)
    twin.embed_tokens.embedding.set_value(qmodel.embed_tokens.dequantized(jnp.float32))
    if twin.lm_head is not None:
        twin.lm_head.kernel.set_value(qmodel.lm_head.dequantized(jnp.float32).T)
    return twin


@pytest.mark.parametrize("case", ["llama", "llama_tied", "gemma2"])
def test_nf4_embeddings_forward_equals_the_float_model_with_dequantized_tables(case, hf_checkpoint):
    """Tied and untied heads, and Gemma's embedding scale on the dequantized rows; the codes are those of
    the HF [V, H] tensors (bitsandbytes' order, checked against bitsandbytes above)."""
    path, hf = hf_checkpoint(case, hidden_size=64)
    q = from_pretrained(path, quantization=EMB)
    assert q.embed_tokens.embedding is None and q.embed_tokens.nf4_codes[...].shape == (128, 32)
    want = nf4.quantize(jnp.asarray(hf.model.embed_tokens.weight.detach().numpy()), nf4.NF4Config())
    np.testing.assert_array_equal(np.asarray(q.embed_tokens.nf4_codes[...]).reshape(-1), np.asarray(want.codes))
    if q.lm_head is not None:
        assert q.lm_head.kernel is None
        want = nf4.quantize(jnp.asarray(hf.lm_head.weight.detach().numpy()), nf4.NF4Config())
        np.testing.assert_array_equal(np.asarray(q.lm_head.nf4_absmax[...]).reshape(-1), np.asarray(want.absmax))
    twin = _float_twin_with_tables(q, path)
    ids = random_ids((2, 12))
    np.testing.assert_allclose(jax_logits(q, ids), jax_logits(twin, ids), rtol=0, atol=1e-5)
    # quantizing after loading gives the same arrays
    after = from_pretrained(path)
    quantize_model(after, EMB)
    for x, y in zip(q.embed_tokens.nf4_arrays(), after.embed_tokens.nf4_arrays(), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nf4_embeddings_merge_dequantizes_and_reject_modules_to_save(hf_checkpoint):
    path, _ = hf_checkpoint("llama", hidden_size=64)
    q = from_pretrained(path, quantization=EMB)
    with pytest.raises(ModelError, match="modules_to_save.*qlora_quantize_embeddings"):
        apply_lora(q, LoraConfig(r=2, alpha=2, dropout=0.0, target_modules=("q_proj",), modules_to_save=("lm_head",)),
                   rngs=nnx.Rngs(0))  # fmt: skip
    apply_lora(q, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("o_proj",)), rngs=nnx.Rngs(0))
    _randomize_adapters(q, 2)
    merged = merge_lora(q)
    np.testing.assert_array_equal(
        np.asarray(merged.embed_tokens.embedding[...]), np.asarray(q.embed_tokens.dequantized(jnp.float32))
    )
    ids = random_ids((2, 12))
    np.testing.assert_allclose(jax_logits(merged, ids), jax_logits(q, ids), rtol=0, atol=1e-5)
    sizes = base_weight_bytes(q)
    emb = 2 * nf4.quantized_bytes(128 * 64, nf4.NF4Config())  # embedding + untied head
    layer = (64 * 64, 64 * 32, 64 * 32, 64 * 64, 64 * 64, 64 * 64, 64 * 64)  # q k v o gate up down
    blocks = 2 * sum(nf4.quantized_bytes(n, nf4.NF4Config()) for n in layer)
    assert sizes["quantized"] == emb + blocks


def test_nf4_embeddings_need_whole_blocks_per_row():
    config = ModelConfig.from_hf_dict({"model_type": "llama", **{**LLAMA_1B, "hidden_size": 96, "vocab_size": 64,
                                                                "num_attention_heads": 3, "num_key_value_heads": 1,
                                                                "head_dim": 32, "num_hidden_layers": 1}})  # fmt: skip
    with pytest.raises(ModelError, match="hidden_size 96 is not a multiple of the NF4 block size 64"):
        nnx.eval_shape(lambda: from_config(config, quantization=EMB))


def test_llama_1b_base_weight_bytes_with_nf4_embeddings():
    """With the embedding as NF4 too, the whole Llama-3.2-1B base is at most 0.3x its bfloat16 bytes."""
    config = ModelConfig.from_hf_dict({"model_type": "llama", **LLAMA_1B})
    make = lambda q: nnx.eval_shape(  # noqa: E731
        lambda: from_config(config, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, quantization=q)
    )
    bf16, quant = base_weight_bytes(make(None)), base_weight_bytes(make(EMB))
    ratio = sum(quant.values()) / bf16["float"]
    assert ratio <= 0.3 and ratio == pytest.approx(0.258, abs=0.001)
    assert quant["float"] == (2 * 16 + 1) * 2048 * 2  # only the norms stay bfloat16
