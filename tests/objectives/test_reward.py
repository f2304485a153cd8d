"""Reward models: the score head pools at the last real token, the export loads in transformers as
``LlamaForSequenceClassification`` and gives the same scores, and the objective's Bradley-Terry loss
and metrics equal a float64 computation on transformers' scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxpref import lora, models
from jaxpref.models.reward import add_score_head, load_score_head, save_reward_model, sequence_rewards
from jaxpref.objectives import build_objective
from tests.objectives.helpers import cfg, hf_llama, jit_loss, pair_batch, tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    hf_llama(seed=0).save_pretrained(path)
    model = models.from_pretrained(str(path))
    model.base_dir = str(path)  # for reloading the (untrained) backbone
    return add_score_head(model, seed=3, std=0.5)


def hf_scores(path, ids: np.ndarray, attention: np.ndarray) -> np.ndarray:
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(attention)).logits[:, 0].double().numpy()


def test_export_loads_in_transformers_and_gives_the_same_scores(tmp_path, reward_model):
    tok = tokenizer()
    batch = pair_batch(tok)
    ids = np.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    seg = np.concatenate([batch["chosen_segment_ids"], batch["rejected_segment_ids"]])
    assert tok.pad_token_id == 0 and not (ids[seg > 0] == 0).any()  # pad never inside a sequence
    out = tmp_path / "rm"
    save_reward_model(reward_model, out, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] == 0
    want = hf_scores(out, ids, (seg > 0).astype(np.int64))
    got = np.asarray(sequence_rewards(reward_model, ids, segment_ids=seg))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.std(want) > 1e-2  # distinct scores per sequence
    # the exported head reads back onto the same backbone
    again = load_score_head(models.from_pretrained(reward_model.base_dir), out)
    np.testing.assert_allclose(np.asarray(sequence_rewards(again, ids, segment_ids=seg)), got, atol=1e-6)


def test_reward_objective_equals_bradley_terry_on_transformers_scores(tmp_path, reward_model):
    tok = tokenizer()
    batch = pair_batch(tok)
    batch["pair_mask"][-1] = False  # a padding row must not count
    out = tmp_path / "rm"
    save_reward_model(reward_model, out, pad_token_id=0)
    sc = hf_scores(out, batch["chosen_input_ids"], (batch["chosen_segment_ids"] > 0).astype(np.int64))
    sr = hf_scores(out, batch["rejected_input_ids"], (batch["rejected_segment_ids"] > 0).astype(np.int64))
    m = batch["pair_mask"]
    want_loss = np.mean(np.log1p(np.exp(-(sc - sr)))[m])
    objective = build_objective(cfg(), "reward")
    loss, metrics = jit_loss(objective, reward_model, batch, float(m.sum()))
    np.testing.assert_allclose(loss, want_loss, atol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], np.mean((sc > sr)[m]), atol=1e-6)
    np.testing.assert_allclose(metrics["margin"], np.mean((sc - sr)[m]), atol=1e-5)
    np.testing.assert_allclose(metrics["rewards/chosen"], np.mean(sc[m]), atol=1e-5)
    # center_rewards_coefficient (axolotl's examples/qwen3/reward-model.yaml: 0.01): TRL 1.16's
    # RewardTrainer.compute_loss adds `coef * torch.mean((rewards_chosen + rewards_rejected) ** 2)`
    centring = 0.01 * np.mean(((sc + sr) ** 2)[m])
    assert centring > 1e-3  # large enough for the comparison below to see it
    centred = build_objective(cfg(reward_model=True, center_rewards_coefficient=0.01), "reward")
    loss, _ = jit_loss(centred, reward_model, batch, float(m.sum()))
    np.testing.assert_allclose(loss, want_loss + centring, atol=1e-5)


def test_export_refuses_a_missing_pad_token_and_lora(tmp_path, reward_model):
    from jaxpref.errors import ModelError

    with pytest.raises(ModelError, match="pad_token_id"):
        save_reward_model(reward_model, tmp_path / "a", pad_token_id=None)
    model = models.from_config(reward_model.config, seed=0)
    lora.apply_lora(model, lora.LoraConfig(r=2, alpha=4.0, dropout=0.0, target_modules=("q_proj",)), rngs=_rngs())
    add_score_head(model)
    with pytest.raises(ModelError, match="merge"):
        save_reward_model(model, tmp_path / "b", pad_token_id=0)
    # with LoRA the head trains next to the adapters
    assert isinstance(model.score.kernel, lora.trainable_filter(model))


def _rngs():
    from flax import nnx

    return nnx.Rngs(0)
