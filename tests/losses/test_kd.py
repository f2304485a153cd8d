"""Top-k KD loss: brute-force float64 reference, gradients, and the properties SPEC.md asks for."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.losses import (
    cross_entropy_loss,
    kd_loss,
    kd_loss_from_gathered,
    kd_topk_loss,
    kd_topk_loss_from_gathered,
)
from tests.losses import losses_reference as ref

B, T, V, K = 2, 3, 13, 4


def make_inputs(seed=0, *, garbage=-np.inf):
    """Random student logits, distinct teacher ids, renormalised teacher log-probs and a mask.

    Masked entries hold ``garbage`` log-probs; position (0, 1) is fully masked.
    """
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, T, V)) * 2.0
    ids = np.stack([rng.permutation(V)[:K] for _ in range(B * T)]).reshape(B, T, K)
    raw = rng.normal(size=(B, T, K)) * 1.5
    mask = rng.random((B, T, K)) > 0.25
    mask[..., 0] = True
    mask[0, 1] = False
    lp = np.where(mask, raw, -np.inf)
    lp = lp - ref.lse(lp)[..., None]
    lp = np.where(mask, lp, garbage)
    return logits.astype(np.float32), ids.astype(np.int32), lp.astype(np.float32), mask


CASES = [
    dict(beta=0.0),
    dict(beta=0.0, temperature=2.0),
    dict(beta=1.0, temperature=1.5),
    dict(beta=0.5),
    dict(beta=0.3, temperature=2.0, normalize_topk=True),
    dict(beta=0.0, normalize_topk=True),
    dict(beta=1.0, normalize_topk=True),
    dict(beta=0.0, temperature=2.0, zscore_base_temp=2.0),
    dict(beta=0.5, zscore_base_temp=1.0),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_kd_topk_matches_bruteforce_value_metrics_and_gradients(kw):
    logits, ids, lp, mask = make_inputs()
    loss, metrics = kd_topk_loss(logits, ids, lp, mask, **kw)
    want, want_metrics = ref.kd_topk(logits, ids, lp, mask, **kw)
    np.testing.assert_allclose(loss, want, rtol=2e-5, atol=1e-6)
    for name, value in want_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=2e-5, atol=1e-6, err_msg=name)
        assert metrics[name].dtype == jnp.float32 and metrics[name].shape == ()

    g_logits, g_lp = jax.grad(lambda z, a: kd_topk_loss(z, ids, a, mask, **kw)[0], argnums=(0, 1))(logits, lp)
    fd_logits = ref.finite_diff_grad(lambda z: ref.kd_topk(z, ids, lp, mask, **kw)[0], logits)
    np.testing.assert_allclose(g_logits, fd_logits, rtol=1e-4, atol=2e-6)
    lp_valid = np.where(mask, lp, 0.0)  # finite differences only make sense on the valid entries
    fd_lp = ref.finite_diff_grad(
        lambda a: ref.kd_topk(logits, ids, np.where(mask, a, -np.inf), mask, **kw)[0], lp_valid
    )
    np.testing.assert_allclose(np.where(mask, g_lp, 0.0), fd_lp, rtol=1e-4, atol=2e-6)
    assert np.all(np.asarray(g_lp)[~mask] == 0.0)


@pytest.mark.parametrize("kw", CASES[:5], ids=str)
def test_gathered_equals_full_logits(kw):
    logits, ids, lp, mask = make_inputs(1)
    t = kw.get("temperature", 1.0)
    gathered = np.take_along_axis(logits, ids, -1)
    lse = jax.nn.logsumexp(jnp.asarray(logits) / t, axis=-1)
    a = kd_topk_loss(logits, ids, lp, mask, **kw)
    b = kd_topk_loss_from_gathered(gathered, lse, lp, mask, **kw)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    for k in a[1]:
        np.testing.assert_allclose(a[1][k], b[1][k], rtol=1e-6)


def test_forward_kl_zero_iff_student_equals_renormalised_teacher():
    _, ids, lp, mask = make_inputs(2)
    t = 2.0
    teacher = np.where(mask, lp, -30.0)  # the student's logits at invalid ids only need to be low
    # normalize_topk: student logits at the ids = T * teacher log-probs + any per-row constant.
    z = np.random.default_rng(3).normal(size=(B, T, V)).astype(np.float32)
    np.put_along_axis(z, ids, t * teacher + 5.0, -1)
    loss, _ = kd_topk_loss(z, ids, lp, mask, temperature=t, normalize_topk=True)
    assert abs(float(loss)) < 1e-5
    # Full vocabulary: the student must also put (almost) nothing outside the teacher's ids.
    z_full = np.full((B, T, V), -1e9, np.float32)
    np.put_along_axis(z_full, ids, t * teacher, -1)
    loss_full, metrics = kd_topk_loss(z_full, ids, lp, mask, temperature=t)
    assert abs(float(loss_full)) < 1e-5
    np.testing.assert_allclose(metrics["student_topk_mass"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(metrics["top1_agreement"], 1.0)
    # Any perturbation makes it strictly positive.
    for zz, kw in ((z, dict(normalize_topk=True)), (z_full, {})):
        bumped = zz.copy()
        bumped[1, 2, ids[1, 2, 0]] += 0.5
        assert float(kd_topk_loss(bumped, ids, lp, mask, temperature=t, **kw)[0]) > 1e-4


def test_temperature_squared_scaling_and_gradient():
    logits, ids, lp, mask = make_inputs(4)
    t = 3.0
    base, _ = kd_topk_loss(logits / t, ids, lp, mask, temperature=1.0)
    scaled, _ = kd_topk_loss(logits, ids, lp, mask, temperature=t)
    np.testing.assert_allclose(scaled, t * t * base, rtol=1e-5)
    # jaxpref's gradient is the gradient of the logged (T^2-scaled) value, nothing hidden.
    g = jax.grad(lambda z: kd_topk_loss(z, ids, lp, mask, temperature=t)[0])(logits)
    g_base = jax.grad(lambda z: kd_topk_loss(z / t, ids, lp, mask, temperature=1.0)[0])(logits)
    np.testing.assert_allclose(g, t * t * g_base, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "kw", [CASES[i] for i in (0, 2, 3, 4, 7)], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items())
)
@pytest.mark.parametrize("garbage", [-np.inf, -1e9, np.nan])
def test_masked_entries_change_nothing_and_never_nan(kw, garbage):
    logits, ids, lp, mask = make_inputs(5, garbage=garbage)
    loss, metrics = kd_topk_loss(logits, ids, lp, mask, **kw)
    clean_lp = np.where(mask, lp, -np.inf)
    clean_loss, clean_metrics = kd_topk_loss(logits, ids, clean_lp, mask, **kw)
    np.testing.assert_allclose(loss, clean_loss, rtol=1e-6)
    for k in metrics:
        np.testing.assert_allclose(metrics[k], clean_metrics[k], rtol=1e-6, err_msg=k)
    grads = jax.grad(lambda z, a: kd_topk_loss(z, ids, a, mask, **kw)[0], argnums=(0, 1))(logits, lp)
    for g in grads:
        assert np.all(np.isfinite(g))
    # Dropping the masked slots entirely (a smaller K) gives the same value.
    keep = mask[1, 2]
    sub = (logits[1:, 2:], ids[1:, 2:][..., keep], lp[1:, 2:][..., keep], mask[1:, 2:][..., keep])
    np.testing.assert_allclose(
        kd_topk_loss(*sub, **kw)[0],
        kd_topk_loss(logits[1:, 2:], ids[1:, 2:], lp[1:, 2:], mask[1:, 2:], **kw)[0],
        rtol=1e-6,
    )


def test_all_masked_is_zero_not_nan():
    logits, ids, lp, _ = make_inputs(6, garbage=np.nan)
    mask = np.zeros((B, T, K), bool)
    loss, metrics = kd_topk_loss(logits, ids, lp, mask, beta=0.5, zscore_base_temp=1.0)
    assert float(loss) == 0.0 and all(float(v) == 0.0 for v in metrics.values())
    g = jax.grad(lambda z: kd_topk_loss(z, ids, lp, mask, beta=0.5)[0])(logits)
    assert np.all(g == 0.0)


def test_position_mask_broadcasts_over_k_and_num_items():
    logits, ids, lp, _ = make_inputs(7)
    lp = np.where(np.isfinite(lp), lp, 0.0)  # every entry valid, renormalised over K below
    pos_mask = np.array([[True, False, True], [True, True, False]])
    a = kd_topk_loss(logits, ids, lp, pos_mask, temperature=2.0)
    b = kd_topk_loss(logits, ids, lp, np.broadcast_to(pos_mask[..., None], lp.shape), temperature=2.0)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    want, _ = ref.kd_topk(logits, ids, lp, pos_mask, temperature=2.0, num_items=10)
    np.testing.assert_allclose(
        kd_topk_loss(logits, ids, lp, pos_mask, temperature=2.0, num_items=10)[0], want, rtol=1e-5
    )


@pytest.mark.parametrize("beta", [0.5, 0.2])
def test_jsd_swap_symmetry(beta):
    """JSD_beta(teacher=p, student=q) == JSD_{1-beta}(teacher=q, student=p); symmetric at beta = 0.5."""
    rng = np.random.default_rng(8)
    s = rng.normal(size=(4, K)).astype(np.float32)
    t = rng.normal(size=(4, K)).astype(np.float32)
    ids = np.broadcast_to(np.arange(K), (4, K))
    mask = np.ones((4, K), bool)
    lp_t = np.asarray(jax.nn.log_softmax(t))
    lp_s = np.asarray(jax.nn.log_softmax(s))
    # Student over exactly the K ids (V = K), so both sides are full distributions.
    fwd = kd_topk_loss(s, ids, lp_t, mask, beta=beta)[0]
    swapped = kd_topk_loss(t, ids, lp_s, mask, beta=1.0 - beta)[0]
    np.testing.assert_allclose(fwd, swapped, rtol=1e-5)
    # And the endpoints are the two KLs: forward(p, q) == reverse with roles swapped.
    np.testing.assert_allclose(
        kd_topk_loss(s, ids, lp_t, mask, beta=0.0)[0],
        kd_topk_loss(t, ids, lp_s, mask, beta=1.0)[0],
        rtol=1e-5,
    )


def test_jsd_limits():
    """The generalized JSD vanishes at both ends (~ beta KL(p||q) and ~ (1 - beta) KL(q||p)); the KLs
    at beta = 0 and 1 are TRL's special-cased endpoints, not limits."""
    logits, ids, lp, mask = make_inputs(9)
    vals = [float(kd_topk_loss(logits, ids, lp, mask, beta=b, normalize_topk=True)[0]) for b in (1e-4, 0.5, 0.9999)]
    assert 0 <= vals[0] < 1e-3 and vals[1] > 0 and 0 <= vals[2] < 1e-3


