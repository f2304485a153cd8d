"""Config checks of the preference keys: label smoothing where TRL 1.16 ignores it, exo_pair/robust
ranges (also inside a list of loss types), rl: ipo vs dpo_loss_type, dpo_padding_free (a no-op, as in
TRL 1.16), TRL's KTO desirable/undesirable weight advice, axolotl's beta order (trl.beta, rl_beta, orpo_alpha)
and center_rewards_coefficient."""

from __future__ import annotations

import pytest

from jaxpref.errors import ConfigError
from jaxpref.objectives.kto import kto_weight_advice
from tests.data.helpers import config


@pytest.mark.parametrize(
    "kw, warned",
    [
        (dict(rl="dpo", dpo_label_smoothing=0.1), "no effect with dpo_loss_type sigmoid"),
        (dict(rl="dpo", dpo_loss_type="hinge", dpo_label_smoothing=0.1), "no effect with dpo_loss_type hinge"),
        (dict(rl="ipo", dpo_label_smoothing=0.1), "no effect with dpo_loss_type ipo"),
        (dict(rl="orpo", dpo_label_smoothing=0.1), "no effect with orpo"),
        (dict(rl="kto", micro_batch_size=2, dpo_loss_type="hinge"), "dpo_loss_type has no effect with rl: kto"),
        (dict(rl="simpo", precompute_ref_log_probs=True), "precompute_ref_log_probs has no effect"),
        (dict(rl="dpo", dpo_loss_type="robust", dpo_label_smoothing=0.1), None),
        (dict(rl="dpo", dpo_loss_type="aot", dpo_label_smoothing=0.1), None),
        (dict(rl="simpo", dpo_label_smoothing=0.1), None),
        (dict(rl="dpo", dpo_loss_type=["sigmoid", "sft"], dpo_label_smoothing=0.1), "dpo_loss_type [sigmoid, sft]"),
        (dict(rl="dpo", dpo_loss_type=["sigmoid", "robust"], dpo_label_smoothing=0.1), None),
        (dict(rl="dpo", center_rewards_coefficient=0.01), "center_rewards_coefficient has no effect without"),
        (dict(reward_model=True, center_rewards_coefficient=0.01), None),
    ],
)
def test_label_smoothing_warnings_follow_trl(kw, warned):
    warnings = " | ".join(config(**kw).warnings)
    if warned is None:
        assert "no effect" not in warnings
    else:
        assert warned in warnings


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(rl="dpo", dpo_loss_type="exo_pair"), "exo_pair needs dpo_label_smoothing > 0"),
        (dict(rl="dpo", dpo_loss_type="robust", dpo_label_smoothing=0.5), "robust loss needs a value in"),
        (dict(rl="ipo", dpo_loss_type="hinge"), "rl: ipo is DPO with the ipo loss"),
        (dict(rl="dpo", dpo_loss_type=["sigmoid", "exo_pair"]), "exo_pair needs dpo_label_smoothing > 0"),
        (dict(rl="ipo", dpo_loss_type=["ipo", "sft"]), "rl: ipo is DPO with the ipo loss"),
        (dict(reward_model=True, center_rewards_coefficient=-0.1), "center_rewards_coefficient: must be >= 0"),
    ],
)
def test_bad_preference_settings_are_config_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        config(**kw)


def test_dpo_padding_free_is_a_no_op_as_in_trl():
    """TRL 1.16's DPOTrainer turns ``padding_free`` off (a warning, then standard padding), so axolotl's
    ``dpo_padding_free: true`` trains padded there; jaxpref warns with the reason and trains the same config.
    (tests/objectives/test_trl_parity.py runs TRL with ``padding_free=True`` and checks it falls back.)"""
    cfg = config(rl="dpo", dpo_padding_free=True)
    warned = [w for w in cfg.warnings if w.startswith("ignored: dpo_padding_free")]
    assert len(warned) == 1 and "no effect, as in TRL 1.16 (which turns padding_free off and pads)" in warned[0]
    assert cfg.model_dump() == config(rl="dpo").model_dump()


