"""GRPO against TRL 1.16's own code: ``grpo_loss`` vs ``GRPOTrainer._compute_loss`` and
``group_advantages`` vs ``GRPOTrainer._generate_and_score_completions``.

A real ``GRPOTrainer`` (tiny random Llama on CPU, float32) is built from a ``GRPOConfig`` per case, so
TRL reads every option itself. Only the model's side is replaced, in the test: for the loss,
``_get_per_token_logps_and_entropies`` returns fixed log-probs (a leaf tensor, so TRL's gradient
w.r.t. them can be compared with ``jax.grad``) and entropies; for the advantages, ``_generate`` returns
fixed completions and the reward functions return fixed scores (None where NaN is wanted). The rest is
TRL's code path as it runs in training. The model-level parity (fused log-probs, entropy, reference,
gradients of the weights) is in tests/objectives/test_grpo_objective.py.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.losses import grpo_count, grpo_loss
from jaxpref.rewards import group_advantages

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

TOL = 1e-5
B, C = 6, 7  # rows, completion positions
MAX_COMPLETION = 9


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """A tiny random Llama saved with ``save_pretrained`` (TRL loads it, and its reference copy, by path)."""
    from tests.objectives.helpers import hf_llama

    path = tmp_path_factory.mktemp("grpo_policy")
    hf_llama(seed=0).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tok():
    from tests.objectives.helpers import tokenizer

    return tokenizer()


def first_reward(completions, **kw):
    return [0.0] * len(completions)


def make_trainer(tmp_path, policy_dir, tok, reward_funcs=(first_reward,), rows: int = B, **grpo):
    args = trl.GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], bf16=False, per_device_train_batch_size=rows,
        num_generations=grpo.pop("num_generations", 2), max_completion_length=MAX_COMPLETION, **grpo,
    )  # fmt: skip
    ds = datasets.Dataset.from_list([{"prompt": "hi"}] * rows)
    return trl.GRPOTrainer(
        model=policy_dir, reward_funcs=list(reward_funcs), args=args, train_dataset=ds, processing_class=tok
    )


def fixed_inputs(seed: int = 0):
    """Per-token log-probs of B rows x C completion positions; ragged masks, an empty row (a masked
    truncated completion), junk at masked positions, old/ref log-probs far enough away to clip."""
    rng = np.random.default_rng(seed)
    lengths = np.array([7, 5, 1, 0, 3, 6])
    mask = np.arange(C)[None, :] < lengths[:, None]
    logps = -rng.gamma(2.0, 0.7, size=(B, C)).astype(np.float32)
    row_shift = np.array([-0.45, 0.45, -0.45, 0.0, 0.4, -0.45])[:, None]  # so that sequence-level ratios clip too
    old = (logps + row_shift + rng.normal(0.0, 0.35, size=(B, C))).astype(np.float32)
    ref = (logps + rng.normal(0.0, 0.5, size=(B, C))).astype(np.float32)
    junk = ~mask
    logps[junk], old[junk], ref[junk] = -3.0, 7.0, -11.0  # never read
    entropies = rng.uniform(0.1, 3.0, size=(B, C)).astype(np.float32) * mask
    advantages = np.array([1.3, -0.7, 0.4, 2.0, -1.1, -0.5], np.float32)
    return SimpleNamespace(mask=mask, logps=logps, old=old, ref=ref, entropies=entropies, advantages=advantages)


def trl_compute_loss(trainer, x, *, with_old: bool, num_items: float | None = None, accumulation: int = 1):
    """TRL's ``_compute_loss`` on the fixed log-probs: (loss, d loss / d logps, logged metrics)."""
    logps = torch.tensor(x.logps, requires_grad=True)
    entropies = torch.tensor(x.entropies)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, entropies, None)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = accumulation  # set by HF's training loop
    mask = torch.tensor(x.mask, dtype=torch.long)
    rows = mask.shape[0]
    inputs = {
        "prompt_ids": torch.ones((rows, 2), dtype=torch.long),
        "prompt_mask": torch.ones((rows, 2), dtype=torch.long),
        "completion_ids": torch.ones((rows, C), dtype=torch.long),
        "completion_mask": mask,
        "advantages": torch.tensor(x.advantages),
        "num_items_in_batch": torch.tensor(float(mask.sum()) if num_items is None else num_items),
        "ref_per_token_logps": torch.tensor(x.ref),
    }
    if with_old:
        inputs["old_per_token_logps"] = torch.tensor(x.old)
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    metrics = {k: float(v[-1]) for k, v in trainer._metrics["train"].items()}
    return float(loss.detach()), logps.grad.numpy(), metrics


