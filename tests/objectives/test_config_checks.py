"""Config checks of the preference keys: label smoothing where TRL 1.16 ignores it, exo_pair/robust
ranges, rl: ipo vs dpo_loss_type, and TRL's KTO desirable/undesirable weight advice."""

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
        (dict(reward_model=True, center_rewards_coefficient=-0.1), "center_rewards_coefficient: must be >= 0"),
    ],
)
def test_bad_preference_settings_are_config_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        config(**kw)


def test_kto_weight_advice_matches_trl():
    # TRL's own numbers (KTOTrainer, KTO paper Eq. 8): 3 desirable, 2 undesirable, weights 1 / 1.
    msg = kto_weight_advice(3, 2, 1.0, 1.0)
    assert "kto_desirable_weight in [0.67, 0.89]" in msg and "kto_undesirable_weight in [1.13, 1.5]" in msg
    assert kto_weight_advice(3, 2, 0.8, 1.0) is None  # 0.8 * 3 / 2 = 1.2 in [1, 4/3]
    assert kto_weight_advice(3, 2, 1.0, 1.2) is None
    assert kto_weight_advice(4, 4, 1.0, 1.0) is None  # balanced data: no advice
    assert kto_weight_advice(10, 1, 1.0, 0.0) is not None  # 0 is a valid weight, but far off here
