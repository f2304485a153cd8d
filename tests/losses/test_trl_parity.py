"""Parity with TRL 1.16 itself: its loss code is called directly (trainer methods on a stub ``self``).

TRL computes the per-token log-probs inside the model call (``fused_lm_head=True``); the stubs below
return chosen per-token log-probs instead of running a model, so every line of TRL's loss code, its
loss-type branches and its metrics run unchanged.
"""

import os
from collections import defaultdict
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from jaxpref.losses import (
    DPO_LOSS_TYPES,
    cpo_loss,
    dpo_loss,
    kd_topk_loss,
    kto_loss,
    log_sum_sq_probs,
    orpo_loss,
    reward_loss,
    wpo_weights,
)

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

RTOL = 2e-5


def _accelerator():
    return SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)


class _FakeModel:
    """Stands in for a causal LM called with ``fused_lm_head=True``: returns fixed per-token log-probs."""

    training = True

    def __init__(self, log_probs=None, logits=None, log_sum_sq_probs=None):
        self.log_probs, self.logits, self.log_sum_sq_probs = log_probs, logits, log_sum_sq_probs

    def __call__(self, input_ids=None, **kwargs):
        if self.logits is not None:  # reward model
            return SimpleNamespace(logits=self.logits)
        b, t = input_ids.shape
        zeros = torch.zeros(b, t - 1)
        return SimpleNamespace(
            log_probs=self.log_probs,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=zeros.bool(),
            log_sum_sq_probs=self.log_sum_sq_probs,
            aux_loss=None,
        )


def _trainer_stub(model, **attrs):
    return SimpleNamespace(
        model=model,
        accelerator=_accelerator(),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        **attrs,
    )


def _completion_batch(rng, rows, t=12):
    """input_ids, attention_mask, completion_mask (prompt then completion) and per-token log-probs."""
    prompt = rng.integers(2, 6, rows)
    completion = rng.integers(1, t - 6, rows)
    pos = np.arange(t)
    completion_mask = (pos >= prompt[:, None]) & (pos < (prompt + completion)[:, None])
    shift_mask = completion_mask[:, 1:]
    log_probs = np.where(shift_mask, -np.abs(rng.normal(size=(rows, t - 1))) * 1.5, 0.0).astype(np.float32)
    return dict(
        input_ids=torch.tensor(rng.integers(0, 50, (rows, t))),
        attention_mask=torch.ones(rows, t, dtype=torch.long),
        completion_mask=torch.tensor(completion_mask.astype(np.int64)),
    ), log_probs


# ----------------------------------------------------------------------------------------------- DPO


def _wpo_inputs(rng, log_probs, vocab=9):
    """Per-token ``log sum_v p_v^2`` of random next-token logits (NumPy, from the probabilities themselves)
    for TRL's fused-head output, and jaxpref's own value of it from the same logits, 0 where masked."""
    logits = rng.normal(size=(*log_probs.shape, vocab)) * 2.0
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    live = log_probs != 0.0
    numpy_value = np.where(live, np.log(np.sum(p**2, -1)), 0.0).astype(np.float32)
    return numpy_value, np.asarray(log_sum_sq_probs(logits.astype(np.float32), mask=live))


