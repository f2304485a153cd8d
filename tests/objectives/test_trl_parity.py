"""Trainer-level parity with TRL 1.16: first-step loss and metrics of jaxpref's objectives equal TRL's
trainers' on the same rows with the same weights.

A tiny random transformers Llama (policy) and a second one (reference, another seed, so rewards are
not zero) are saved with ``save_pretrained`` and loaded into jaxpref. TRL tokenizes, collates,
concatenates, masks and runs its own ``compute_loss`` / ``get_batch_loss_metrics``; jaxpref's batch
comes from its own data pipeline (format -> per-row map -> collator) over the same rows, so the
comparison covers tokenization, concatenation, masking, the reference and the metrics. Float32,
one micro-batch holding every row (TRL's losses are batch means; jaxpref's contributions with
``num_items`` = the batch's items are the same numbers).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from jaxpref.objectives import build_objective
from tests.objectives.helpers import (
    KTO_ROWS,
    cfg,
    hf_llama,
    jit_loss,
    kto_batch,
    kto_parts,
    pair_batch,
    pair_texts,
    save_and_load,
    tokenizer,
)

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

ATOL = 1e-4
# TRL 1.16's configs default to bf16=True, which on CPU runs the (accelerate-prepared) reference under
# bfloat16 autocast; the comparison is in float32, so every TRL config here sets bf16=False.
RTOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(torch policy, torch reference, jaxpref policy, jaxpref reference)."""
    root = tmp_path_factory.mktemp("weights")
    policy, reference = hf_llama(seed=0), hf_llama(seed=1)
    return policy, reference, save_and_load(policy, root / "policy"), save_and_load(reference, root / "reference")


def ours(name: str, batch, weights, count_key: str, **kw):
    _, _, policy, reference = weights
    objective = build_objective(cfg(**kw), name)
    companions = {"reference": reference} if objective.companions else None
    return jit_loss(objective, policy, batch, float(np.sum(batch[count_key])), companions)


def assert_close(got: dict, want: dict, keys) -> None:
    for k in keys:
        np.testing.assert_allclose(got[k], want[k], atol=ATOL, rtol=RTOL, err_msg=k)


def common(tmp_path, rows: int) -> dict:
    """TRL TrainingArguments shared by every trainer here: CPU, float32, one batch of every row."""
    return dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], bf16=False, per_device_train_batch_size=rows)


def pair_dataset(texts):
    return datasets.Dataset.from_list([{"prompt": t.prompt, "chosen": t.chosen, "rejected": t.rejected} for t in texts])


def last_metrics(trainer) -> dict[str, float]:
    """TRL's logged metrics of the last ``compute_loss`` (mode "eval": the tiny models are in eval mode)."""
    logged = trainer._metrics["eval"] or trainer._metrics["train"]
    return {k: float(v[-1]) for k, v in logged.items()}


DPO_KEYS = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
]


@pytest.mark.parametrize(
    "loss_type, label_smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)]
)
def test_dpo_first_step_equals_trl(tmp_path, tok, weights, loss_type, label_smoothing):
    policy, reference, _, _ = weights
    _, texts = pair_texts(tok)
    args = trl.DPOConfig(beta=0.3, loss_type=[loss_type], label_smoothing=label_smoothing, **common(tmp_path, 4))
    trainer = trl.DPOTrainer(policy, reference, args=args, train_dataset=pair_dataset(texts), processing_class=tok)
    trl_batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        want_loss = float(trainer.compute_loss(trainer.model, trl_batch))
    want = last_metrics(trainer)

    name = "ipo" if loss_type == "ipo" else "dpo"
    kw = {} if name == "ipo" else {"dpo_loss_type": loss_type}
    kw.update(rl_beta=0.3, dpo_label_smoothing=label_smoothing)
    loss, got = ours(name, pair_batch(tok), weights, "pair_mask", **kw)
    np.testing.assert_allclose(loss, want_loss, atol=ATOL, rtol=RTOL)
    assert_close(got, want, DPO_KEYS)
    assert 0 < want["rewards/accuracies"] < 1 and abs(want["rewards/margins"]) > 1e-3  # a non-trivial reference