def test_kto_weight_advice_matches_trl():
    # TRL's own numbers (KTOTrainer, KTO paper Eq. 8): 3 desirable, 2 undesirable, weights 1 / 1.
    msg = kto_weight_advice(3, 2, 1.0, 1.0)
    assert "kto_desirable_weight in [0.67, 0.89]" in msg and "kto_undesirable_weight in [1.13, 1.5]" in msg
    assert kto_weight_advice(3, 2, 0.8, 1.0) is None  # 0.8 * 3 / 2 = 1.2 in [1, 4/3]
    assert kto_weight_advice(3, 2, 1.0, 1.2) is None
    assert kto_weight_advice(4, 4, 1.0, 1.0) is None  # balanced data: no advice
    assert kto_weight_advice(10, 1, 1.0, 0.0) is not None  # 0 is a valid weight, but far off here


@pytest.mark.parametrize(
    "kw, weight",
    [
        (dict(orpo_alpha=0.2), 0.2),
        (dict(rl_beta=0.3), 0.3),  # axolotl: rl_beta before orpo_alpha
        (dict(dpo_beta=0.3), 0.3),  # axolotl's old name for rl_beta
        (dict(trl={"beta": 0.4}), 0.4),  # axolotl: trl.beta first
        (dict(trl={"beta": 0.4}, orpo_alpha=0.4, rl_beta=0.4), 0.4),  # all set, all equal
        ({}, 0.1),  # TRL's ORPOConfig default
    ],
)
def test_orpo_weight_follows_axolotls_beta_order(kw, weight):
    # axolotl core/builders/rl.py: beta = trl.beta, else rl_beta, else orpo_alpha, for every rl type
    cfg = config(rl="orpo", **kw)
    assert cfg.orpo_alpha == weight and cfg.rl_beta == weight  # the objective reads orpo_alpha
    assert not [w for w in cfg.warnings if "orpo_alpha" in w]


@pytest.mark.parametrize(
    "kw, message",
    [
        (
            dict(rl="orpo", rl_beta=0.3, orpo_alpha=0.2),
            r"rl: orpo with rl_beta \(0.3\) and orpo_alpha \(0.2\).*would train with 0.3",
        ),
        (dict(rl="orpo", trl={"beta": 0.3}, orpo_alpha=0.2), r"rl_beta \(0.3\) and orpo_alpha \(0.2\)"),
        (dict(rl="dpo", orpo_alpha=0.2), "axolotl would use orpo_alpha as dpo's beta.*write rl_beta: 0.2"),
        (dict(rl="kto", micro_batch_size=2, orpo_alpha=0.5), "orpo_alpha as kto's beta"),
        (dict(rl="dpo", rl_beta=0.2, trl={"beta": 0.3}), r"trl.beta \(0.3\) and rl_beta \(0.2\) disagree"),
    ],
)
def test_beta_keys_that_would_lose_silently_are_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        config(**kw)


@pytest.mark.parametrize(
    "kw, warned",
    [
        (dict(rl="dpo", rl_beta=0.2, orpo_alpha=0.5), "orpo_alpha has no effect with rl: dpo"),
        (dict(reward_model=True, orpo_alpha=0.5), "orpo_alpha has no effect without rl: orpo"),
    ],
)
def test_unused_orpo_alpha_warns(kw, warned):
    cfg = config(**kw)
    assert warned in " | ".join(cfg.warnings)
    assert cfg.rl_beta == kw.get("rl_beta", 0.1)


def test_trl_beta_is_rl_beta_for_every_preference_objective():
    assert config(rl="dpo", trl={"beta": 0.25}).rl_beta == 0.25
    assert config(rl="simpo", trl={"beta": 2.0}, rl_beta=2.0).rl_beta == 2.0  # agreeing keys are fine