@pytest.mark.parametrize("ce_alpha", [0.0, 0.7])
def test_kd_loss_combines_kd_and_ce_over_the_same_tokens(ce_alpha):
    logits, ids, lp, mask = make_inputs(10)
    labels = ids[..., 0]
    loss_mask = np.array([[True, True, False], [True, True, True]])
    total, metrics = kd_loss(
        logits,
        ids,
        lp,
        mask,
        labels,
        kd_alpha=0.5,
        kd_ce_alpha=ce_alpha,
        loss_mask=loss_mask,
        temperature=2.0,
    )
    n = loss_mask.sum()
    kd_want, _ = ref.kd_topk(logits, ids, lp, mask & loss_mask[..., None], temperature=2.0, num_items=n)
    ce_want = ref.cross_entropy(logits, labels, loss_mask)
    np.testing.assert_allclose(metrics["kd_loss"], kd_want, rtol=1e-5)
    np.testing.assert_allclose(metrics["ce_loss"], ce_want, rtol=1e-5)
    np.testing.assert_allclose(total, 0.5 * kd_want + ce_alpha * ce_want, rtol=1e-5)
    ce_direct, _ = cross_entropy_loss(logits, labels, mask=loss_mask)
    np.testing.assert_allclose(metrics["ce_loss"], ce_direct, rtol=1e-6)
    # The gathered form gives the same numbers.
    z = jnp.asarray(logits)
    g = kd_loss_from_gathered(
        np.take_along_axis(logits, ids, -1),
        jax.nn.logsumexp(z / 2.0, -1),
        lp,
        mask,
        np.take_along_axis(logits, labels[..., None], -1)[..., 0],
        jax.nn.logsumexp(z, -1),
        kd_alpha=0.5,
        kd_ce_alpha=ce_alpha,
        loss_mask=loss_mask,
        temperature=2.0,
    )
    np.testing.assert_allclose(g[0], total, rtol=1e-6)


