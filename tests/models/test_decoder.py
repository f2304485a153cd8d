"""Decoder mechanics: scanned + remat gradients, init, logical axes, mesh placement, dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxpref.errors import ModelError
from jaxpref.models import REMAT_POLICIES, ModelConfig, from_config, from_pretrained
from jaxpref.sharding import LOGICAL_AXES, logical_to_spec
from tests.models.tiny import TINY, random_ids

QWEN3 = ModelConfig.from_hf_dict({**TINY, "model_type": "qwen3", "head_dim": 16})


def _loss(model, ids, segment_ids):
    hidden = model(ids, segment_ids=segment_ids)
    logits = model.logits(hidden)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()


@pytest.mark.parametrize("policy", sorted(REMAT_POLICIES))
def test_scanned_remat_gradient_equals_unscanned(policy, hf_checkpoint):
    path, _ = hf_checkpoint("qwen3")
    ids = jnp.asarray(random_ids((2, 12)))
    segment_ids = jnp.asarray(np.repeat([[1] * 7 + [2] * 3 + [0] * 2], 2, axis=0))
    reference = from_pretrained(path, scan_layers=False, remat_policy="none")
    scanned = from_pretrained(path, scan_layers=True, remat_policy=policy)
    grad = nnx.jit(nnx.value_and_grad(_loss))
    loss_ref, g_ref = grad(reference, ids, segment_ids)
    loss, g = grad(scanned, ids, segment_ids)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, g_ref)


def test_unscanned_remat_runs(hf_checkpoint):
    path, _ = hf_checkpoint("llama")
    model = from_pretrained(path, scan_layers=False, remat_policy="full")
    ids = jnp.asarray(random_ids((1, 8)))
    assert np.isfinite(nnx.jit(nnx.grad(_loss))(model, ids, None)["embed_tokens"]["embedding"][...]).all()


def test_trace_size_does_not_grow_with_depth():
    def n_eqns(layers):
        cfg = ModelConfig.from_hf_dict({**TINY, "model_type": "llama", "num_hidden_layers": layers})
        graphdef, state = nnx.split(nnx.eval_shape(lambda: from_config(cfg)))
        ids = jnp.zeros((1, 8), jnp.int32)
        return len(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids))(state).eqns)

    assert n_eqns(2) == n_eqns(6)


def test_from_config_follows_hf_init():
    cfg = ModelConfig.from_hf_dict({**TINY, "model_type": "qwen2", "hidden_size": 64, "initializer_range": 0.05})
    model = from_config(cfg, seed=3)
    emb = np.asarray(model.embed_tokens.embedding[...])
    assert abs(emb.std() - 0.05) < 0.005 and abs(emb.mean()) < 0.005
    attn = model.layers.self_attn
    assert attn.q_proj.kernel.shape == (2, 64, 4, 16)
    assert np.all(np.asarray(attn.q_proj.bias[...]) == 0) and attn.o_proj.bias is None
    assert np.all(np.asarray(model.layers.input_layernorm.scale[...]) == 1)
    # Layers get independent draws.
    k = np.asarray(attn.k_proj.kernel[...])
    assert not np.allclose(k[0], k[1])
    again = from_config(cfg, seed=3)
    np.testing.assert_array_equal(np.asarray(again.lm_head.kernel[...]), np.asarray(model.lm_head.kernel[...]))


def test_every_param_has_logical_axes():
    model = from_config(QWEN3)
    params = nnx.state(model, nnx.Param)
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert leaves
    for var in leaves:
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == var.ndim and set(axes) <= set(LOGICAL_AXES), (axes, var.shape)
    assert model.layers.self_attn.q_proj.kernel.get_metadata()["out_sharding"] == (
        "layers",
        "embed",
        "heads",
        "head_dim",
    )


def _mesh():
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))


def test_mesh_placement(hf_checkpoint):
    path, _ = hf_checkpoint("qwen3")
    mesh = _mesh()
    for model in (from_pretrained(path, mesh=mesh), from_config(QWEN3, mesh=mesh)):
        kernel = model.layers.mlp.up_proj.kernel[...]
        assert isinstance(kernel.sharding, NamedSharding) and kernel.sharding.mesh == mesh
        ids = random_ids((1, 6))
        assert np.isfinite(np.asarray(model.logits(model(ids)))).all()


def test_logical_to_spec_rules():
    class FakeMesh:  # a 2x2x2 mesh; logical_to_spec only reads .shape
        shape = {"data": 2, "fsdp": 2, "tensor": 2}

    spec = logical_to_spec(("layers", "embed", "heads", "head_dim"), (2, 64, 4, 16), FakeMesh())
    assert tuple(spec) == (None, "fsdp", "tensor", None)
    # Not divisible -> replicated; a mesh axis is used once; rules override the defaults.
    assert tuple(logical_to_spec(("kv_heads",), (3,), FakeMesh())) == (None,)
    assert tuple(logical_to_spec(("embed", "mlp"), (8, 8), FakeMesh(), [("mlp", "fsdp")])) == ("fsdp", None)
    assert tuple(logical_to_spec(("vocab",), (8,), FakeMesh(), [("vocab", ("data", "tensor"))])) == (
        ("data", "tensor"),
    )


def test_bad_constructor_arguments():
    with pytest.raises(ModelError, match="remat_policy"):
        from_config(QWEN3, remat_policy="sometimes")
    with pytest.raises(ModelError, match="attention_impl"):
        from_config(QWEN3, attention_impl="flash")


def test_bfloat16_compute_float32_params():
    model = from_config(QWEN3, dtype=jnp.bfloat16)
    assert model.layers.mlp.up_proj.kernel[...].dtype == jnp.float32
    ids = jnp.asarray(random_ids((2, 8)))
    hidden = nnx.jit(lambda m, x: m(x))(model, ids)
    assert hidden.dtype == jnp.bfloat16 and np.isfinite(np.asarray(hidden, np.float32)).all()
    assert model.lm_head_weight().dtype == jnp.bfloat16 and model.lm_head_weight().shape == (32, 128)


def test_positions_default_to_arange(hf_checkpoint):
    path, _ = hf_checkpoint("llama")
    model = from_pretrained(path)
    ids = random_ids((2, 10))
    pos = np.broadcast_to(np.arange(10, dtype=np.int32), (2, 10))
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(model(ids, positions=pos)))
    shifted = np.asarray(model(ids, positions=pos + 3))
    assert not np.allclose(shifted, np.asarray(model(ids)))


@pytest.mark.parametrize("policy", ["none", "full"])
def test_forward_works_on_a_model_merged_from_outer_trace_state(policy):
    """Trainer pattern: split once, merge inside nested transforms (scan over micro-batches, grad)."""
    from jaxpref.lora import LoraConfig, apply_lora

    model = from_config(QWEN3, remat_policy=policy)
    apply_lora(model, LoraConfig(r=2, alpha=4.0, dropout=0.1, target_modules=("q_proj",)), rngs=nnx.Rngs(0))
    graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
    ids = jnp.asarray(random_ids((1, 6)))

    @jax.jit
    def step(params, frozen):
        def one(carry, i):
            def loss(params):
                m = nnx.merge(graphdef, params, frozen)
                return m(ids, deterministic=False, dropout_key=jax.random.key(i)).sum()

            return carry, jax.grad(loss)(params)

        shape = jax.eval_shape(lambda: nnx.merge(graphdef, params, frozen)(ids))
        return shape.shape, jax.lax.scan(one, 0, jnp.arange(2))[1]

    shape, grads = step(params, frozen)
    assert tuple(shape) == (1, 6, 32)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(grads))


def test_random_init_in_groups_gives_the_same_weights(monkeypatch):
    """``from_config`` initialises in groups of ``INIT_GROUP_BYTES`` of parameters (one jit for a 1B
    model held every weight's float32 draws at once); every weight draws from its own key, so one group
    per array gives the weights of one group for all."""
    from jaxpref.models import hf_io

    cfg = ModelConfig.from_hf_dict(
        dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    )  # fmt: skip
    whole = nnx.state(from_config(cfg, seed=3))
    monkeypatch.setattr(hf_io, "INIT_GROUP_BYTES", 1)
    leaves = jax.tree.leaves(whole)
    assert len(hf_io._init_groups(leaves)) == len(leaves) > 5
    for a, b in zip(leaves, jax.tree.leaves(nnx.state(from_config(cfg, seed=3))), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
