"""Subprocess body of test_mesh.py: one train step on 1 device and on 8 simulated CPU devices.

Run as ``python -m tests.scale.mesh_worker {kd,dpo,grpo,optimizers} OUT.json`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the device count is fixed when JAX starts).
For every mesh shape it builds the model straight into its shards, runs one SGD-with-momentum step
through :class:`jaxpref.trainer.Trainer` and records the loss, the gradient norm, the updated
trainable weights' distance to the 1-device result and every sharding mismatch against the table
below (written out by hand from the default rules, not computed by ``jaxpref.sharding``).
"""

from __future__ import annotations

import json
import sys
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxpref import lora, models
from jaxpref import sharding as shd
from jaxpref.objectives import build_objective
from jaxpref.trainer import Trainer, stack_micro_batches

SHAPES = ((8, 1, 1), (1, 8, 1), (2, 2, 2))
# DPO (LoRA + a reference companion) on the mixed mesh only: it shards data, fsdp and tensor at once, and
# every extra mesh is another compilation of the step (the pure meshes are covered by the KD case).
SHAPES_BY_CASE = {"kd": SHAPES, "dpo": ((2, 2, 2),), "grpo": ((2, 2, 2),)}
V, T, K = 64, 16, 4
TINY = dict(
    model_type="llama",
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
LORA = lora.LoraConfig(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj"))


def expected_spec(path: str, fsdp: bool, tensor: bool) -> tuple:
    """The default rules by hand: embed -> fsdp; vocab, heads, kv_heads, mlp -> tensor; the rest
    (layers, head_dim, norm, lora_rank) replicated. Every dimension of the tiny model divides 2 and 8."""
    f, t = ("fsdp" if fsdp else None), ("tensor" if tensor else None)
    table = {
        "embed_tokens.embedding": (t, f),  # [V, H]
        "lm_head.kernel": (f, t),  # [H, V]
        "self_attn.q_proj.kernel": (None, f, t, None),  # [L, H, heads, head_dim]
        "self_attn.k_proj.kernel": (None, f, t, None),  # [L, H, kv_heads, head_dim]
        "self_attn.v_proj.kernel": (None, f, t, None),
        "self_attn.o_proj.kernel": (None, t, None, f),  # [L, heads, head_dim, H]
        "mlp.gate_proj.kernel": (None, f, t),  # [L, H, I]
        "mlp.up_proj.kernel": (None, f, t),
        "mlp.down_proj.kernel": (None, t, f),  # [L, I, H]
        "self_attn.q_proj.lora_a": (None, f, None),  # [L, H, r]: the base layer's input axes + rank
        "self_attn.q_proj.lora_b": (None, None, t, None),  # [L, r, heads, head_dim]
        "self_attn.v_proj.lora_a": (None, f, None),
        "self_attn.v_proj.lora_b": (None, None, t, None),  # [L, r, kv_heads, head_dim]
        "mlp.down_proj.lora_a": (None, t, None),  # [L, I, r]
        "mlp.down_proj.lora_b": (None, None, f),  # [L, r, H]
    }
    for suffix, spec in table.items():
        if path.endswith(suffix):
            return spec
    if path.endswith("scale"):  # RMSNorm scales: replicated
        return ()
    raise KeyError(f"no expected sharding for {path}")


def _norm(spec: P, ndim: int) -> tuple:
    out = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
    return out if any(a is not None for a in out) else ()


def _leaves(tree) -> list[tuple[str, jax.Array]]:
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        keys = [k for k in keys if k not in ("value", "raw_value")]
        out.append((".".join(keys), leaf))
    return out


def sharding_mismatches(tree, mesh_shape: tuple[int, int, int], rules_fn=expected_spec) -> list[str]:
    """Every array of ``tree`` whose sharding differs from the hand-written table."""
    fsdp, tensor = mesh_shape[1] > 1, mesh_shape[2] > 1
    bad = []
    for path, leaf in _leaves(tree):
        if not hasattr(leaf, "sharding") or leaf.ndim == 0:
            continue
        want = _norm(P(*rules_fn(path, fsdp, tensor)), leaf.ndim)
        got = _norm(leaf.sharding.spec, leaf.ndim)
        if got != want:
            bad.append(f"{path}: {got} != {want}")
    return bad


# ---- batches ---------------------------------------------------------------------------------------
def kd_micro_batch(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    """KD rows with ragged lengths, partial loss masks and renormalised top-K teacher log-probs."""
    lengths = rng.integers(T // 2, T + 1, rows)
    seg = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(0, V, (rows, T)).astype(np.int32) * seg
    loss_mask = seg.astype(bool) & (rng.random((rows, T)) < 0.8)
    tids = np.stack([np.stack([rng.permutation(V)[:K] for _ in range(T)]) for _ in range(rows)]).astype(np.int32)
    keep = rng.random((rows, T, K)) < 0.9
    keep[..., 0] = True
    tmask = keep & loss_mask[..., None]
    raw = np.sort(rng.normal(size=(rows, T, K)), axis=-1)[..., ::-1]
    lse = np.log(np.sum(np.where(tmask, np.exp(raw), 0.0), -1, keepdims=True) + 1e-30)
    return {
        "input_ids": ids,
        "labels": np.roll(ids, -1, axis=1),
        "loss_mask": loss_mask,
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (rows, T)).copy(),
        "segment_ids": seg,
        "target_token_ids": np.where(tmask, tids, 0).astype(np.int32),
        "target_logprobs": np.where(tmask, raw - lse, 0.0).astype(np.float32),
        "target_mask": tmask,
    }


def pair_micro_batch(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    """Preference pairs: prompt then completion per side, the last row a padding pair."""
    out: dict[str, np.ndarray] = {}
    prompt = rng.integers(3, 6, rows)
    for side in ("chosen_", "rejected_"):
        lengths = rng.integers(T // 2, T + 1, rows)
        seg = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
        seg[-1] = 0
        ids = rng.integers(1, V, (rows, T)).astype(np.int32) * seg
        nxt = np.pad(seg[:, 1:], ((0, 0), (0, 1)))
        completion = (np.arange(T)[None] >= prompt[:, None] - 1) & (nxt > 0)
        out[side + "input_ids"] = ids
        out[side + "labels"] = np.roll(ids, -1, axis=1)
        out[side + "loss_mask"] = completion & (seg > 0)
        out[side + "positions"] = np.broadcast_to(np.arange(T, dtype=np.int32), (rows, T)).copy()
        out[side + "segment_ids"] = seg
    out["pair_mask"] = np.arange(rows) < rows - 1
    return out


def grpo_micro_batch(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    """GRPO rows: prompt then sampled completion, advantages, the sampler's log-probs; the last row padding."""
    lengths = rng.integers(T // 2, T + 1, rows)
    seg = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    seg[-1] = 0
    ids = rng.integers(1, V, (rows, T)).astype(np.int32) * seg
    prompt = rng.integers(3, 6, rows)
    nxt = np.pad(seg[:, 1:], ((0, 0), (0, 1)))
    completion = (np.arange(T)[None] >= prompt[:, None] - 1) & (nxt > 0) & (seg > 0)
    return {
        "input_ids": ids,
        "labels": np.roll(ids, -1, axis=1),
        "loss_mask": completion,
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (rows, T)).copy(),
        "segment_ids": seg,
        "advantages": np.where(seg.any(1), rng.normal(size=rows), 0.0).astype(np.float32),
        # near the tiny model's log-probs at init (about -log V), so that importance ratios clip but stay O(1)
        "old_logps": np.where(completion, -np.log(V) + rng.normal(0.0, 0.3, (rows, T)), 0.0).astype(np.float32),
    }


# ---- cases -----------------------------------------------------------------------------------------
def case(name: str):
    """(objective, model factory(mesh), companions factory(mesh), micro-batches, trainable filter)."""
    tiny = models.ModelConfig.from_hf_dict(TINY)
    rng = np.random.default_rng(0)
    if name == "kd":
        cfg = SimpleNamespace(
            kd_alpha=1.0,
            kd_ce_alpha=0.5,
            kd_temperature=2.0,
            kd_beta=0.0,
            kd_normalize_topk=False,
            kd_zscore_base_temp=None,
            kd_teacher_model=None,
            kd_teacher_top_k=K,
            kd_temperature_min=None,
            fused_kernel=None,
        )
        batches = [kd_micro_batch(rng, 8), kd_micro_batch(rng, 8)]  # 2 micro-batches: accumulation
        return build_objective(cfg, "kd"), (lambda mesh: models.from_config(tiny, seed=0, mesh=mesh)), None, batches

    if name == "grpo":
        # LoRA, the KL to the adapters-off reference, reused completions (importance ratios), the entropy pass
        trl = SimpleNamespace(
            temperature=0.8, beta=0.04, epsilon=0.2, epsilon_high=0.28, delta=None, loss_type="dapo",
            importance_sampling_level="token", num_iterations=2, use_bias_correction_kl=True, max_completion_length=T,
        )  # fmt: skip
        cfg = SimpleNamespace(trl=trl, adapter="lora", rl_adapter_ref_model=False, fused_kernel=None)
        batches = [grpo_micro_batch(rng, 8), grpo_micro_batch(rng, 8)]
        return build_objective(cfg, "grpo"), lora_policy(tiny), None, batches

    cfg = SimpleNamespace(
        rl_beta=0.1,
        dpo_loss_type=["sigmoid"],
        dpo_loss_weights=None,
        dpo_use_weighting=False,
        dpo_label_smoothing=0.0,
        adapter="lora",
        rl_adapter_ref_model=True,
        precompute_ref_log_probs=False,
        fused_kernel=None,
    )

    def reference(mesh):  # a frozen copy (rl_adapter_ref_model) with other weights: a non-trivial margin
        return {"reference": models.from_config(tiny, seed=5, mesh=mesh)}

    return build_objective(cfg, "dpo"), lora_policy(tiny), reference, [pair_micro_batch(rng, 8)]


def lora_policy(tiny):
    """A factory(mesh) of the tiny model with LoRA on q/v/down, its B matrices away from 0."""

    def policy(mesh):
        m = models.from_config(tiny, seed=0, mesh=mesh)
        lora.apply_lora(m, LORA, rngs=nnx.Rngs(1), mesh=mesh)
        for lin in (m.layers.self_attn.q_proj, m.layers.self_attn.v_proj, m.layers.mlp.down_proj):
            # B = 0 at init would make the first update blind to the base weights' sharding: start at B != 0.
            b = lin.lora_b[...]
            bump = jax.jit(
                lambda b: b + 0.05 * jax.random.normal(jax.random.key(2), b.shape, b.dtype), out_shardings=b.sharding
            )
            lin.lora_b.set_value(bump(b))
        return m

    return policy


def run(name: str) -> dict:
    objective, make_model, make_companions, batches = case(name)
    results, reference_params = {}, None
    for shape in (None, *SHAPES_BY_CASE[name]):
        t0 = time.perf_counter()
        if shape is None:
            mesh = shd.make_mesh(None, devices=jax.devices()[:1])
        else:
            mesh = shd.make_mesh(dict(zip(shd.MESH_AXES, shape)))
        # created in their shards, never copied from one device to the others
        with jax.transfer_guard_device_to_device("disallow_explicit"):
            model = make_model(mesh)
            companions = make_companions(mesh) if make_companions else None
        trainer = Trainer(
            model,
            objective,
            optax.sgd(0.5, momentum=0.9),
            mesh=mesh,
            trainable=lora.trainable_filter(model),
            companions=companions,
        )
        if shape is None:
            start = {p: np.array(x) for p, x in _leaves(trainer.params)}
        stats = trainer.train_step(batches)
        params = {p: np.asarray(x) for p, x in _leaves(trainer.params)}
        entry = {"loss": stats["loss"], "grad_norm": stats["grad_norm"], "seconds": time.perf_counter() - t0}
        if shape is None:
            reference_params = params
        else:
            entry["max_param_diff"] = max(float(np.max(np.abs(params[p] - reference_params[p]))) for p in params)
            entry["mismatches"] = (
                sharding_mismatches(trainer.params, shape)
                + sharding_mismatches(trainer.frozen, shape)
                + sharding_mismatches(trainer.opt_state, shape)
                + sharding_mismatches(trainer.companions, shape)
            )
            entry["n_checked"] = sum(len(_leaves(t)) for t in (trainer.params, trainer.frozen, trainer.companions))
            batch = shd.global_batch(stack_micro_batches(batches), mesh, leading_dims=1)
            entry["batch_specs"] = sorted({str(_norm(x.sharding.spec, 2)) for x in batch.values()})
        results[str(shape)] = entry
    # how far the 1-device step moved the weights: the tolerance on the differences must be far smaller
    results["update_size"] = max(float(np.max(np.abs(reference_params[p] - start[p]))) for p in start)
    return results


# ---- every optimizer name on the mixed mesh, bfloat16 parameters -----------------------------------------
# Wide enough for Adafactor to factor (two dimensions >= 128): embedding [256, 128], MLP [2, 128, 256].
WIDE = {**TINY, "vocab_size": 256, "hidden_size": 128, "intermediate_size": 256, "head_dim": 32}
OPTIMIZERS = ("adamw", "adam", "adafactor", "lion", "sgd")


def expected_optimizer_spec(path: str, fsdp: bool, tensor: bool) -> tuple:
    """Adafactor's factored moments by hand: ``v_row`` drops the parameter's largest dimension,
    ``v_col`` its second largest, and keep the other dimensions' shardings; every other state array
    (Adam/Lion moments, unfactored ``v``) is sharded like its parameter; placeholders are replicated."""
    f, t = ("fsdp" if fsdp else None), ("tensor" if tensor else None)
    factored = {
        "embed_tokens.embedding": ((f,), (t,)),  # [V=256, H=128]: v_row [H], v_col [V]
        "lm_head.kernel": ((f,), (t,)),  # [H=128, V=256]
        "mlp.gate_proj.kernel": ((None, f), (None, t)),  # [L, H=128, I=256]: v_row [L, H], v_col [L, I]
        "mlp.up_proj.kernel": ((None, f), (None, t)),
        "mlp.down_proj.kernel": ((None, f), (None, t)),  # [L, I=256, H=128]
    }
    for suffix, (row, col) in factored.items():
        if path.endswith(suffix) and (".v_row." in path or ".v_col." in path):
            return row if ".v_row." in path else col
    if ".v_row." in path or ".v_col." in path:
        return ()  # a (1,) placeholder of an unfactored array
    if ".v." in path and any(path.endswith(s) for s in factored):
        return ()  # a (1,) placeholder: this array is factored
    return expected_spec(path, fsdp, tensor)


def run_optimizers() -> dict:
    """One step of every optimizer name (``jaxpref.optim``) on bfloat16 parameters, 1 device vs (2, 2, 2)."""
    from jaxpref.optim import make_optimizer

    wide = models.ModelConfig.from_hf_dict(WIDE)
    objective = case("kd")[0]
    rng = np.random.default_rng(0)
    batch = kd_micro_batch(rng, 8)
    meshes = {
        None: shd.make_mesh(None, devices=jax.devices()[:1]),
        (2, 2, 2): shd.make_mesh(dict(zip(shd.MESH_AXES, (2, 2, 2)))),
    }
    # one initialisation per mesh; each optimizer's trainer gets a copy (the step donates its parameters)
    initial = {
        shape: nnx.split(models.from_config(wide, seed=0, param_dtype=jax.numpy.bfloat16, mesh=mesh))
        for shape, mesh in meshes.items()
    }
    results = {}
    for name in OPTIMIZERS:
        cfg = SimpleNamespace(
            learning_rate=1e-2, lr_scheduler="constant", warmup_steps=None, warmup_ratio=None, cosine_min_lr_ratio=None,
            optimizer=name, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        )
        entry, params_by_mesh = {}, {}
        for shape, mesh in meshes.items():
            graphdef, state = initial[shape]
            model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
            tx, _ = make_optimizer(cfg, 10)
            trainer = Trainer(model, objective, tx, mesh=mesh)
            if shape is None:
                start = {p: np.asarray(x, np.float32) for p, x in _leaves(trainer.params)}
            stats = trainer.train_step([batch])
            params_by_mesh[str(shape)] = {p: np.asarray(x, np.float32) for p, x in _leaves(trainer.params)}
            entry[str(shape)] = {"loss": stats["loss"], "grad_norm": stats["grad_norm"], "finite": stats["finite"]}
            if shape is not None:
                entry["mismatches"] = sharding_mismatches(trainer.params, shape) + sharding_mismatches(
                    trainer.opt_state, shape, expected_optimizer_spec
                )
                entry["state_dtypes"] = sorted({str(x.dtype) for x in jax.tree.leaves(trainer.opt_state)})
                entry["param_dtypes"] = sorted({str(x.dtype) for x in jax.tree.leaves(trainer.params)})
                entry["factored"] = sorted(p for p, x in _leaves(trainer.opt_state) if ".v_row." in p and x.size > 1)
        one, eight = params_by_mesh["None"], params_by_mesh["(2, 2, 2)"]
        # the same update on both meshes: equal but for a rare flip at a bfloat16 rounding boundary
        entry["differing_fraction"] = float(
            sum(np.sum(one[p] != eight[p]) for p in one) / sum(one[p].size for p in one)
        )
        # how far the two results are apart, relative to how far the step moved the weights
        entry["discrepancy"] = float(
            sum(np.abs(one[p] - eight[p]).sum() for p in one) / sum(np.abs(one[p] - start[p]).sum() for p in one)
        )
        moved = sum(np.sum(one[p] != start[p]) for p in one)
        entry["moved_fraction"] = float(moved / sum(v.size for v in one.values()))
        results[name] = entry
    return results


if __name__ == "__main__":
    assert jax.device_count() == 8, "set XLA_FLAGS=--xla_force_host_platform_device_count=8"
    out = run_optimizers() if sys.argv[1] == "optimizers" else run(sys.argv[1])
    with open(sys.argv[2], "w") as f:
        json.dump(out, f, indent=1)
