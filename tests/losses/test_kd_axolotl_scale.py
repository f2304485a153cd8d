"""jaxpref's KD against axolotl's, in numbers: the T^2 factor and the alignment (docs/kd_vs_axolotl.md).

axolotl's formulas are written here in torch, independently of jaxpref, from reading
axolotl-ai-cloud/axolotl at 067b021c8 (2026-07-24):

* the plain loss, ``src/axolotl/integrations/kd/topk_logprob/forward_kl.py`` ``loss``: log-softmax of
  ``logits / T`` over the vocabulary, gathered at the teacher ids, ``sum p * (log p - log q)`` over the
  valid (t, k) entries, divided by ``num_items_in_batch`` (else by the count of valid entries). No
  T^2: removed in axolotl PR #2700 ("don't scale up kd loss by t^2"); the original trainer (#2303)
  multiplied by T^2 as jaxpref does.
* the loss of the current ``AxolotlKDTrainer`` (``src/axolotl/integrations/kd/trainer.py``
  ``compute_loss`` -> ``kernels/liger.py`` ``LigerFusedLinearKLTopKLogprobFunction.forward``): the
  gradient is taken, chunk by chunk, of ``kd_alpha * soft + kd_ce_alpha * ce`` (sums, no T^2); the
  returned value is ``kd_alpha * T^2 * soft + kd_ce_alpha * ce``; ``compute_loss`` divides it by
  ``num_items_in_batch``, and that division reaches the stored gradients through ``grad_output``.
  The KD targets at row t are paired with the hidden state at t (no shift); only the CE labels
  are shifted (``true_labels[:, 1:]``).
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest
import torch

from jaxpref.data.formats import BadRow
from jaxpref.data.formats.kd import parse_teacher, token_aligned
from jaxpref.data.kd_targets import teacher_targets
from jaxpref.data.pipeline import shift
from jaxpref.losses import kd_loss, kd_topk_loss

IGNORE = -100


# --- axolotl's formulas (torch, float64) -------------------------------------------------------


def _soft_sum(logits: torch.Tensor, ids, lp, mask, temperature: float) -> torch.Tensor:
    """sum over valid (t, k) of p * (log p - log q_T): forward_kl.loss / liger distillation_loss_fn."""
    logq = torch.log_softmax(logits / temperature, dim=-1)
    logq = torch.gather(logq, -1, torch.as_tensor(ids, dtype=torch.long))
    valid = torch.as_tensor(mask, dtype=torch.bool)
    a = torch.as_tensor(lp, dtype=torch.float64)[valid]
    return (a.exp() * (a - logq[valid])).sum()


def axolotl_plain(logits, ids, lp, mask, *, num_items_in_batch: int, temperature: float):
    """forward_kl.loss: value and gradient w.r.t. the logits."""
    z = torch.tensor(np.asarray(logits, np.float64), requires_grad=True)
    value = _soft_sum(z, ids, lp, mask, temperature)
    value = value / (num_items_in_batch if num_items_in_batch > 0 else int(np.sum(mask)))
    value.backward()
    return value.item(), z.grad.numpy()


def axolotl_trainer(logits, ids, lp, mask, labels, *, kd_alpha, kd_ce_alpha, temperature, num_items_in_batch):
    """The current AxolotlKDTrainer's (logged value, gradient w.r.t. the logits).

    ``labels`` are axolotl's unshifted labels [B, L]; the CE pairs position t with ``labels[t + 1]``
    (pad with -100, drop the first), the KD pairs position t with target row t.
    """
    z = torch.tensor(np.asarray(logits, np.float64), requires_grad=True)
    soft = _soft_sum(z, ids, lp, mask, temperature)
    ce = torch.zeros((), dtype=torch.float64)
    if kd_ce_alpha:  # compute_ce_loss=bool(kd_ce_alpha)
        shifted = torch.nn.functional.pad(torch.as_tensor(labels), (0, 1), value=IGNORE)[:, 1:]
        ce = torch.nn.functional.cross_entropy(
            z.reshape(-1, z.shape[-1]), shifted.reshape(-1), reduction="sum", ignore_index=IGNORE
        )
    differentiated = (kd_alpha * soft + kd_ce_alpha * ce) / num_items_in_batch
    differentiated.backward()
    logged = (kd_alpha * temperature**2 * soft + kd_ce_alpha * ce) / num_items_in_batch
    return logged.item(), z.grad.numpy()


# --- inputs ------------------------------------------------------------------------------------

B, L, V, K = 2, 6, 11, 3


def make_batch(seed: int = 0):
    """A batch as axolotl's vLLM collator builds it and as jaxpref's pipeline does: prediction-aligned
    targets, renormalised over the valid entries, the mask = the next token is trained."""
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(B, L, V)) * 2.0).astype(np.float32)
    tokens = rng.integers(0, V, size=(B, L))
    labels = np.where(np.arange(L) >= 2, tokens, IGNORE)  # axolotl: unshifted, prompt = first 2 tokens
    labels[1, 5] = IGNORE  # a padded tail
    next_labels = np.concatenate([labels[:, 1:], np.full((B, 1), IGNORE)], axis=1)
    loss_mask = next_labels != IGNORE  # jaxpref's shifted mask
    ids = np.stack([rng.permutation(V)[:K] for _ in range(B * L)]).reshape(B, L, K)
    entry = rng.random((B, L, K)) > 0.2
    entry[..., 0] = True
    mask = entry & loss_mask[..., None]
    raw = np.where(mask, rng.normal(size=(B, L, K)) * 1.5, -np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        top = np.max(raw, axis=-1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        lp = raw - top - np.log(np.sum(np.exp(raw - top), axis=-1, keepdims=True))
    lp = np.where(mask, lp, -1e9).astype(np.float32)  # axolotl's collator pads with -1e9
    return logits, ids, lp, mask, labels, np.where(loss_mask, next_labels, 0), loss_mask


def jaxpref_kd(logits, ids, lp, mask, next_labels, loss_mask, **kw):
    def f(z):
        return kd_loss(z, ids, lp, mask, next_labels, loss_mask=loss_mask, **kw)[0]

    value, grad = jax.value_and_grad(f)(logits)
    return float(value), np.asarray(grad)


# --- the T^2 factor ----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [2.0, 3.0, 0.5])
def test_kd_is_t_squared_times_axolotl_plain_loss_in_value_and_gradient(temperature):
    logits, ids, lp, mask, labels, _, loss_mask = make_batch()
    n = int(loss_mask.sum())
    assert n == int((labels != IGNORE).sum())  # axolotl's num_items_in_batch: the same N here
    want, want_grad = axolotl_plain(logits, ids, lp, mask, num_items_in_batch=n, temperature=temperature)

    f = lambda z: kd_topk_loss(z, ids, lp, mask, temperature=temperature, num_items=n)[0]  # noqa: E731
    value, grad = jax.value_and_grad(f)(logits)
    t2 = temperature**2
    np.testing.assert_allclose(float(value), t2 * want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), t2 * want_grad, rtol=1e-4, atol=1e-7)
    assert np.abs(want_grad).max() > 1e-3  # not a vacuous comparison


@pytest.mark.parametrize("temperature", [2.0, 3.0])
@pytest.mark.parametrize("kd_alpha, kd_ce_alpha", [(0.9, 0.1), (1.0, 0.0), (0.5, 0.5)])
def test_current_axolotl_trainer_logs_jaxpref_value_but_steps_with_kd_alpha_over_t_squared(
    temperature, kd_alpha, kd_ce_alpha
):
    logits, ids, lp, mask, labels, next_labels, loss_mask = make_batch(1)
    n = int(loss_mask.sum())
    logged, ax_grad = axolotl_trainer(
        logits, ids, lp, mask, labels,
        kd_alpha=kd_alpha, kd_ce_alpha=kd_ce_alpha, temperature=temperature, num_items_in_batch=n,
    )  # fmt: skip
    t2 = temperature**2
    common = dict(kd_ce_alpha=kd_ce_alpha, temperature=temperature, num_items=n)

    # Same kd_alpha: the same logged number, but jaxpref's KD gradient is T^2 times axolotl's.
    value, grad = jaxpref_kd(logits, ids, lp, mask, next_labels, loss_mask, kd_alpha=kd_alpha, **common)
    np.testing.assert_allclose(value, logged, rtol=1e-5)
    _, ce_grad = jaxpref_kd(logits, ids, lp, mask, next_labels, loss_mask, kd_alpha=0.0, **common)
    np.testing.assert_allclose(grad - ce_grad, t2 * (ax_grad - ce_grad), rtol=1e-4, atol=1e-7)
    assert not np.allclose(grad, ax_grad, rtol=1e-2)

    # kd_alpha / T^2 (kd_ce_alpha unchanged): axolotl's update exactly; the loss is then the value
    # axolotl differentiates (not the one it logs).
    value, grad = jaxpref_kd(logits, ids, lp, mask, next_labels, loss_mask, kd_alpha=kd_alpha / t2, **common)
    np.testing.assert_allclose(grad, ax_grad, rtol=1e-4, atol=1e-7)
    soft = _soft_sum(torch.tensor(np.asarray(logits, np.float64)), ids, lp, mask, temperature).item()
    np.testing.assert_allclose(value, logged - kd_alpha * (t2 - 1) * soft / n, rtol=1e-5)


def test_worked_example_numbers():
    """The one-position example of docs/kd_vs_axolotl.md, to the digits printed there."""
    logits = np.array([[[2.0, 1.0, 0.0, -1.0]]], np.float32)
    ids = np.array([[[0, 1]]])
    lp = np.log(np.array([[[0.7, 0.3]]], np.float32))
    mask = np.ones((1, 1, 2), bool)
    next_labels, loss_mask = np.array([[0]]), np.array([[True]])
    t = 2.0

    plain, plain_grad = axolotl_plain(logits, ids, lp, mask, num_items_in_batch=1, temperature=t)
    np.testing.assert_allclose(plain, 0.3265, atol=5e-5)
    np.testing.assert_allclose(plain_grad[0, 0], [-0.1225, -0.0120, 0.0837, 0.0508], atol=5e-5)
    kd, kd_grad = jaxpref_kd(logits, ids, lp, mask, next_labels, loss_mask, kd_alpha=1.0, temperature=t)
    np.testing.assert_allclose(kd, 1.3059, atol=5e-5)
    np.testing.assert_allclose(kd_grad[0, 0], [-0.4899, -0.0480, 0.3348, 0.2031], atol=5e-5)

    # axolotl's labels are unshifted: a second, untrained position carries the label of position 0.
    labels = np.array([[IGNORE, 0]])
    logged, ax_grad = axolotl_trainer(
        np.concatenate([logits, logits], axis=1), np.concatenate([ids, ids], axis=1),
        np.concatenate([lp, lp], axis=1), np.concatenate([mask, ~mask], axis=1), labels,
        kd_alpha=0.9, kd_ce_alpha=0.1, temperature=t, num_items_in_batch=1,
    )  # fmt: skip
    np.testing.assert_allclose(logged, 1.2193, atol=5e-5)
    np.testing.assert_allclose(ax_grad[0, 0], [-0.1458, 0.0129, 0.0840, 0.0489], atol=5e-5)
    inputs = (logits, ids, lp, mask, next_labels, loss_mask)
    same_alpha = jaxpref_kd(*inputs, kd_alpha=0.9, kd_ce_alpha=0.1, temperature=t)
    np.testing.assert_allclose(same_alpha[0], 1.2193, atol=5e-5)
    np.testing.assert_allclose(same_alpha[1][0, 0], [-0.4765, -0.0195, 0.3100, 0.1860], atol=5e-5)
    ported = jaxpref_kd(*inputs, kd_alpha=0.9 / t**2, kd_ce_alpha=0.1, temperature=t)
    np.testing.assert_allclose(ported[0], 0.3378, atol=5e-5)
    np.testing.assert_allclose(ported[1][0, 0], ax_grad[0, 0], atol=1e-6)


# --- alignment: the 5-token worked row ----------------------------------------------------------

TOKENS = np.array([1, 20, 21, 22, 2])  # x0..x4
TRAINABLE = np.array([False, False, True, True, True])  # prompt x0 x1, completion x2 x3 x4
MARK = 100  # teacher row i holds {x_i: -0.1, MARK + i: -2.4}: the marker names the row


def teacher_row(i: int) -> list[dict]:
    return [
        {"token": f"token_id:{TOKENS[i]}", "logprob": -0.1},
        {"token": f"token_id:{MARK + i}", "logprob": -2.4},
    ]


def jaxpref_targets(rows: list, alignment: str, trainable=TRAINABLE) -> dict:
    """The pipeline's per-row steps: parse (format a), token-align, cut/renormalise, shift."""
    teacher = token_aligned(parse_teacher({"logprobs": rows}), len(TOKENS), alignment)
    example = {
        "input_ids": TOKENS,
        "trainable": trainable,
        **teacher_targets(teacher.token_ids, teacher.logprobs, teacher.valid, scale=1.0),
    }
    return shift(example)


