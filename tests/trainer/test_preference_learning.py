"""Preference objectives learn the shipped rule-following task (demo/data/pref_*) through the shipped configs.

The task (scripts/build_preference_demo.py): the chosen answer is sorted, the rejected one is not. Each
test runs ``jaxpref.train.run`` on ``configs/{dpo,kto,orpo}.yaml`` (random-init tiny Llama), evaluates the
held-out pairs before training (the trainer's own ``evaluate``, hooked in front of ``fit``) and after it,
and checks that the objective moved the model the right way: the held-out preference goes from chance to
near 1 and the chosen (sorted) answers become more likely. Thresholds sit below the values measured over
seeds (README "Preference training").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import jaxpref.train as train_module
from jaxpref.config import load_config

REPO = Path(__file__).resolve().parents[2]
STEPS = {"max_steps": 60, "warmup_steps": 6}  # the configs run 100


def train_and_eval(name: str, tmp_path: Path, monkeypatch, **overrides: Any) -> tuple[dict, dict]:
    """Held-out eval metrics of ``configs/{name}.yaml`` before training and after it."""
    monkeypatch.chdir(REPO)
    before: dict[str, float] = {}
    real_fit = train_module.fit

    def fit_after_a_first_eval(trainer, data_iter, settings, hooks):
        before.update(trainer.evaluate(hooks.eval_batches()))
        return real_fit(trainer, data_iter, settings, hooks)

    monkeypatch.setattr(train_module, "fit", fit_after_a_first_eval)
    settings = {"output_dir": str(tmp_path / "out"), "save_steps": 10_000, "eval_steps": 10_000, **STEPS, **overrides}
    cfg = load_config(REPO / "configs" / f"{name}.yaml", [f"{k}={v}" for k, v in settings.items()])
    after = train_module.run(cfg, show_progress=False)["eval"]
    print(f"{name} seed {cfg.seed}: before {before}\nafter {after}")  # the measured numbers (pytest -rA)
    return before, after


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_learns_the_rule(tmp_path, monkeypatch, seed):
    before, after = train_and_eval("dpo", tmp_path, monkeypatch, seed=seed)
    # policy == reference before training: every implicit reward is 0; ties count as wrong, as in TRL
    assert before["rewards/chosen"] == before["rewards/rejected"] == before["rewards/accuracies"] == 0
    assert after["rewards/accuracies"] > 0.9
    # the reference is the initial policy, so reward > 0 <=> the answer became more likely than before
    assert after["rewards/chosen"] > 0.1 and after["rewards/rejected"] < 0
    assert after["logps/chosen"] > before["logps/chosen"] + 1.0
    assert after["logps/chosen"] - after["logps/rejected"] > before["logps/chosen"] - before["logps/rejected"] + 5


@pytest.mark.slow
def test_kto_learns_the_rule(tmp_path, monkeypatch):
    before, after = train_and_eval("kto", tmp_path, monkeypatch, seed=0)
    assert before["rewards/chosen"] == before["rewards/rejected"] == before["kl"] == 0
    # held-out: the desirable (sorted) completions end well above the undesirable ones, in implied reward
    # (beta x log-ratio to the reference) and in log-likelihood. Which side moves depends on the run:
    # seed 0 (60 steps) pushes the undesirable ones down (rewards -0.09 / -1.33), seed 42 (100 steps)
    # raises both, the desirable ones more (README "Preference training").
    assert after["rewards/margins"] > 0.5
    gap = after["logps/chosen"] - after["logps/rejected"]
    assert gap > before["logps/chosen"] - before["logps/rejected"] + 1.0


@pytest.mark.slow
def test_orpo_learns_the_rule(tmp_path, monkeypatch):
    before, after = train_and_eval("orpo", tmp_path, monkeypatch, seed=0)
    # ORPO's rewards are beta * mean token log-probs (no reference model)
    assert after["rewards/accuracies"] > max(0.9, before["rewards/accuracies"])
    # ORPO's logps are per-token means; its NLL term is an SFT on the chosen answers
    assert after["logps/chosen"] > before["logps/chosen"] + 2
    assert after["log_odds_ratio"] > before["log_odds_ratio"]