def ours(x, *, with_old: bool, num_items=None, **options):
    def f(logps):
        old = jnp.asarray(x.old) if with_old else None
        return grpo_loss(
            logps, old, jnp.asarray(x.ref), jnp.asarray(x.advantages), jnp.asarray(x.mask),
            entropies=jnp.asarray(x.entropies), num_items=num_items, **options,
        )  # fmt: skip

    (loss, metrics), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(jnp.asarray(x.logps))
    return float(loss), np.asarray(grad), {k: float(v) for k, v in metrics.items()}


def options_of(trainer) -> dict:
    """jaxpref's grpo_loss options from what the TRL trainer holds (its config, read by TRL)."""
    a = trainer.args
    return dict(
        loss_type=a.loss_type, importance_sampling_level=a.importance_sampling_level, epsilon_low=a.epsilon,
        epsilon_high=a.epsilon_high, delta=a.delta, beta=a.beta, use_bias_correction_kl=a.use_bias_correction_kl,
        max_completion_length=a.max_completion_length,
    )  # fmt: skip


METRICS = [
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_max",
]

CASES = [
    dict(loss_type=lt, beta=beta, importance_sampling_level=level)
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo")
    for beta in (0.0, 0.04)
    for level in ("token", "sequence")
] + [
    dict(loss_type="dapo", beta=0.04, epsilon_high=0.28),  # DAPO's clip-higher
    dict(loss_type="dapo", beta=0.04, epsilon_high=0.28, delta=1.3),  # two-sided clipping
    dict(loss_type="grpo", beta=0.04, importance_sampling_level="sequence", epsilon=0.05, delta=1.08),
    dict(loss_type="bnpo", beta=0.04, use_bias_correction_kl=False),
    dict(loss_type="dr_grpo", beta=0.1, epsilon=0.1, epsilon_high=0.15, delta=1.2),
]