def row_at(targets: dict, t: int) -> int | None:
    """Which teacher row the batch holds at position t (None: masked)."""
    if not targets["target_mask"][t].any():
        return None
    return int(targets["target_token_ids"][t].max()) - MARK


VLLM_ROWS = [None] + [teacher_row(i) for i in range(1, 5)]  # token-aligned, vLLM's leading null


def test_worked_row_jaxpref_pairs_position_t_with_row_t_plus_1():
    out = jaxpref_targets(VLLM_ROWS, "token")
    assert out["labels"].tolist()[:4] == TOKENS[1:].tolist()
    assert [row_at(out, t) for t in range(5)] == [None, 2, 3, 4, None]  # t=0 predicts x1 (prompt)
    # Every trained position: the teacher's top token is the label, the token the position predicts.
    for t in (1, 2, 3):
        assert out["target_token_ids"][t][np.argmax(out["target_logprobs"][t])] == out["labels"][t]

    everything = jaxpref_targets(VLLM_ROWS, "token", trainable=np.ones(5, bool))
    assert [row_at(everything, t) for t in range(5)] == [1, 2, 3, 4, None]


def test_worked_row_prediction_alignment_declares_already_shifted_rows():
    shifted_rows = VLLM_ROWS[1:]  # 4 rows for 5 tokens: row t is over token t + 1
    out = jaxpref_targets(shifted_rows, "prediction")
    want = jaxpref_targets(VLLM_ROWS, "token")
    for key in ("target_token_ids", "target_logprobs", "target_mask"):
        np.testing.assert_array_equal(out[key], want[key], err_msg=key)
    with pytest.raises(BadRow) as e:  # never guessed: under the default it is a bad row
        jaxpref_targets(shifted_rows, "token")
    assert e.value.reason == "kd_length_mismatch"


