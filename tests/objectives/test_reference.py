"""Reference-model handling and accumulation of the preference objectives.

* the adapter-off reference (LoRA, ``rl_adapter_ref_model: false``) equals a separately loaded frozen
  base model (``rl_adapter_ref_model: true``), loss and metrics;
* precomputed reference log-probs (``precompute_ref_log_probs``) equal the online ones, for pairs and
  KTO; they are stored next to the prepared data and reused, keyed by the model;
* gradient accumulation 2 x 2 pairs gives the same update as 1 x 4 (DPO, frozen-copy reference).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxpref import lora, models
from jaxpref import sharding as shd
from jaxpref.data import build_preference_data
from jaxpref.data.settings import DataSettings
from jaxpref.objectives import build_objective
from jaxpref.reference_pass import precompute_reference
from jaxpref.trainer import Trainer
from tests.data.helpers import config
from tests.objectives.helpers import FIXTURES, cfg, hf_llama, jit_loss, pair_batch, tokenizer

LORA = lora.LoraConfig(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj", "up_proj", "down_proj"))


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    hf_llama(seed=0).save_pretrained(path)
    return path


def lora_policy(base_dir, seed: int = 0):
    """The base model with LoRA adapters whose B is random (so the policy differs from the base)."""
    model = models.from_pretrained(str(base_dir))
    lora.apply_lora(model, LORA, rngs=nnx.Rngs(seed))
    key = jax.random.key(seed + 1)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.LoRAParam) and str(path[-1]) == "lora_b":
            key, sub = jax.random.split(key)
            var.set_value(0.05 * jax.random.normal(sub, var.shape, var.dtype))
    return model


def run_loss(objective, model, batch, count_key, companions=None):
    return jit_loss(objective, model, batch, float(np.sum(batch[count_key])), companions)


@pytest.mark.parametrize("name", ["dpo", "kto"])
def test_adapter_off_reference_equals_a_separate_frozen_copy(tok, base_dir, name):
    from tests.objectives.helpers import kto_batch

    policy = lora_policy(base_dir)
    batch, key = (pair_batch(tok), "pair_mask") if name == "dpo" else (kto_batch(tok), "example_mask")
    adapter_off = build_objective(cfg(adapter="lora"), name)
    frozen = build_objective(cfg(adapter="lora", rl_adapter_ref_model=True), name)
    assert adapter_off.reference == "adapter_off" and not adapter_off.companions
    assert frozen.companions == ("reference",)
    got = run_loss(adapter_off, policy, batch, key)
    want = run_loss(frozen, policy, batch, key, companions={"reference": models.from_pretrained(str(base_dir))})
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)
    for k in want[1]:
        np.testing.assert_allclose(got[1][k], want[1][k], atol=1e-5, err_msg=k)
    assert abs(want[1]["rewards/chosen"]) > 1e-3  # the adapters really moved the policy off the reference


def data_config(tmp_path, rl: str, **kw):
    fixture, type_ = (
        ("orca_dpo_pairs.jsonl", "chatml.intel") if rl != "kto" else ("ultrafeedback_kto.jsonl", "llama3.ultra")
    )
    return config(
        rl=rl,
        adapter="lora",
        lora_r=4,
        lora_alpha=8,
        lora_target_modules=list(LORA.target_modules),
        datasets=[{"path": str(FIXTURES / fixture), "type": type_}],
        test_datasets=[{"path": str(FIXTURES / fixture), "type": type_}],
        sequence_len=256,
        micro_batch_size=2,
        dataset_prepared_path=str(tmp_path / "prepared"),
        precompute_ref_log_probs=True,
        **kw,
    )


@pytest.mark.slow
@pytest.mark.parametrize("rl", ["dpo", "kto"])
def test_precomputed_reference_equals_online_and_is_cached(tmp_path, tok, base_dir, rl, caplog):
    c = data_config(tmp_path, rl)
    mesh = shd.make_mesh(None)
    policy = lora_policy(base_dir)
    data = build_preference_data(DataSettings.from_config(c), tok)
    precompute_reference(c, data, policy, mesh, tok)
    precomputed = build_objective(c, rl)
    online = build_objective(c.model_copy(update={"precompute_ref_log_probs": False}), rl)
    assert precomputed.reference == "precomputed" and online.reference == "adapter_off"
    key = "pair_mask" if rl == "dpo" else "example_mask"
    ref_keys = ("ref_chosen_logps", "ref_rejected_logps") if rl == "dpo" else ("ref_logps", "ref_kl_logps")
    batches = [b for _, b in zip(range(data.micro_batches_per_epoch), data.train_iterator(1))] + data.eval_batches()
    assert len(batches) >= 4
    for batch in batches:
        assert all(k in batch for k in ref_keys)
        got, want = run_loss(precomputed, policy, batch, key), run_loss(online, policy, batch, key)
        np.testing.assert_allclose(got[0], want[0], atol=1e-5)
        for k in want[1]:
            np.testing.assert_allclose(got[1][k], want[1][k], atol=1e-4, err_msg=k)
    if rl == "kto":  # fixed mismatched partners: the previous example's completion, cyclically
        ex = data.examples("train")
        assert all(np.array_equal(ex[i]["kl_completion_ids"], ex[i - 1]["completion_ids"]) for i in range(len(ex)))

    stored = sorted(p.name for p in (tmp_path / "prepared").glob("ref-logps-*/*.npz"))
    assert stored == ["eval.npz", "train.npz"]
    values = [e[ref_keys[0]] for e in data.examples("train")]
    # A second run with the same data and model reads them back, even if the live weights differ
    # (the key is the model's checkpoint and dtypes, not its values): proof that it is the cache.
    data2 = build_preference_data(DataSettings.from_config(c), tok)
    with caplog.at_level(logging.INFO, logger="jaxpref.reference_pass"):
        precompute_reference(c, data2, lora_policy(base_dir, seed=5), mesh, tok)
    assert "using the reference log-probs" in caplog.text
    assert [e[ref_keys[0]] for e in data2.examples("train")] == values
    # Another model (a different checkpoint) misses the cache.
    other = tmp_path / "other"
    hf_llama(seed=3).save_pretrained(other)
    c3 = c.model_copy(update={"base_model": str(other)})
    data3 = build_preference_data(DataSettings.from_config(c3), tok)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jaxpref.reference_pass"):
        precompute_reference(c3, data3, models.from_pretrained(str(other)), mesh, tok)
    assert "precomputing reference log-probs" in caplog.text
    assert [e[ref_keys[0]] for e in data3.examples("train")] != values


def split_pairs(batch: dict, parts: int) -> list[dict]:
    n = batch["pair_mask"].shape[0] // parts
    return [{k: v[i * n : (i + 1) * n] for k, v in batch.items()} for i in range(parts)]


@pytest.mark.slow
def test_dpo_gradient_accumulation_2x2_equals_1x4(tok, base_dir):
    batch = pair_batch(tok)
    assert batch["pair_mask"].sum() == 4
    objective = build_objective(cfg(dpo_loss_type="sigmoid"), "dpo")
    mesh = shd.make_mesh(None)
    updates, stats = [], []
    for micro in ([batch], split_pairs(batch, 2)):
        model = models.from_pretrained(str(base_dir))
        before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
        reference = hf_reference(base_dir)
        trainer = Trainer(model, objective, optax.sgd(1.0), mesh=mesh, companions={"reference": reference})
        stats.append(trainer.train_step(micro))
        after = jax.tree.map(np.asarray, trainer.params)
        updates.append(jax.tree.map(lambda a, b: a - b, after, before))
    flat_a, flat_b = jax.tree.leaves(updates[0]), jax.tree.leaves(updates[1])
    scale = max(float(np.abs(a).max()) for a in flat_a)
    assert scale > 1e-4  # a real update
    for a, b in zip(flat_a, flat_b):
        np.testing.assert_allclose(a, b, atol=1e-5 * scale)
    for k in ("loss", "rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        np.testing.assert_allclose(stats[0][k], stats[1][k], rtol=1e-5, atol=1e-5, err_msg=k)


def hf_reference(base_dir):
    """A frozen reference that differs from the policy (another random model), so rewards are not 0."""
    path = base_dir.parent / "reference_seed1"
    if not path.exists():
        hf_llama(seed=1).save_pretrained(path)
    return models.from_pretrained(str(path))


def test_reference_mode_follows_the_config():
    from jaxpref.objectives.preference import reference_mode

    assert reference_mode(cfg()) == "model"
    assert reference_mode(cfg(adapter="lora")) == "adapter_off"
    assert reference_mode(cfg(adapter="lora", rl_adapter_ref_model=True)) == "model"
    assert reference_mode(cfg(adapter="lora", precompute_ref_log_probs=True)) == "precomputed"
    assert reference_mode(cfg(), uses_reference=False) == "none"
    assert not build_objective(cfg(), "orpo").companions and not build_objective(cfg(), "simpo").companions


def test_reference_copy_is_built_frozen_without_adapters_in_rl_reference_dtype(base_dir):
    from jaxpref.assembly import build_companions
    from tests.data.helpers import DEMO_MODEL

    c = config(
        base_model=str(base_dir),
        tokenizer_config=str(DEMO_MODEL),
        rl="dpo",
        adapter="lora",
        lora_r=4,
        lora_alpha=8,
        lora_target_linear=True,
        rl_adapter_ref_model=True,
        rl_reference_dtype="bfloat16",
    )
    assert build_objective(c, "dpo").companions == ("reference",)
    reference = build_companions(c, ("reference",), 512, shd.make_mesh(None))["reference"]
    assert reference.lora_config is None
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(reference, nnx.Param))}
    assert dtypes == {jnp.dtype("bfloat16")}
    base = models.from_pretrained(str(base_dir))
    np.testing.assert_allclose(
        np.asarray(reference.lm_head.kernel[...], np.float32), np.asarray(base.lm_head.kernel[...]), rtol=1e-2
    )
