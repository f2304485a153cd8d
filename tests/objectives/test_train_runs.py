"""``jaxpref.train.run`` end to end for preference objectives (tiny model, two steps).

* a LoRA reward model: the exported directory loads with ``AutoModelForSequenceClassification``
  (adapters merged) and its scores reproduce the run's own final eval metrics;
* DPO with ``precompute_ref_log_probs``: the reference pass runs before training and its log-probs
  are stored next to the prepared data; the first step equals the online (adapter-off) run's.
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxpref.data import build_preference_data
from jaxpref.data.settings import DataSettings
from jaxpref.train import run
from tests.data.helpers import DEMO_MODEL, config
from tests.objectives.helpers import FIXTURES, hf_llama, tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    hf_llama(seed=0).save_pretrained(path)
    return path


def run_config(tmp_path, base_dir, **kw):
    orca = {"path": str(FIXTURES / "orca_dpo_pairs.jsonl"), "type": "chatml.intel"}
    settings = dict(
        base_model=str(base_dir),
        tokenizer_config=str(DEMO_MODEL),
        chat_template="chatml",
        datasets=[orca],
        test_datasets=[orca],
        sequence_len=256,
        micro_batch_size=2,
        max_steps=2,
        eval_steps=2,
        learning_rate=1e-2,
        adapter="lora",
        lora_r=4,
        lora_alpha=8,
        lora_target_linear=True,
        output_dir=str(tmp_path / "out"),
        use_tensorboard=False,
    )
    return config(**{**settings, **kw})


@pytest.mark.slow
def test_lora_reward_model_run_exports_a_sequence_classifier_that_reproduces_its_eval(tmp_path, base_dir):
    c = run_config(tmp_path, base_dir, reward_model=True)
    result = run(c, show_progress=False)
    out = tmp_path / "out"
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.pad_token_id == 0
    margins, correct = [], []
    for batch in build_preference_data(DataSettings.from_config(c), tokenizer()).eval_batches():
        scores = []
        for side in ("chosen_", "rejected_"):
            ids = torch.tensor(batch[side + "input_ids"], dtype=torch.long)
            attention = torch.tensor(batch[side + "segment_ids"] > 0, dtype=torch.long)
            with torch.no_grad():
                scores.append(hf(input_ids=ids, attention_mask=attention).logits[:, 0].double().numpy())
        real = batch["pair_mask"]
        margins += list((scores[0] - scores[1])[real])
        correct += list((scores[0] > scores[1])[real])
    assert len(margins) == 4
    np.testing.assert_allclose(result["eval"]["margin"], np.mean(margins), atol=1e-4)
    np.testing.assert_allclose(result["eval"]["accuracy"], np.mean(correct), atol=1e-6)
    assert abs(np.mean(margins)) > 1e-4  # the head was trained (zero-init it is not; trained it moved)


@pytest.mark.slow
def test_dpo_run_with_precomputed_reference_matches_the_online_run(tmp_path, base_dir):
    results = {}
    for precompute in (False, True):
        c = run_config(
            tmp_path / str(precompute),
            base_dir,
            rl="dpo",
            precompute_ref_log_probs=precompute,
            dataset_prepared_path=str(tmp_path / "prepared"),
            max_steps=2,  # step 2's metrics: the policy has left the reference after step 1
            logging_steps=1,
            eval_steps=None,
            test_datasets=None,
        )
        results[precompute] = run(c, show_progress=False)
    assert len(list((tmp_path / "prepared").glob("ref-logps-*/train.npz"))) == 1
    for split in ("train",):
        for k in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected"):
            np.testing.assert_allclose(results[True][split][k], results[False][split][k], atol=1e-5, err_msg=k)
    assert abs(results[True]["train"]["rewards/margins"]) > 1e-5  # after a step the policy left the reference