def _dpo_case(loss_types, weights=None, f_div="reverse_kl", label_smoothing=0.0, seed=0, pairs=5, use_weighting=False):
    from trl.trainer.dpo_trainer import DPOTrainer

    rng = np.random.default_rng(seed)
    batch, log_probs = _completion_batch(rng, 2 * pairs)
    ref_logps = (log_probs.sum(1) + rng.normal(size=2 * pairs) * 2.0).astype(np.float32)
    batch["ref_chosen_logps"] = torch.tensor(ref_logps[:pairs])
    batch["ref_rejected_logps"] = torch.tensor(ref_logps[pairs:])
    trl_sq, our_sq = _wpo_inputs(rng, log_probs) if use_weighting else (None, None)
    stub = _trainer_stub(
        _FakeModel(torch.tensor(log_probs), log_sum_sq_probs=None if trl_sq is None else torch.tensor(trl_sq)),
        beta=0.2,
        loss_types=loss_types,
        loss_weights=weights or [1.0] * len(loss_types),
        ld_alpha=None,
        f_divergence_type=f_div,
        f_alpha_divergence_coef=0.4,
        label_smoothing=label_smoothing,
        use_weighting=use_weighting,
        args=SimpleNamespace(discopop_tau=0.05),
    )
    trl_loss = DPOTrainer._compute_loss(stub, stub.model, batch, return_outputs=False)

    lengths = batch["completion_mask"].sum(1).numpy()
    seq = log_probs.sum(1)
    pair_weights = None
    if use_weighting:
        aligned = (log_probs - our_sq).sum(1)  # both are 0 outside the completion
        pair_weights = wpo_weights(aligned[:pairs], aligned[pairs:], lengths[:pairs], lengths[pairs:])
        assert np.ptp(np.asarray(pair_weights)) > 0.1 * np.max(pair_weights)  # weights that differ per pair
    loss, metrics = dpo_loss(
        seq[:pairs],
        seq[pairs:],
        ref_logps[:pairs],
        ref_logps[pairs:],
        beta=0.2,
        loss_type=loss_types,
        loss_weights=weights,
        label_smoothing=label_smoothing,
        chosen_lengths=lengths[:pairs],
        rejected_lengths=lengths[pairs:],
        f_divergence_type=f_div,
        f_alpha_divergence_coef=0.4,
        pair_weights=pair_weights,
    )
    np.testing.assert_allclose(loss, trl_loss.item(), rtol=RTOL, atol=1e-6)
    for name in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
    ):
        np.testing.assert_allclose(metrics[name], stub._metrics["train"][name][-1], rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_every_loss_type_matches_trl(loss_type):
    smoothing = {"robust": 0.1, "exo_pair": 1e-3, "aot": 0.1, "aot_unpaired": 0.1}.get(loss_type, 0.0)
    _dpo_case([loss_type], label_smoothing=smoothing)


@pytest.mark.parametrize("f_div", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_dpo_f_divergences_match_trl(f_div):
    _dpo_case(["sigmoid", "ipo", "robust"], weights=[1.0, 0.5, 0.25], f_div=f_div, label_smoothing=0.1, seed=1)


def test_dpo_mpo_combination_matches_trl():
    _dpo_case(["sigmoid", "bco_pair", "sft"], weights=[0.8, 0.2, 1.0], seed=2)


@pytest.mark.parametrize(
    "loss_types, weights", [(["sigmoid"], None), (["ipo"], None), (["sigmoid", "bco_pair"], [0.8, 0.2])]
)
def test_dpo_wpo_weighting_matches_trl(loss_types, weights):
    _dpo_case(loss_types, weights=weights, seed=3, use_weighting=True)


def test_trl_cannot_weight_the_sft_loss():
    """TRL 1.16 multiplies the expanded (one-element) sft loss in place by the WPO weights and fails, so
    WPO with ``sft`` has no reference behaviour: jaxpref's config refuses ``dpo_use_weighting`` with it.
    When this stops failing, TRL has defined the combination; follow it and drop the config check."""
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        _dpo_case(["sigmoid", "sft"], seed=3, use_weighting=True)


def test_dpo_wpo_weighting_refuses_sorted_losses():
    with pytest.raises(ValueError, match="'aot' / 'aot_unpaired'"):
        dpo_loss(np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(2), loss_type="aot", pair_weights=np.ones(2))


# ----------------------------------------------------------------------------------------------- KTO


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("labels", [[1, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
def test_kto_matches_trl(loss_type, labels):
    from trl import KTOTrainer

    rng = np.random.default_rng(3)
    rows = len(labels)
    batch, log_probs = _completion_batch(rng, rows)
    kl_logps = (rng.normal(size=rows) * 3 - 20).astype(np.float32)
    ref_logps = (log_probs.sum(1) + rng.normal(size=rows)).astype(np.float32)
    ref_kl = (kl_logps + rng.normal(size=rows) - 0.5).astype(np.float32)
    batch.update(
        label=torch.tensor(labels, dtype=torch.bool),
        ref_logps=torch.tensor(ref_logps),
        ref_KL_logps=torch.tensor(ref_kl),
    )
    stub = _trainer_stub(
        _FakeModel(torch.tensor(log_probs)),
        beta=0.3,
        loss_type=loss_type,
        calculate_KL=loss_type == "kto",
        desirable_weight=1.3,
        undesirable_weight=0.8,
    )
    stub._compute_kl_logps = lambda model, b: torch.tensor(kl_logps) if stub.calculate_KL else None
    trl_loss = KTOTrainer._compute_loss(stub, stub.model, batch, return_outputs=False)

    loss, metrics = kto_loss(
        log_probs.sum(1),
        ref_logps,
        kl_logps,
        ref_kl,
        np.array(labels, bool),
        beta=0.3,
        desirable_weight=1.3,
        undesirable_weight=0.8,
        loss_type=loss_type,
    )
    np.testing.assert_allclose(loss, trl_loss.item(), rtol=RTOL, atol=1e-7)
    assert {"kl", "rewards/chosen", "logps/chosen"} <= set(stub._metrics["train"])
    for name, values in stub._metrics["train"].items():
        if name in metrics:
            np.testing.assert_allclose(metrics[name], values[-1], rtol=RTOL, atol=1e-6, err_msg=name)


# -------------------------------------------------------------------------------------- ORPO / CPO


def test_orpo_matches_trl_odds_ratio_loss():
    from trl.experimental.orpo import ORPOTrainer

    rng = np.random.default_rng(4)
    c, r = (-np.abs(rng.normal(size=(2, 7))) * 2 - 1e-3).astype(np.float32)
    stub = SimpleNamespace(beta=0.25, accelerator=_accelerator())
    losses, chosen_rewards, rejected_rewards, ratio, log_odds = ORPOTrainer.odds_ratio_loss(
        stub, torch.tensor(c), torch.tensor(r)
    )
    nll = 1.234
    loss, metrics = orpo_loss(c, r, nll, beta=0.25)
    np.testing.assert_allclose(loss, nll - losses.mean().item(), rtol=RTOL)
    np.testing.assert_allclose(metrics["log_odds_ratio"], ratio.item(), rtol=RTOL)
    np.testing.assert_allclose(metrics["log_odds_chosen"], log_odds.item(), rtol=RTOL)
    np.testing.assert_allclose(metrics["rewards/chosen"], chosen_rewards.mean().item(), rtol=RTOL)
    np.testing.assert_allclose(metrics["rewards/rejected"], rejected_rewards.mean().item(), rtol=RTOL)
    # Gradients too: TRL's autograd vs jax.grad.
    tc, tr = torch.tensor(c, requires_grad=True), torch.tensor(r, requires_grad=True)
    (-ORPOTrainer.odds_ratio_loss(stub, tc, tr)[0].mean()).backward()
    gc, gr = jax.grad(lambda a, b: orpo_loss(a, b, nll, beta=0.25)[0], argnums=(0, 1))(c, r)
    np.testing.assert_allclose(gc, tc.grad.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(gr, tr.grad.numpy(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_cpo_matches_trl_cpo_loss(loss_type, alpha):
    from trl.experimental.cpo import CPOTrainer

    rng = np.random.default_rng(5)
    c, r = (-np.abs(rng.normal(size=(2, 7))) * 2 - 0.1).astype(np.float32)
    smoothing = 0.1 if loss_type in ("sigmoid", "simpo") else 0.0
    stub = SimpleNamespace(
        beta=0.7,
        alpha=alpha,
        loss_type=loss_type,
        label_smoothing=smoothing,
        simpo_gamma=0.4,
        accelerator=_accelerator(),
    )
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(stub, torch.tensor(c), torch.tensor(r))
    nll = 0.9
    loss, metrics = cpo_loss(
        c,
        r,
        beta=0.7,
        loss_type=loss_type,
        label_smoothing=smoothing,
        simpo_gamma=0.4,
        alpha=alpha,
        cpo_alpha=0.5,
        chosen_nll=nll,
    )
    np.testing.assert_allclose(loss, losses.mean().item() + 0.5 * nll, rtol=RTOL)
    np.testing.assert_allclose(metrics["rewards/chosen"], chosen_rewards.mean().item(), rtol=RTOL)
    np.testing.assert_allclose(metrics["rewards/rejected"], rejected_rewards.mean().item(), rtol=RTOL)
    acc = (chosen_rewards > rejected_rewards).float().mean().item()
    np.testing.assert_allclose(metrics["rewards/accuracies"], acc)


# -------------------------------------------------------------------------------------------- reward


@pytest.mark.parametrize("with_margin", [False, True])
def test_reward_matches_trl(with_margin):
    from trl import RewardTrainer

    rng = np.random.default_rng(6)
    rewards = rng.normal(size=(10, 1)).astype(np.float32)
    margin = rng.random(5).astype(np.float32)
    inputs = dict(input_ids=torch.zeros(10, 4, dtype=torch.long), attention_mask=torch.ones(10, 4, dtype=torch.long))
    if with_margin:
        inputs["margin"] = torch.tensor(margin)
    stub = _trainer_stub(
        _FakeModel(logits=torch.tensor(rewards)), args=SimpleNamespace(center_rewards_coefficient=0.01)
    )
    trl_loss = RewardTrainer.compute_loss(stub, stub.model, inputs)
    loss, metrics = reward_loss(
        rewards[:5, 0],
        rewards[5:, 0],
        margin=margin if with_margin else None,
        center_rewards_coefficient=0.01,
    )
    np.testing.assert_allclose(loss, trl_loss.item(), rtol=RTOL)
    for name in ("accuracy", "margin", "mean_reward"):
        np.testing.assert_allclose(metrics[name], stub._metrics["train"][name][-1], rtol=RTOL, atol=1e-7)


# ---------------------------------------------------------------------------------------- KD (GKD)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_with_k_equal_v_matches_trl_generalized_jsd(beta, temperature):
    """With K = V (every id, teacher log_softmax(t / T)), jaxpref's KD = T^2 * TRL's GKD loss, and so
    is its gradient (TRL's GKD has no T^2 factor)."""
    from trl.experimental.gkd import GKDTrainer

    rng = np.random.default_rng(7)
    b, t, v = 2, 4, 9
    student = (rng.normal(size=(b, t, v)) * 2).astype(np.float32)
    teacher = (rng.normal(size=(b, t, v)) * 2).astype(np.float32)
    labels = rng.integers(0, v, (b, t))
    labels[0, :2] = -100
    ts = torch.tensor(student, requires_grad=True)
    trl_loss = GKDTrainer.generalized_jsd_loss(
        ts, torch.tensor(teacher), labels=torch.tensor(labels), beta=beta, temperature=temperature
    )
    trl_loss.backward()

    ids = np.broadcast_to(np.arange(v), (b, t, v))
    teacher_lp = np.asarray(jax.nn.log_softmax(teacher / temperature, axis=-1))
    mask = labels != -100
    f = lambda s: kd_topk_loss(s, ids, teacher_lp, mask, temperature=temperature, beta=beta)[0]
    np.testing.assert_allclose(f(student), temperature**2 * trl_loss.item(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jax.grad(f)(student), temperature**2 * ts.grad.numpy(), rtol=1e-4, atol=1e-7)
