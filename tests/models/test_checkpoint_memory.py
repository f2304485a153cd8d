"""Loading and saving a sharded checkpoint streams tensor by tensor: peak RSS < parameters + 1 GiB.

The streaming reader and writer (hf_io's own safetensors header parsing and writing) agree with the
safetensors library. The memory check runs scripts/check_checkpoint_rss.py (fresh processes: write a
random checkpoint in 3+ shards, load it with ``from_pretrained``, save it with ``save_pretrained`` into
3+ shards, measuring ``ru_maxrss``) on a Llama-shaped model of ~400M float32 parameters (1.5 GiB): a
loader or saver that held the checkpoint a second time, or kept its memory-mapped pages, exceeds the
bound by over half a GiB.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxpref.errors import ModelError
from jaxpref.models import from_pretrained
from jaxpref.models.safetensors_io import SafetensorsReader, write_safetensors

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "check_checkpoint_rss.py"
GIB = 1024**3

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 32768,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "torch_dtype": "float32",
}


def _mixed_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "a.bf16": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
        "b.f32": rng.standard_normal((7,)).astype(np.float32),
        "c.i64": np.arange(3, dtype=np.int64),
        "d.f16": rng.standard_normal((2, 3, 1)).astype(np.float16),
        "e.u8": np.arange(5, dtype=np.uint8),
        "f.bool": np.array([True, False, True]),
        "g.empty": np.zeros((0, 4), np.float32),
        "h.scalar": np.array(2.5, np.float64),
    }


def test_streaming_writer_output_reads_back_with_safetensors(tmp_path):
    tensors = _mixed_tensors()
    entries = [(n, a.shape, a.dtype, lambda a=a: a) for n, a in tensors.items()]
    write_safetensors(entries, str(tmp_path), base="model", max_shard_size=40)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert len(set(index["weight_map"].values())) >= 3
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    for name, want in tensors.items():
        with safe_open(tmp_path / index["weight_map"][name], "numpy") as f:
            assert f.metadata() == {"format": "pt"}
            got = f.get_tensor(name)
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), name
    with SafetensorsReader.for_checkpoint(str(tmp_path)) as reader:
        for name, want in tensors.items():
            got = reader.get(name)
            assert got.dtype == want.dtype and np.array_equal(got, want), name

    # One file, every dtype: data stays aligned for torch's reader (widest dtypes first).
    torch = pytest.importorskip("torch")
    write_safetensors(entries, str(tmp_path / "one"), base="model", max_shard_size=2**62)
    with safe_open(tmp_path / "one" / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("c.i64"), torch.arange(3))
        assert f.get_tensor("a.bf16").dtype == torch.bfloat16


def test_reader_reads_safetensors_files_and_rejects_truncated_ones(tmp_path):
    tensors = _mixed_tensors()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with SafetensorsReader.for_checkpoint(str(tmp_path)) as reader:
        assert reader.keys() == set(tensors)
        for name, want in tensors.items():
            got = reader.get(name)
            assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), name
            assert got.flags.writeable
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-4])
    with pytest.raises(ModelError, match="offsets"):
        SafetensorsReader.for_checkpoint(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"not json")
    with pytest.raises(ModelError, match="not a safetensors file"):
        SafetensorsReader.for_checkpoint(str(tmp_path))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="compares CPU buffer addresses")
def test_loaded_parameters_are_jax_buffers_that_donation_reuses(hf_checkpoint):
    """The streaming load does not leave parameters aliasing numpy memory: XLA cannot update such a buffer
    in place, so the first donated train step would hold the parameters twice."""
    path, _ = hf_checkpoint("llama", tie_word_embeddings=True)
    model = from_pretrained(path)
    double = jax.jit(lambda x: x * 2, donate_argnums=0)
    for name, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        x = param.get_value()
        before = np.asarray(x).copy()
        address = x.unsafe_buffer_pointer()
        y = double(x)
        assert y.unsafe_buffer_pointer() == address, name
        np.testing.assert_array_equal(np.asarray(y), 2 * before)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self and resets its RSS peak")
def test_sharded_load_and_save_stay_under_params_plus_1gib(tmp_path):
    config = tmp_path / "llama-400m" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(CONFIG))
    result = tmp_path / "result.json"
    cmd = [sys.executable, str(SCRIPT), "--config", str(config), "--param-dtype", "float32"]
    cmd += ["--ckpt-dtype", "float32", "--names", "jaxpref", "--workdir", str(tmp_path), "--json", str(result)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.is_file(), f"check failed to run ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    (r,) = json.loads(result.read_text())
    table = proc.stdout
    print(table)

    assert r["ckpt_shards"] >= 3 and r["out_shards"] >= 3, table
    assert r["checked_tensors"] >= 3, table
    # Big enough to catch a second copy: parameters + checkpoint + the JAX baseline exceed the bound.
    assert r["param_bytes"] > 1.4 * GIB, table
    assert r["rss_jax_init"] + r["param_bytes"] + r["ckpt_bytes"] > r["bound"] + GIB // 4, table
    assert r["load_peak"] < r["bound"], f"load peak RSS over parameters + 1 GiB:\n{table}"
    assert r["save_peak"] < r["bound"], f"save peak RSS over parameters + 1 GiB:\n{table}"
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
