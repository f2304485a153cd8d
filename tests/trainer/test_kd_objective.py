"""The KD objective in the trainer: value vs a float64 brute-force formula, exact accumulation
(1 x 8 == 8 x 1), LoRA KD trains only adapters, and online-teacher targets vs brute force."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxpref import lora, models
from jaxpref.objectives import build_objective
from jaxpref.objectives.kd import online_teacher_targets
from jaxpref.sharding import make_mesh
from jaxpref.trainer import Trainer

V, K, T = 64, 4, 12
TINY = dict(
    model_type="llama",
    vocab_size=V,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def kd_cfg(**kw):
    base = dict(
        kd_alpha=1.0, kd_ce_alpha=0.0, kd_temperature=1.0, kd_beta=0.0, kd_normalize_topk=False,
        kd_zscore_base_temp=None, kd_teacher_model=None, kd_teacher_top_k=K, kd_temperature_min=None,
        fused_kernel=None,
    )
    return SimpleNamespace(**{**base, **kw})


def tiny_model(seed=0):
    return models.from_config(models.ModelConfig.from_hf_dict(TINY), seed=seed)


def kd_rows(n, seed=0):
    """``n`` single-row KD micro-batches with distinct top-k ids, sorted log-probs, ragged masks."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        length = int(rng.integers(4, T + 1))
        seg = (np.arange(T) < length).astype(np.int32)[None]
        ids = rng.integers(0, V, size=(1, T)).astype(np.int32)
        loss_mask = seg.astype(bool) & (rng.random((1, T)) < 0.8)
        tids = np.stack([rng.permutation(V)[:K] for _ in range(T)])[None].astype(np.int32)
        lp = np.sort(rng.normal(size=(1, T, K)), axis=-1)[..., ::-1]
        lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
        keep = rng.random((1, T, K)) < 0.9
        keep[..., 0] = True
        tmask = keep & loss_mask[..., None]
        lp = np.where(tmask, lp, 0.0)
        tids = np.where(tmask, tids, 0)
        lp = np.where(tmask, lp - np.log(np.sum(np.where(tmask, np.exp(lp), 0), -1, keepdims=True) + 1e-30), 0.0)
        rows.append({
            "input_ids": ids,
            "labels": np.roll(ids, -1, axis=1),
            "loss_mask": loss_mask,
            "positions": np.arange(T, dtype=np.int32)[None],
            "segment_ids": seg,
            "target_token_ids": tids,
            "target_logprobs": lp.astype(np.float32),
            "target_mask": tmask,
        })
    return rows


def concat(rows):
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def log_softmax64(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def brute_force_kd(model, batch, *, temperature, kd_alpha, kd_ce_alpha):
    """Forward KL over the teacher's kept entries + CE, float64, from full logits."""
    hidden = model(jnp.asarray(batch["input_ids"]), positions=jnp.asarray(batch["positions"]),
                   segment_ids=jnp.asarray(batch["segment_ids"]))
    z = np.asarray(model.logits(hidden), np.float64)
    log_q, log_q1 = log_softmax64(z / temperature), log_softmax64(z)
    tm = batch["target_mask"]
    a = batch["target_logprobs"].astype(np.float64)
    lq = np.take_along_axis(log_q, batch["target_token_ids"], -1)
    kd = np.sum(np.where(tm, np.exp(a) * (a - lq), 0.0)) * temperature**2
    ce = -np.sum(np.where(batch["loss_mask"], np.take_along_axis(log_q1, batch["labels"][..., None], -1)[..., 0], 0))
    n = batch["loss_mask"].sum()
    return (kd_alpha * kd + kd_ce_alpha * ce) / n


def sgd_trainer(model, objective, trainable=nnx.Param):
    return Trainer(model, objective, optax.sgd(0.5), mesh=make_mesh(None), trainable=trainable)


@pytest.mark.parametrize("temperature,ce_alpha", [(1.0, 0.0), (2.0, 0.5)])
def test_kd_objective_matches_float64_brute_force(temperature, ce_alpha):
    cfg = kd_cfg(kd_temperature=temperature, kd_ce_alpha=ce_alpha)
    objective = build_objective(cfg, "kd")
    model = tiny_model()
    batch = concat(kd_rows(3, seed=1))
    num_items = jnp.float32(batch["loss_mask"].sum())
    loss, metrics = objective.loss(model, {k: jnp.asarray(v) for k, v in batch.items()}, num_items, train=False)
    expected = brute_force_kd(model, batch, temperature=temperature, kd_alpha=1.0, kd_ce_alpha=ce_alpha)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
    assert float(metrics["kd_loss"]) > 0


def test_accumulation_1x8_equals_8x1():
    """8 micro-batches of 1 row and 1 micro-batch of 8 rows: same loss, gradient norm and update.

    SGD (not Adam) so that a wrong normaliser would change the update, not just its sign.
    """
    objective = build_objective(kd_cfg(kd_ce_alpha=0.3, kd_temperature=1.5), "kd")
    rows = kd_rows(8, seed=2)
    one_by_eight = sgd_trainer(tiny_model(), objective)
    eight_by_one = sgd_trainer(tiny_model(), objective)
    stats_a = one_by_eight.train_step(rows)
    stats_b = eight_by_one.train_step([concat(rows)])
    for key in ("loss", "grad_norm", "kd_loss", "ce_loss", "num_items"):
        np.testing.assert_allclose(stats_a[key], stats_b[key], rtol=2e-5, err_msg=key)
    expected = brute_force_kd(tiny_model(), concat(rows), temperature=1.5, kd_alpha=1.0, kd_ce_alpha=0.3)
    np.testing.assert_allclose(stats_a["loss"], expected, rtol=2e-5)
    leaves_a = jax.tree.leaves(one_by_eight.params)
    leaves_b = jax.tree.leaves(eight_by_one.params)
    before = jax.tree.leaves(nnx.state(tiny_model(), nnx.Param))
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(leaves_a, before)) > 1e-4  # it moved
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


