"""Loading straight into shards on a simulated 8-device CPU mesh (in a subprocess: the device
count must be set before JAX starts)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import AxisType
    from jaxpref.lora import LoraConfig, apply_lora
    from jaxpref.models import from_config, from_pretrained

    assert jax.device_count() == 8
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    path = sys.argv[1]
    ids = np.random.default_rng(0).integers(0, 128, (2, 10)).astype(np.int32)
    plain = from_pretrained(path)
    sharded = from_pretrained(path, mesh=mesh)
    q = sharded.layers.self_attn.q_proj.kernel[...]
    assert tuple(q.sharding.spec) == (None, "fsdp", "tensor", None), q.sharding.spec
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 16, 2, 16)
    emb = sharded.embed_tokens.embedding[...]
    assert tuple(emb.sharding.spec) == ("tensor", "fsdp")
    logits = lambda m: np.asarray(m.logits(m(ids)))
    np.testing.assert_allclose(logits(sharded), logits(plain), rtol=0, atol=1e-5)
    apply_lora(sharded, LoraConfig(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj",)), rngs=nnx.Rngs(0),
               mesh=mesh)
    b = sharded.layers.self_attn.q_proj.lora_b[...]
    assert tuple(b.sharding.spec) == (None, None, "tensor", None), b.sharding.spec
    rules = [("embed", None), ("mlp", ("fsdp", "tensor"))]
    init = from_config(plain.config, mesh=mesh, rules=rules)
    up = init.layers.mlp.up_proj.kernel[...]
    assert tuple(up.sharding.spec) == (None, None, ("fsdp", "tensor")), up.sharding.spec
    print("OK")
    """
)


def test_load_into_shards_on_8_cpu_devices(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("qwen3")
    script = tmp_path / "sharded.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, str(script), str(path)], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
