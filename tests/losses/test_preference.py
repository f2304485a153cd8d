"""DPO family, ORPO, CPO/SimPO, KTO and reward losses against float64 NumPy formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.losses import (
    DPO_LOSS_TYPES,
    cpo_loss,
    dpo_loss,
    kto_loss,
    log1mexp,
    orpo_loss,
    reward_loss,
    simpo_loss,
)
from tests.losses import losses_reference as ref

N = 6


def pair_logps(seed=0, scale=8.0):
    rng = np.random.default_rng(seed)
    pc, pr, rc, rr = (-(np.abs(rng.normal(size=(4, N))) * scale + 1.0)).astype(np.float32)
    lengths_c = rng.integers(1, 20, N).astype(np.int32)
    lengths_r = rng.integers(1, 20, N).astype(np.int32)
    return pc, pr, rc, rr, lengths_c, lengths_r


def dpo_kwargs(loss_type):
    kw = dict(beta=0.1, loss_type=loss_type)
    if loss_type in ("robust", "aot", "aot_unpaired"):
        kw["label_smoothing"] = 0.1
    if loss_type == "exo_pair":
        kw["label_smoothing"] = 1e-3
    return kw


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_loss_types_value_and_gradient(loss_type):
    pc, pr, rc, rr, lc, lr = pair_logps()
    kw = dpo_kwargs(loss_type)
    lengths = dict(chosen_lengths=lc, rejected_lengths=lr)
    loss, metrics = dpo_loss(pc, pr, rc, rr, **kw, **lengths)
    want, want_metrics = ref.dpo(pc, pr, rc, rr, **kw, **lengths)
    np.testing.assert_allclose(loss, want, rtol=2e-5, atol=1e-6)
    for name, value in want_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)

    grads = jax.grad(lambda *x: dpo_loss(*x, **kw, **lengths)[0], argnums=(0, 1, 2, 3))(pc, pr, rc, rr)
    args = [pc, pr, rc, rr]
    for i, g in enumerate(grads):

        def f(x, i=i):
            a = list(args)
            a[i] = x
            return ref.dpo(*a, **kw, **lengths)[0]

        fd = ref.finite_diff_grad(f, args[i], eps=1e-4)
        np.testing.assert_allclose(g, fd, rtol=2e-3, atol=2e-6, err_msg=f"d/d arg{i}")


@pytest.mark.parametrize("f_div", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust", "discopop", "sigmoid_norm"])
def test_dpo_f_divergences(f_div, loss_type):
    pc, pr, rc, rr, lc, lr = pair_logps(1, scale=0.5)  # small log-ratios keep exp(-z) tame
    kw = dpo_kwargs(loss_type) | dict(f_divergence_type=f_div, f_alpha_divergence_coef=0.3)
    lengths = dict(chosen_lengths=lc, rejected_lengths=lr)
    got, _ = dpo_loss(pc, pr, rc, rr, **kw, **lengths)
    want, _ = ref.dpo(pc, pr, rc, rr, **kw, **lengths)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_dpo_multiple_loss_types_weighted_sum():
    pc, pr, rc, rr, lc, lr = pair_logps(2)
    types, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    got, _ = dpo_loss(pc, pr, rc, rr, loss_type=types, loss_weights=weights, chosen_lengths=lc)
    want = sum(w * ref.dpo(pc, pr, rc, rr, loss_type=t, chosen_lengths=lc)[0] for t, w in zip(types, weights))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_dpo_policy_equals_reference_gives_log2():
    pc, pr, *_ = pair_logps(3)
    loss, metrics = dpo_loss(pc, pr, pc, pr, beta=0.3)
    np.testing.assert_allclose(loss, math.log(2.0), rtol=1e-6)
    assert float(metrics["rewards/margins"]) == 0.0 and float(metrics["rewards/accuracies"]) == 0.0


@pytest.mark.parametrize("loss_type", ["sigmoid", "aot", "sft", "ipo"])
def test_dpo_mask_and_num_items(loss_type):
    pc, pr, rc, rr, lc, lr = pair_logps(4)
    kw = dpo_kwargs(loss_type) | dict(chosen_lengths=lc, rejected_lengths=lr)
    valid = np.array([True, True, False, True, False, True])
    junk = np.where(valid, 0, np.nan).astype(np.float32)  # padding rows may hold anything
    got, metrics = dpo_loss(pc + junk, pr + junk, rc, rr, mask=valid, **kw)
    sub = dict(kw, chosen_lengths=lc[valid], rejected_lengths=lr[valid])
    want, want_metrics = ref.dpo(pc[valid], pr[valid], rc[valid], rr[valid], **sub)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/chosen"], want_metrics["rewards/chosen"], rtol=1e-5)
    g = jax.grad(lambda x: dpo_loss(x + junk, pr + junk, rc, rr, mask=valid, **kw)[0])(pc)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~valid] == 0)
    # num_items = global count: this call's loss is its share of the global mean.
    got_n, metrics_n = dpo_loss(pc, pr, rc, rr, mask=valid, num_items=8, **kw)
    np.testing.assert_allclose(got_n, want * valid.sum() / 8, rtol=1e-5)
    np.testing.assert_allclose(metrics_n["logps/chosen"], pc[valid].sum() / 8, rtol=1e-5)


def test_dpo_argument_errors():
    pc, pr, rc, rr, *_ = pair_logps()
    with pytest.raises(ValueError, match="Unknown DPO loss_type"):
        dpo_loss(pc, pr, rc, rr, loss_type="nope")
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(pc, pr, rc, rr, loss_type="ipo")
    with pytest.raises(ValueError, match="label_smoothing > 0"):
        dpo_loss(pc, pr, rc, rr, loss_type="exo_pair")
    with pytest.raises(ValueError, match="only supported"):
        dpo_loss(pc, pr, rc, rr, loss_type="bco_pair", f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="loss_weights"):
        dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
    with pytest.warns(UserWarning, match="robust"):
        dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=0.6)


def test_discopop_is_finite_where_the_naive_product_overflows():
    pc = np.array([-100.0, -1.0], np.float32)
    pr = np.array([-1.0, -100.0], np.float32)
    zero = np.zeros(2, np.float32)
    loss, _ = dpo_loss(pc, pr, zero, zero, beta=1.0, loss_type="discopop")
    g = jax.grad(lambda x: dpo_loss(x, pr, zero, zero, beta=1.0, loss_type="discopop")[0])(pc)
    assert np.isfinite(loss) and np.all(np.isfinite(g))


# ---------------------------------------------------------------------------------------- ORPO


def mean_logps(seed=5):
    rng = np.random.default_rng(seed)
    return (-(np.abs(rng.normal(size=(2, N))) * 1.5 + 0.01)).astype(np.float32)


def test_orpo_value_metrics_gradient():
    c, r = mean_logps()
    loss, metrics = orpo_loss(c, r, 2.5, beta=0.2)
    want, wm = ref.orpo(c, r, 2.5, 0.2)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["nll_loss"], 2.5)
    np.testing.assert_allclose(metrics["log_odds_ratio"], wm["log_odds_ratio"], rtol=1e-5)
    np.testing.assert_allclose(metrics["log_odds_chosen"], wm["log_odds_chosen"], rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/chosen"], 0.2 * c.mean(), rtol=1e-5)
    g = jax.grad(lambda a, b: orpo_loss(a, b, 2.5, beta=0.2)[0], argnums=(0, 1))(c, r)
    np.testing.assert_allclose(g[0], ref.finite_diff_grad(lambda a: ref.orpo(a, r, 2.5, 0.2)[0], c), rtol=1e-3)
    np.testing.assert_allclose(g[1], ref.finite_diff_grad(lambda b: ref.orpo(c, b, 2.5, 0.2)[0], r), rtol=1e-3)


def test_log1mexp_both_branches_and_exact_zero():
    x = np.array([-1e-5, -0.1, -0.69, -0.7, -5.0, -50.0], np.float32)
    np.testing.assert_allclose(log1mexp(x), np.log1p(-np.exp(x.astype(np.float64))), rtol=1e-5)
    assert np.all(np.asarray(log1mexp(x)) < 0)
    loss, _ = orpo_loss(np.zeros(2, np.float32), np.zeros(2, np.float32), 0.0)
    g = jax.grad(lambda a: orpo_loss(a, a, 0.0)[0])(np.zeros(2, np.float32))
    assert np.isfinite(loss) and np.all(np.isfinite(g))


# ------------------------------------------------------------------------------------ CPO/SimPO


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
@pytest.mark.parametrize("alpha", [0.0, 0.25])
def test_cpo_loss_types(loss_type, alpha):
    c, r = mean_logps(6)
    nll = np.float32(1.7)
    kw = dict(beta=0.5, loss_type=loss_type, label_smoothing=0.1, simpo_gamma=0.3, alpha=alpha)
    loss, metrics = cpo_loss(c, r, cpo_alpha=0.5, chosen_nll=nll, **kw)
    want = ref.cpo(c, r, nll=1.7, cpo_alpha=0.5, **kw)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["nll_loss"], 1.7, rtol=1e-6)
    g = jax.grad(lambda a: cpo_loss(a, r, cpo_alpha=0.5, chosen_nll=nll, **kw)[0])(c)
    fd = ref.finite_diff_grad(lambda a: ref.cpo(a, r, nll=1.7, cpo_alpha=0.5, **kw), c, eps=1e-5)
    np.testing.assert_allclose(g, fd, rtol=1e-3, atol=1e-7)


def test_simpo_is_cpo_simpo_and_requires_nll_only_with_cpo_alpha():
    c, r = mean_logps(7)
    got, m = simpo_loss(c, r, beta=2.0, gamma=0.5)
    want = ref.cpo(c, r, beta=2.0, loss_type="simpo", simpo_gamma=0.5)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(m["rewards/chosen"], 2.0 * c.mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="chosen_nll"):
        cpo_loss(c, r)
    with pytest.raises(ValueError, match="Unknown CPO"):
        cpo_loss(c, r, loss_type="kto_pair", cpo_alpha=0.0)


# ----------------------------------------------------------------------------------------- KTO


def kto_inputs(seed=8):
    rng = np.random.default_rng(seed)
    pl, rl, pkl, rkl = (-(np.abs(rng.normal(size=(4, N))) * 5 + 1)).astype(np.float32)
    desirable = np.array([True, False, True, True, False, False])
    return pl, rl, pkl, rkl, desirable


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_value_metrics_gradient(loss_type):
    pl, rl, pkl, rkl, des = kto_inputs()
    kw = dict(beta=0.3, desirable_weight=1.5, undesirable_weight=0.7, loss_type=loss_type)
    loss, metrics = kto_loss(pl, rl, pkl, rkl, des, **kw)
    want, kl = ref.kto(pl, rl, pkl, rkl, des, beta=0.3, dw=1.5, uw=0.7, loss_type=loss_type)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-5)
    z = pl - rl
    np.testing.assert_allclose(metrics["rewards/chosen"], 0.3 * z[des].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/rejected"], 0.3 * z[~des].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["logps/rejected"], pl[~des].mean(), rtol=1e-5)
    g = jax.grad(lambda a: kto_loss(a, rl, pkl, rkl, des, **kw)[0])(pl)
    fd = ref.finite_diff_grad(
        lambda a: ref.kto(a, rl, pkl, rkl, des, beta=0.3, dw=1.5, uw=0.7, loss_type=loss_type)[0], pl
    )
    np.testing.assert_allclose(g, fd, rtol=1e-3, atol=1e-7)
    # The KL estimate is detached: no gradient through the mismatched pairs.
    g_kl = jax.grad(lambda a: kto_loss(pl, rl, a, rkl, des, **kw)[0])(pkl)
    assert np.all(g_kl == 0)


def test_kto_kl_clamped_at_zero():
    pl, rl, pkl, rkl, des = kto_inputs(9)
    _, metrics = kto_loss(pl, rl, rkl - 1.0, rkl, des)  # mean KL term -1 -> clamped to 0
    assert float(metrics["kl"]) == 0.0


@pytest.mark.parametrize("which", ["all_desirable", "all_undesirable", "none_valid"])
def test_kto_missing_groups(which):
    pl, rl, pkl, rkl, _ = kto_inputs(10)
    des = np.full(N, which == "all_desirable")
    mask = None if which != "none_valid" else np.zeros(N, bool)
    loss, metrics = kto_loss(pl, rl, pkl, rkl, des, mask=mask)
    assert np.isfinite(loss) and all(np.isfinite(v) for v in metrics.values())
    if which == "none_valid":
        assert float(loss) == 0.0
    else:
        np.testing.assert_allclose(loss, ref.kto(pl, rl, pkl, rkl, des)[0], rtol=1e-5)
        assert float(metrics["rewards/margins"]) == 0.0
    g = jax.grad(lambda a: kto_loss(a, rl, pkl, rkl, des, mask=mask)[0])(pl)
    assert np.all(np.isfinite(g))


def test_kto_axis_name_averages_kl_and_metrics_across_devices():
    pl, rl, pkl, rkl, des = kto_inputs(11)
    shard = lambda x: x.reshape(2, N // 2)  # two simulated devices
    per_device = jax.vmap(lambda *a: kto_loss(*a, beta=0.2, axis_name="d"), axis_name="d")(
        *(shard(x) for x in (pl, rl, pkl, rkl, des))
    )
    whole_loss, whole = kto_loss(pl, rl, pkl, rkl, des, beta=0.2)
    np.testing.assert_allclose(per_device[1]["kl"], [whole["kl"]] * 2, rtol=1e-6)
    np.testing.assert_allclose(per_device[1]["rewards/chosen"], [whole["rewards/chosen"]] * 2, rtol=1e-6)
    # Equal-sized shards: the mean of per-device losses is the whole-batch loss.
    np.testing.assert_allclose(per_device[0].mean(), whole_loss, rtol=1e-6)


# -------------------------------------------------------------------------------------- reward


@pytest.mark.parametrize("margin,coef", [(None, None), (True, 0.01)])
def test_reward_loss(margin, coef):
    rng = np.random.default_rng(12)
    c, r = rng.normal(size=(2, N)).astype(np.float32)
    m = rng.random(N).astype(np.float32) if margin else None
    loss, metrics = reward_loss(c, r, margin=m, center_rewards_coefficient=coef)
    np.testing.assert_allclose(loss, ref.reward(c, r, m, coef), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(c > r))
    np.testing.assert_allclose(metrics["margin"], np.mean(c - r), rtol=1e-5)
    np.testing.assert_allclose(metrics["mean_reward"], np.mean(np.concatenate([c, r])), rtol=1e-5, atol=1e-7)
    g = jax.grad(lambda a: reward_loss(a, r, margin=m, center_rewards_coefficient=coef)[0])(c)
    np.testing.assert_allclose(g, ref.finite_diff_grad(lambda a: ref.reward(a, r, m, coef), c), rtol=1e-3, atol=1e-7)


# --------------------------------------------------------------------- dtype / transformations


# Each takes four [B] arrays straight through (no arithmetic before the loss sees them).
ALL_PREFERENCE = {
    "dpo": lambda a, b, c, d: dpo_loss(
        a, b, c, d, loss_type=["sigmoid", "ipo"], chosen_lengths=np.full(N, 3), rejected_lengths=np.full(N, 4)
    ),
    "orpo": lambda a, b, c, d: orpo_loss(a, b, 1.0),
    "cpo": lambda a, b, c, d: cpo_loss(a, b, chosen_nll=c),
    "simpo": lambda a, b, c, d: simpo_loss(a, b, beta=2.0, gamma=0.5),
    "kto": lambda a, b, c, d: kto_loss(a, b, c, d, np.arange(N) % 2 == 0),
    "reward": lambda a, b, c, d: reward_loss(a, b, margin=c),
}


@pytest.mark.parametrize("name", list(ALL_PREFERENCE))
def test_bfloat16_jit_grad_vmap(name):
    fn = ALL_PREFERENCE[name]
    x = [jnp.asarray(v) / 10 for v in pair_logps(13)[:4]]
    xb = [v.astype(jnp.bfloat16) for v in x]
    got, metrics = fn(*xb)
    want, _ = fn(*(v.astype(jnp.float32) for v in xb))
    assert got.dtype == jnp.float32 and all(v.dtype == jnp.float32 and v.shape == () for v in metrics.values())
    np.testing.assert_array_equal(got, want)
    jitted = jax.jit(lambda *a: fn(*a)[0])
    np.testing.assert_allclose(jitted(*x), fn(*x)[0], rtol=1e-6)
    g = jax.jit(jax.grad(lambda *a: fn(*a)[0], argnums=(0, 1)))(*x)
    assert all(np.all(np.isfinite(gi)) for gi in g)
    stacked = [jnp.stack([v, v[::-1]]) for v in x]
    batched = jax.vmap(lambda *a: fn(*a)[0])(*stacked)
    np.testing.assert_allclose(batched[0], fn(*x)[0], rtol=1e-5)
    np.testing.assert_allclose(batched[1], fn(*(v[::-1] for v in x))[0], rtol=1e-5)
