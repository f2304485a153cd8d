"""The jitted step: exact gradient accumulation, N normalisation, the NaN guard, eval averaging."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxpref.objectives.base import Objective
from jaxpref.sharding import make_mesh
from jaxpref.trainer import LoopHooks, LoopSettings, NonFiniteError, Trainer, fit, stack_micro_batches


class TinyLM(nnx.Module):
    """Embedding + one dense layer; enough to exercise the trainer without the real decoder."""

    def __init__(self, vocab=11, dim=8, *, rngs, param_dtype=jnp.float32):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs, param_dtype=param_dtype)
        self.dense = nnx.Linear(dim, vocab, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, ids):
        return self.dense(jnp.tanh(self.embed(ids)))


def ce_objective():
    def count(batch):
        return jnp.sum(batch["loss_mask"].astype(jnp.float32))

    def loss(model, batch, num_items, *, train):
        logits = model(batch["input_ids"]).astype(jnp.float32)
        lp = jax.nn.log_softmax(logits)
        tok = jnp.take_along_axis(lp, batch["labels"][..., None], -1)[..., 0]
        total = -jnp.sum(jnp.where(batch["loss_mask"], tok, 0.0))
        return total / num_items, {"nll": total / num_items}

    return Objective(name="test_ce", count=count, loss=loss)


def make_batches(n, T=6, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lengths = rng.integers(1, T + 1)
        ids = rng.integers(0, 11, size=(1, T)).astype(np.int32)
        seg = (np.arange(T) < lengths).astype(np.int32)[None]
        out.append({
            "input_ids": ids,
            "labels": np.roll(ids, -1, axis=1),
            "loss_mask": (seg.astype(bool) & (rng.random((1, T)) < 0.7)),
            "positions": np.arange(T, dtype=np.int32)[None],
            "segment_ids": seg,
        })
    return out


def concat(batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def fresh_trainer(tx=None):
    model = TinyLM(rngs=nnx.Rngs(0))
    return Trainer(model, ce_objective(), tx or optax.sgd(0.5), mesh=make_mesh(None))


def test_grad_accumulation_equals_one_big_batch():
    micro = make_batches(8)
    a, b = fresh_trainer(), fresh_trainer()
    sa = a.train_step(micro)
    sb = b.train_step([concat(micro)])
    assert sa["loss"] == pytest.approx(sb["loss"], rel=1e-6)
    assert sa["num_items"] == sb["num_items"] == sum(m["loss_mask"].sum() for m in micro)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_loss_is_token_mean_over_the_whole_step():
    micro = make_batches(3, seed=1)
    t = fresh_trainer()
    model = fresh_trainer().model()  # same initial weights (t's buffers are donated by the step)
    stats = t.train_step(micro)
    big = concat(micro)
    logits = np.asarray(model(jnp.asarray(big["input_ids"])), np.float64)
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tok = np.take_along_axis(lp, big["labels"][..., None], -1)[..., 0]
    expected = -(tok * big["loss_mask"]).sum() / big["loss_mask"].sum()
    assert stats["loss"] == pytest.approx(expected, rel=1e-5)
    assert stats["nll"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("param_dtype", "accum"),
    [(jnp.float32, 1), (jnp.bfloat16, 1), (jnp.bfloat16, 2)],
    ids=["f32", "bf16", "bf16-accum"],
)
def test_nonfinite_step_is_not_applied_and_stops_or_skips(param_dtype, accum):
    """The guard keeps parameters and optimizer state (float32 moments of bfloat16 parameters too)."""
    obj = ce_objective()
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.1, weight_decay=0.01))

    def nan_loss(model, batch, num_items, *, train):
        loss, m = obj.loss(model, batch, num_items, train=train)
        return loss * jnp.nan, m

    def trainer(objective):
        model = TinyLM(rngs=nnx.Rngs(0), param_dtype=param_dtype)
        return Trainer(model, objective, tx, mesh=make_mesh(None))

    good = trainer(obj)
    before = jax.tree.map(np.asarray, (good.params, good.opt_state))
    good.train_step(make_batches(accum))  # a finite step moves the same state
    pairs = zip(jax.tree.leaves(before[0]), jax.tree.leaves(good.params))
    assert any(not np.array_equal(x, np.asarray(y)) for x, y in pairs)

    t2 = trainer(Objective("nan", obj.count, nan_loss))
    stats = t2.train_step(make_batches(accum))
    assert stats["finite"] == 0.0
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves((t2.params, t2.opt_state))):
        assert np.asarray(y).dtype == x.dtype
        np.testing.assert_array_equal(x, np.asarray(y))

    t3 = trainer(Objective("nan", obj.count, nan_loss))
    with pytest.raises(NonFiniteError, match="step 1"):
        fit(t3, iter(make_batches(4)), LoopSettings(total_steps=2), LoopHooks())
    t4 = trainer(Objective("nan", obj.count, nan_loss))
    fit(t4, iter(make_batches(4)), LoopSettings(total_steps=2, skip_nonfinite=True), LoopHooks())
    assert t4.step == 2


def test_evaluate_is_count_weighted_mean():
    t = fresh_trainer()
    batches = make_batches(5, seed=3)
    got = t.evaluate(batches)
    big = concat(batches)
    logits = np.asarray(t.model()(jnp.asarray(big["input_ids"])), np.float64)
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tok = np.take_along_axis(lp, big["labels"][..., None], -1)[..., 0]
    expected = -(tok * big["loss_mask"]).sum() / big["loss_mask"].sum()
    assert got["loss"] == pytest.approx(expected, rel=1e-5)


def test_stack_pads_time_with_masked_zeros():
    a, b = make_batches(1, T=4)[0], make_batches(1, T=7)[0]
    out = stack_micro_batches([a, b])
    assert out["input_ids"].shape == (2, 1, 7)
    assert not out["loss_mask"][0, :, 4:].any() and (out["segment_ids"][0, :, 4:] == 0).all()


def test_fit_logs_and_saves_on_cadence():
    t = fresh_trainer()
    logged, saved = [], []
    hooks = LoopHooks(
        eval_batches=lambda: make_batches(2, seed=9),
        save=saved.append,
        log=lambda step, split, m: logged.append((step, split)),
        learning_rate=lambda s: 0.5,
    )
    fit(t, iter(make_batches(12)), LoopSettings(total_steps=6, grad_accum=2, logging_steps=2, eval_every=3,
                                                   save_every=4), hooks)
    assert [s for s, sp in logged if sp == "train"] == [2, 4, 6]
    assert [s for s, sp in logged if sp == "eval"] == [3, 6]
    assert saved == [4]