@pytest.mark.parametrize(
    "loss_types, loss_weights, use_weighting",
    [
        (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], False),  # MPO, as in TRL's docs
        (["sigmoid"], None, True),  # WPO
        (["sigmoid", "bco_pair"], [0.8, 0.2], True),  # both
    ],
)
def test_dpo_loss_lists_and_wpo_first_step_equal_trl(tmp_path, tok, weights, loss_types, loss_weights, use_weighting):
    """``dpo_loss_type`` lists with ``dpo_loss_weights`` (TRL ``loss_type`` / ``loss_weights``) and
    ``dpo_use_weighting`` (TRL ``use_weighting``) give TRL's first-step loss and metrics. TRL runs with
    ``padding_free=True`` too: TRL 1.16 turns it off (standard padding), the no-op jaxpref's
    ``dpo_padding_free`` is."""
    policy, reference, _, _ = weights
    _, texts = pair_texts(tok)
    args = trl.DPOConfig(
        beta=0.3, loss_type=loss_types, loss_weights=loss_weights, use_weighting=use_weighting, padding_free=True,
        **common(tmp_path, 4),
    )  # fmt: skip
    trainer = trl.DPOTrainer(policy, reference, args=args, train_dataset=pair_dataset(texts), processing_class=tok)
    assert trainer.padding_free is False
    trl_batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        want_loss = float(trainer.compute_loss(trainer.model, trl_batch))
    want = last_metrics(trainer)

    kw = dict(rl_beta=0.3, dpo_loss_type=loss_types, dpo_use_weighting=use_weighting, dpo_padding_free=True)
    if loss_weights is not None:
        kw["dpo_loss_weights"] = loss_weights
    loss, got = ours("dpo", pair_batch(tok), weights, "pair_mask", **kw)
    np.testing.assert_allclose(loss, want_loss, atol=ATOL, rtol=RTOL)
    assert_close(got, want, DPO_KEYS)
    if use_weighting:  # the weights matter: TRL's unweighted loss is another number
        unweighted, _ = ours("dpo", pair_batch(tok), weights, "pair_mask", **{**kw, "dpo_use_weighting": False})
        assert abs(unweighted - want_loss) > 100 * ATOL


def test_kto_first_step_equals_trl(tmp_path, tok, weights):
    policy, reference, _, _ = weights
    f, _ = kto_parts(tok)
    texts = [f.text(r) for r in KTO_ROWS]
    ds = datasets.Dataset.from_list(
        [{"prompt": t.prompt, "completion": t.completion, "label": t.desirable} for t in texts]
    )  # noqa: E501
    args = trl.KTOConfig(beta=0.2, desirable_weight=0.8, undesirable_weight=1.1, **common(tmp_path, len(texts)))
    trainer = trl.KTOTrainer(model=policy, ref_model=reference, args=args, train_dataset=ds, processing_class=tok)
    trl_batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        want_loss = float(trainer.compute_loss(trainer.model, trl_batch))
    want = last_metrics(trainer)

    batch = kto_batch(tok)
    assert batch["desirable"].tolist() == trl_batch["label"].tolist()  # same (sequential) order
    loss, got = ours(
        "kto", batch, weights, "example_mask", rl_beta=0.2, kto_desirable_weight=0.8, kto_undesirable_weight=1.1
    )
    np.testing.assert_allclose(loss, want_loss, atol=ATOL, rtol=RTOL)
    assert_close(
        got,
        want,
        ["kl", *DPO_KEYS[:2], "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"],
    )
    assert want["kl"] > 0  # the KL term is live (not clamped to 0)


def trl_pair_batch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """jaxpref's pair batch in the layout of TRL's ORPO/CPO trainers (labels -100 outside the completion)."""
    out = {}
    for side in ("chosen_", "rejected_"):
        ids = torch.tensor(batch[side + "input_ids"], dtype=torch.long)
        attention = torch.tensor(batch[side + "segment_ids"] > 0, dtype=torch.long)
        trainable = np.zeros_like(batch[side + "loss_mask"])
        trainable[:, 1:] = batch[side + "loss_mask"][:, :-1]  # token t+1 is a completion token
        labels = torch.where(torch.tensor(trainable), ids, torch.full_like(ids, -100))
        out.update({side + "input_ids": ids, side + "attention_mask": attention, side + "labels": labels})
    return out


@pytest.mark.parametrize("name", ["orpo", "simpo"])
def test_orpo_and_simpo_first_step_equal_trl(tmp_path, tok, weights, name):
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    policy, _, _, _ = weights
    _, texts = pair_texts(tok)
    ds, args = pair_dataset(texts), common(tmp_path, len(texts))
    if name == "orpo":
        trainer = ORPOTrainer(model=policy, args=ORPOConfig(beta=0.25, **args), train_dataset=ds, processing_class=tok)
        kw = {"orpo_alpha": 0.25}
    else:
        cpo_args = CPOConfig(loss_type="simpo", beta=2.0, simpo_gamma=0.6, cpo_alpha=0.5, **args)
        trainer = CPOTrainer(model=policy, args=cpo_args, train_dataset=ds, processing_class=tok)
        kw = {"rl_beta": 2.0, "simpo_gamma": 0.6, "cpo_alpha": 0.5}
    batch = pair_batch(tok)
    with torch.no_grad():
        want_loss, want = trainer.get_batch_loss_metrics(trainer.model, trl_pair_batch(batch))
    loss, got = ours(name, batch, weights, "pair_mask", **kw)
    np.testing.assert_allclose(loss, float(want_loss), atol=ATOL, rtol=RTOL)
    keys = [k for k in DPO_KEYS if not k.startswith("logits/")] + ["nll_loss"]  # TRL's logits/* average padding too
    if name == "orpo":
        keys += ["log_odds_ratio", "log_odds_chosen"]
    assert_close(got, want, keys)
    if name == "orpo":  # axolotl hands TRL's beta from trl.beta (then rl_beta, then orpo_alpha)
        loss, _ = ours(name, batch, weights, "pair_mask", rl="orpo", trl={"beta": 0.25})
        np.testing.assert_allclose(loss, float(want_loss), atol=ATOL, rtol=RTOL)