def test_kd_loss_default_trainable_positions_and_num_items():
    logits, ids, lp, mask = make_inputs(11)
    labels = ids[..., 1]
    n_pos = np.any(mask & np.isfinite(lp), -1).sum()
    _, m = kd_loss(logits, ids, lp, mask, labels, kd_ce_alpha=1.0)
    ce = ref.cross_entropy(logits, labels, np.any(mask, -1))
    np.testing.assert_allclose(m["ce_loss"], ce, rtol=1e-5)
    _, m2 = kd_loss(logits, ids, lp, mask, labels, kd_ce_alpha=1.0, num_items=3 * n_pos)
    np.testing.assert_allclose(m2["ce_loss"], ce / 3, rtol=1e-5)
    np.testing.assert_allclose(m2["kd_loss"], m["kd_loss"] / 3, rtol=1e-5)


def test_bfloat16_inputs_give_float32_results_equal_to_float32_inputs():
    logits, ids, lp, mask = make_inputs(12)
    lb, pb = jnp.asarray(logits, jnp.bfloat16), jnp.asarray(lp, jnp.bfloat16)
    kw = dict(temperature=2.0, beta=0.5)
    got, metrics = kd_topk_loss(lb, ids, pb, mask, **kw)
    want, _ = kd_topk_loss(lb.astype(jnp.float32), ids, pb.astype(jnp.float32), mask, **kw)
    assert got.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in metrics.values())
    np.testing.assert_array_equal(got, want)
    g = jax.grad(lambda z: kd_loss(z, ids, pb, mask, ids[..., 0], kd_ce_alpha=1.0, **kw)[0])(lb)
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


def test_jit_grad_vmap():
    logits, ids, lp, mask = make_inputs(13)
    kw = dict(kd_ce_alpha=0.5, temperature=2.0, beta=0.3)
    value_and_grad = jax.jit(jax.value_and_grad(lambda z: kd_loss(z, ids, lp, mask, ids[..., 0], **kw)[0]))
    value, grad = value_and_grad(logits)
    np.testing.assert_allclose(value, kd_loss(logits, ids, lp, mask, ids[..., 0], **kw)[0], rtol=1e-6)
    assert np.all(np.isfinite(grad))
    per_example = jax.vmap(lambda z, i, a, m: kd_topk_loss(z, i, a, m, beta=0.5)[0])(logits, ids, lp, mask)
    for b in range(B):
        np.testing.assert_allclose(
            per_example[b], kd_topk_loss(logits[b], ids[b], lp[b], mask[b], beta=0.5)[0], rtol=1e-6
        )


def test_bad_beta_is_rejected():
    logits, ids, lp, mask = make_inputs()
    with pytest.raises(ValueError, match="beta"):
        kd_topk_loss(logits, ids, lp, mask, beta=1.5)