def test_lora_kd_trains_only_adapters():
    model = tiny_model()
    lora.apply_lora(model, lora.LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj")),
                    rngs=nnx.Rngs(1))
    trainer = Trainer(model, build_objective(kd_cfg(), "kd"), optax.adam(1e-2), mesh=make_mesh(None),
                      trainable=lora.trainable_filter(model))
    frozen_before = jax.tree.map(np.asarray, trainer.frozen)
    params_before = jax.tree.map(np.asarray, trainer.params)
    names = {"/".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(trainer.params)[0]}
    assert names and all("lora" in n for n in names), names
    for _ in range(2):
        stats = trainer.train_step([concat(kd_rows(2, seed=3))])
        assert np.isfinite(stats["loss"])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, trainer.frozen), frozen_before)
    moved = [not np.array_equal(np.asarray(a), b) for a, b in
             zip(jax.tree.leaves(trainer.params), jax.tree.leaves(params_before))]
    assert all(moved)


def test_online_teacher_targets_are_the_renormalised_topk_of_the_teacher():
    teacher = tiny_model(seed=7)
    batch = {k: jnp.asarray(v) for k, v in concat(kd_rows(2, seed=4)).items()}
    ids, logprobs, mask = online_teacher_targets(teacher, batch, K, 2.0)
    hidden = teacher(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    z = np.asarray(teacher.logits(hidden), np.float64) / 2.0
    order = np.argsort(-z, axis=-1)[..., :K]
    np.testing.assert_array_equal(np.asarray(ids), order)
    expected = log_softmax64(np.take_along_axis(z, order, -1))
    np.testing.assert_allclose(np.asarray(logprobs), expected, atol=1e-5)
    loss_mask = np.asarray(batch["loss_mask"])[..., None]
    np.testing.assert_array_equal(np.asarray(mask), np.broadcast_to(loss_mask, ids.shape))


def test_online_teacher_runs_in_the_step_and_gets_no_gradient():
    cfg = kd_cfg(kd_teacher_model="unused-path", kd_ce_alpha=0.5)
    objective = build_objective(cfg, "kd")
    assert objective.companions == ("teacher",)
    lm_rows = [{k: v for k, v in r.items() if not k.startswith("target_")} for r in kd_rows(2, seed=5)]
    teacher = tiny_model(seed=9)
    teacher_before = jax.tree.map(np.asarray, nnx.state(teacher, nnx.Param))
    trainer = Trainer(tiny_model(), objective, optax.sgd(0.1), mesh=make_mesh(None), companions={"teacher": teacher})
    stats = trainer.train_step(lm_rows)
    assert np.isfinite(stats["loss"]) and stats["kd_loss"] > 0
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, trainer.companions["teacher"]), teacher_before)
    with pytest.raises(ValueError, match="teacher"):
        Trainer(tiny_model(), objective, optax.sgd(0.1), mesh=make_mesh(None))