def axolotl_offline_rows(rows: list) -> list:
    """axolotl's KD chat_template loader (chat_template.py ``ChatTemplateStrategyWithKD.transform_logprobs``):
    fewer rows than tokens are padded at the front ("we shift for causal models in the trainer"), so
    position i holds the row over token i, its mask from ``labels[i]`` (token i trained)."""
    rows = [None] * (len(TOKENS) - len(rows)) + list(rows)
    return [r if (r is not None and TRAINABLE[i]) else None for i, r in enumerate(rows)]


def axolotl_vllm_collator_rows(rows: list) -> list:
    """axolotl's vLLM collator (collator_online_teacher.py ``fetch_online_logprobs_vllm``): skips the
    leading null, so position t holds the row over token t + 1, its mask from ``labels[t + 1]``; the
    tail is padded."""
    kept = [(i, r) for i, r in enumerate(rows) if r is not None]
    out = [r if TRAINABLE[i] else None for i, r in kept]
    return out + [None] * (len(TOKENS) - len(out))


def test_worked_row_axolotl_current_trainer_is_one_position_off_for_token_aligned_rows():
    def named(rows):  # the current trainer pairs position t with whatever row t holds
        return [None if r is None else int(r[1]["token"].split(":")[1]) - MARK for r in rows]

    jax_rows = [row_at(jaxpref_targets(VLLM_ROWS, "token"), t) for t in range(5)]
    assert named(axolotl_vllm_collator_rows(VLLM_ROWS)) == jax_rows == [None, 2, 3, 4, None]
    offline = named(axolotl_offline_rows(VLLM_ROWS[1:]))
    assert offline == [None, None, 2, 3, 4]
    # Position t (input x_t, predicting x_{t+1}) is trained towards the row over x_t: the token it
    # already sees. The prediction of x2 (t = 1) gets no KD; the position after the last token does.
    for t in (2, 3, 4):
        assert offline[t] == t


def test_doc_prints_the_tested_numbers():
    doc = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "kd_vs_axolotl.md").read_text()
    for number in (
        "0.3265", "1.3059", "0.4402", "1.2193", "0.3378", "0.225", "0.909",
        "(0.4551, 0.2760, 0.1674, 0.1015)",
        "(−0.1225, −0.0120, 0.0837, 0.0508)",
        "(−0.4899, −0.0480, 0.3348, 0.2031)",
        "(−0.1458, 0.0129, 0.0840, 0.0489)",
        "(−0.4765, −0.0195, 0.3100, 0.1860)",
    ):  # fmt: skip
        assert number in doc, number
    # 0.909: the renormalised top entry of the worked row's teacher rows.
    np.testing.assert_allclose(1 / (1 + np.exp(-2.3)), 0.909, atol=5e-4)