def case_id(case: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_loss_gradient_and_metrics_equal_trl(tmp_path, policy_dir, tok, case):
    """Old log-probs differ from the current ones (``num_iterations`` > 1): ratios clip both ways."""
    trainer = make_trainer(tmp_path, policy_dir, tok, **case)
    x = fixed_inputs()
    want_loss, want_grad, want = trl_compute_loss(trainer, x, with_old=True)
    loss, grad, got = ours(x, with_old=True, **options_of(trainer))
    np.testing.assert_allclose(loss, want_loss, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(grad, want_grad, rtol=TOL, atol=TOL)
    keys = METRICS + (["kl"] if case["beta"] else [])
    assert sorted(got) == sorted(keys)
    for k in keys:
        np.testing.assert_allclose(got[k], want[k], rtol=TOL, atol=TOL, err_msg=k)
    assert np.abs(want_grad).max() > 1e-3
    assert want["clip_ratio/low_mean"] > 0 and want["clip_ratio/high_mean"] > 0  # both clips are live
    if case.get("delta") is not None:  # and so is delta
        assert abs(ours(x, with_old=True, **{**options_of(trainer), "delta": None})[0] - loss) > 1e-3


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_without_old_logps_the_ratio_is_one(tmp_path, policy_dir, tok, loss_type):
    """``num_iterations`` 1: no ``old_per_token_logps``, TRL uses ``per_token_logps.detach()``; so does
    ``old_logps=None``. The gradient is then the plain policy gradient (+ the KL's)."""
    trainer = make_trainer(tmp_path, policy_dir, tok, loss_type=loss_type, beta=0.04)
    x = fixed_inputs(1)
    want_loss, want_grad, want = trl_compute_loss(trainer, x, with_old=False)
    loss, grad, got = ours(x, with_old=False, **options_of(trainer))
    np.testing.assert_allclose(loss, want_loss, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(grad, want_grad, rtol=TOL, atol=TOL)
    for k in METRICS + ["kl"]:
        np.testing.assert_allclose(got[k], want[k], rtol=TOL, atol=TOL, err_msg=k)
    assert want["clip_ratio/region_mean"] == 0


def test_dapo_divides_by_the_steps_tokens(tmp_path, policy_dir, tok):
    """TRL's dapo divides by ``num_items_in_batch`` (every completion token of the generation batch):
    jaxpref's ``num_items`` is that count. Metrics are then contributions: the micro-batch's values
    times its share of the step's tokens."""
    trainer = make_trainer(tmp_path, policy_dir, tok, loss_type="dapo", beta=0.04)
    x = fixed_inputs(2)
    total = 2.5 * float(x.mask.sum())
    want_loss, want_grad, want = trl_compute_loss(trainer, x, with_old=True, num_items=total)
    loss, grad, got = ours(x, with_old=True, num_items=total, **options_of(trainer))
    np.testing.assert_allclose(loss, want_loss, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(grad, want_grad, rtol=TOL, atol=TOL)
    for k in METRICS + ["kl"]:
        np.testing.assert_allclose(got[k] * 2.5, want[k], rtol=TOL, atol=TOL, err_msg=k)


def halves(x) -> list[SimpleNamespace]:
    """Rows 0-2 and 3-5: two micro-batches of equally many rows and unequal completion tokens (13, 9)."""
    return [SimpleNamespace(**{k: v[sl] for k, v in vars(x).items()}) for sl in (slice(0, 3), slice(3, 6))]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_accumulation_over_two_micro_batches_against_trl(tmp_path, policy_dir, tok, loss_type):
    """One optimizer step of two micro-batches (``gradient_accumulation_steps`` 2), TRL's way: each
    ``_compute_loss`` in train mode, gradients summed, each metric logged per call and averaged by
    ``log``. jaxpref: contributions with ``num_items`` = the step's summed count.

    * loss and gradient: equal for grpo, dr_grpo (equal rows per micro-batch) and dapo; TRL's bnpo
      averages per-micro-batch token means, jaxpref's bnpo is dapo's step-wide token mean;
    * metrics: for grpo and dr_grpo TRL's mean over micro-batches; for bnpo and dapo the mean weighted
      by each micro-batch's completion tokens (TRL: unweighted; equal for one micro-batch per step).
    """
    parts = halves(fixed_inputs(4))
    tokens = np.array([p.mask.sum() for p in parts], np.float32)
    assert tokens[0] != tokens[1]
    trainer = make_trainer(tmp_path, policy_dir, tok, loss_type=loss_type, beta=0.04, gradient_accumulation_steps=2)
    assert trainer.args.steps_per_generation == 2
    want_losses, want_grads, want_metrics = [], [], []
    for p in parts:
        trainer._metrics["train"].clear()
        value, grad, metrics = trl_compute_loss(
            trainer, p, with_old=True, num_items=float(tokens.sum()), accumulation=2
        )
        want_losses.append(value)
        want_grads.append(grad)
        want_metrics.append(metrics)
    opts = options_of(trainer)
    counts = [float(grpo_count(p.mask, loss_type=loss_type, max_completion_length=MAX_COMPLETION)) for p in parts]
    got = [ours(p, with_old=True, num_items=sum(counts), **opts) for p in parts]
    loss, grad = sum(g[0] for g in got), np.concatenate([g[1] for g in got])
    want_loss, want_grad = sum(want_losses), np.concatenate(want_grads)
    if loss_type == "bnpo":
        dapo = [ours(p, with_old=True, num_items=float(tokens.sum()), **{**opts, "loss_type": "dapo"}) for p in parts]
        np.testing.assert_allclose(loss, sum(d[0] for d in dapo), rtol=TOL, atol=1e-7)
        assert abs(loss - want_loss) > 1e-3  # TRL's per-micro-batch bnpo is another number
    else:
        np.testing.assert_allclose(loss, want_loss, rtol=TOL, atol=TOL)
        np.testing.assert_allclose(grad, want_grad, rtol=TOL, atol=TOL)
    weights = np.full(2, 0.5) if loss_type in ("grpo", "dr_grpo") else tokens / tokens.sum()
    for k in METRICS + ["kl"]:
        expected = sum(w * m[k] for w, m in zip(weights, want_metrics))
        np.testing.assert_allclose(sum(g[2][k] for g in got), expected, rtol=TOL, atol=TOL, err_msg=k)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_padding_rows_change_nothing(loss_type):
    """Rows outside ``rows`` (padding of a micro-batch) contribute to no sum and no count."""
    x = fixed_inputs(3)
    opts = dict(loss_type=loss_type, beta=0.04, max_completion_length=MAX_COMPLETION)
    loss, metrics = grpo_loss(x.logps, x.old, x.ref, x.advantages, x.mask, entropies=x.entropies, **opts)
    pad = lambda a, v=0: np.concatenate([a, np.full((2,) + a.shape[1:], v, a.dtype)])  # noqa: E731
    rows = np.arange(B + 2) < B
    loss2, metrics2 = grpo_loss(
        pad(x.logps, np.nan), pad(x.old, np.inf), pad(x.ref), pad(x.advantages, 5.0), pad(x.mask, True),
        rows=rows, entropies=pad(x.entropies), **opts,
    )  # fmt: skip
    np.testing.assert_allclose(loss2, loss, rtol=TOL, atol=1e-7)
    for k in metrics:
        np.testing.assert_allclose(metrics2[k], metrics[k], rtol=TOL, atol=1e-7, err_msg=k)
    assert float(grpo_count(pad(x.mask, True), rows, loss_type=loss_type, max_completion_length=9)) == float(
        grpo_count(x.mask, loss_type=loss_type, max_completion_length=9)
    )


# ---------------------------------------------------------------------------------------------------------
# Advantages: TRL's _generate_and_score_completions with generation mocked.


def scores_table(seed: int, n: int, f: int) -> np.ndarray:
    """[n, f] scores, G = 4: a zero-std group, a group with one scored completion, unscorable rows,
    partly scored rows (one function None)."""
    rng = np.random.default_rng(seed)
    s = np.round(rng.normal(size=(n, f)), 3).astype(np.float32)
    s[0:4] = 0.5  # group 0: zero std
    s[4, :] = np.nan  # group 1: an unscorable completion ...
    s[5, 0] = np.nan  # ... and one scored by the second function only
    s[8:11, :] = np.nan  # group 2: one scored completion
    s[13, 1] = np.nan
    return s


def trl_advantages(tmp_path, policy_dir, tok, scores: np.ndarray, num_generations: int, **grpo):
    """Run TRL's ``_generate_and_score_completions`` over fixed completions and reward scores."""
    n, f = scores.shape

    def make_func(i):
        def fn(completions, row, **kw):
            return [None if np.isnan(scores[r, i]) else float(scores[r, i]) for r in row]

        fn.__name__ = f"score{i}"
        return fn

    trainer = make_trainer(
        tmp_path, policy_dir, tok, reward_funcs=[make_func(i) for i in range(f)], rows=n,
        num_generations=num_generations, **grpo,
    )  # fmt: skip
    eos = tok.eos_token_id
    completion_ids = [[5 + (r % 7)] * (1 + r % 3) + [eos] for r in range(n)]
    trainer._generate = lambda prompts: (
        [[3, 4]] * n, completion_ids, None, ["c"] * n, None, None, None, [None] * n,
    )  # fmt: skip
    trainer.model.train()
    out = trainer._generate_and_score_completions([{"prompt": "p", "row": r} for r in range(n)])
    metrics = {k: float(v[-1]) for k, v in trainer._metrics["train"].items()}
    return out["advantages"].numpy(), metrics, trainer


@pytest.mark.parametrize(
    "scale_rewards, aggregation, weights",
    [
        ("group", "sum_then_normalize", None),
        ("batch", "sum_then_normalize", [0.7, 1.5]),
        ("none", "sum_then_normalize", [1.0, -0.5]),
        ("group", "normalize_then_sum", [0.7, 1.5]),
        ("none", "normalize_then_sum", None),
    ],
)
def test_group_advantages_equal_trl(tmp_path, policy_dir, tok, scale_rewards, aggregation, weights):
    scores = scores_table(0, 16, 2)
    grpo = dict(scale_rewards=scale_rewards, multi_objective_aggregation=aggregation, reward_weights=weights)
    want_adv, want, trainer = trl_advantages(tmp_path, policy_dir, tok, scores, 4, **grpo)
    adv, rewards, got = group_advantages(
        scores, trainer.reward_weights.numpy(), 4, scale_rewards, aggregation, names=trainer.reward_func_names
    )
    np.testing.assert_allclose(adv, want_adv, rtol=TOL, atol=TOL)
    assert np.all(adv[4] == 0) and np.isfinite(adv).all()  # the unscorable completion
    for k in ["reward", "reward_std", "frac_reward_zero_std"] + [
        f"rewards/score{i}/{s}" for i in range(2) for s in ("mean", "std")
    ]:
        np.testing.assert_allclose(got[k], want[k], rtol=TOL, atol=TOL, err_msg=k)
    assert np.isnan(rewards[4]) and not np.isnan(rewards[5])
    if aggregation == "sum_then_normalize" and scale_rewards != "batch":
        assert got["frac_reward_zero_std"] == 0.25  # group 0 (the one-score group's std is NaN: not zero)


def test_group_advantages_one_function_equal_trl(tmp_path, policy_dir, tok):
    """One reward function, G = 3, every group scored: the common case."""
    scores = np.round(np.random.default_rng(5).normal(size=(9, 1)), 2).astype(np.float32)
    scores[3:6] = 1.0
    want_adv, want, trainer = trl_advantages(tmp_path, policy_dir, tok, scores, 3)
    adv, _, got = group_advantages(scores, None, 3, names=trainer.reward_func_names)
    np.testing.assert_allclose(adv, want_adv, rtol=TOL, atol=TOL)
    np.testing.assert_array_equal(adv[3:6], 0.0)
    for k in ["reward", "reward_std", "frac_reward_zero_std", "rewards/score0/mean", "rewards/score0/std"]:
        np.testing.assert_allclose(got[k], want[k], rtol=TOL, atol=TOL, err_msg=k)
