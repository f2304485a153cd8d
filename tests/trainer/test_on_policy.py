"""On-policy distillation (kd_on_policy_ratio, GKD's lmbda): step selection, the rebuilt micro-batches,
config checks, and a short end-to-end run with an in-process teacher."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from jaxpref.config import load_config
from jaxpref.errors import ConfigError
from jaxpref.generation.sampler import SamplingSettings, generate
from jaxpref.on_policy import OnPolicySettings, OnPolicyStep, is_on_policy, on_policy_batches
from tests.trainer.test_kd_demo import CONFIGS, REPO, STUDENT

SEQ = 128


@pytest.fixture(scope="module")
def student():
    from jaxpref import models

    return models.from_config(models.load_model_config(STUDENT), seed=0)


def _packed_batch() -> dict[str, np.ndarray]:
    """2 rows x 64: row 0 packs two sequences, row 1 one; a padding tail in each row."""
    rng = np.random.default_rng(0)
    b, t = 2, 64
    batch = {
        "input_ids": np.zeros((b, t), np.int32),
        "labels": np.zeros((b, t), np.int32),
        "loss_mask": np.zeros((b, t), bool),
        "segment_ids": np.zeros((b, t), np.int32),
        "positions": np.zeros((b, t), np.int32),
    }
    # (row, start, length, prompt length): tokens prompt_len.. are trained
    for seg, (row, start, n, p) in enumerate([(0, 0, 20, 7), (0, 20, 15, 4), (1, 0, 30, 12)]):
        ids = rng.integers(3, 200, n)
        sl = slice(start, start + n)
        batch["input_ids"][row, sl] = ids
        batch["labels"][row, start : start + n - 1] = ids[1:]
        batch["loss_mask"][row, start + p - 1 : start + n - 1] = True
        batch["segment_ids"][row, sl] = 1 + (seg if row == 0 else 0)
        batch["positions"][row, sl] = np.arange(n)
    return batch


def test_step_selection_is_exact_and_stateless():
    for ratio in (0.0, 0.1, 0.25, 1 / 3, 0.5, 0.7, 1.0):
        for steps in (1, 7, 10, 100):
            chosen = [s for s in range(steps) if is_on_policy(s, ratio)]
            assert len(chosen) == math.floor(steps * ratio)
            assert abs(len(chosen) - round(ratio * steps)) <= 1
        assert sum(is_on_policy(s, ratio) for s in range(1000)) == round(ratio * 1000)
        # a function of the step number: a resumed run (starting at step 37) picks the same steps
        assert [is_on_policy(s, ratio) for s in range(37, 80)] == [is_on_policy(s, ratio) for s in range(80)][37:]
    assert [s for s in range(8) if is_on_policy(s, 0.5)] == [1, 3, 5, 7]


def test_rebuilt_batch(student):
    batch = _packed_batch()
    key = jax.random.key(3)
    free = generate(student, [batch["input_ids"][0, :7].tolist()], SamplingSettings(16, temperature=1.0), key=key,
                    batch_size=2)
    stop = free.tokens[0][8]  # ends the first completion early (after at most 9 tokens)
    settings = OnPolicySettings(ratio=1.0, max_new_tokens=16, temperature=1.0, sequence_len=SEQ,
                                stop_token_ids=(stop,))
    (new,), stats = on_policy_batches(student, [batch], settings, key)
    prompts = [batch["input_ids"][0, :7].tolist(), batch["input_ids"][0, 20:24].tolist(),
               batch["input_ids"][1, :12].tolist()]
    expected = generate(student, prompts, settings.sampling, key=key, batch_size=2)
    # 3 sequences > 2 rows: packed first fit in order (row 0: seqs 0 and 1 if they fit, row 1: seq 2)
    assert set(new) == set(batch) and all(new[k].dtype == batch[k].dtype for k in batch)
    assert new["input_ids"].shape[0] == 2 and new["input_ids"].shape[1] % 64 == 0
    seen = []
    for row in range(2):
        seg = new["segment_ids"][row]
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            seen.append((row, where[0], where[-1] + 1))
    assert len(seen) == 3 and stats["on_policy_dropped"] == 0
    for (row, a, e), prompt, completion, ended in zip(seen, prompts, expected.tokens, expected.finished):
        ids = new["input_ids"][row, a:e]
        assert ids.tolist() == prompt + completion
        assert ended == (completion[-1] == stop) and (ended or len(completion) == 16)
        assert new["positions"][row, a:e].tolist() == list(range(e - a))
        # the completion tokens (a stop token included) are trained, the prompt is not
        mask = new["loss_mask"][row, a:e]
        assert np.flatnonzero(mask).tolist() == list(range(len(prompt) - 1, e - a - 1))
        assert new["labels"][row, a : e - 1].tolist() == ids[1:].tolist() and new["labels"][row, e - 1] == 0
    used = new["segment_ids"] > 0
    assert not new["input_ids"][~used].any() and not new["loss_mask"][~used].any()
    assert not new["labels"][~used].any() and not new["positions"][~used].any()
    assert stats["completion_tokens"] == sum(len(c) for c in expected.tokens)
    assert expected.finished[0] and len(expected.tokens[0]) <= 9


def test_one_sequence_per_row_and_one_length_per_step(student):
    """With no more sequences than rows each gets its own row; the step's micro-batches share T."""
    batch = _packed_batch()
    one = {k: v.copy() for k, v in batch.items()}
    one["segment_ids"][0, 20:35] = 0  # row 0 now holds its first sequence only
    one["loss_mask"][0, 20:] = False
    for k in ("input_ids", "labels", "positions"):
        one[k][0, 20:] = 0
    settings = OnPolicySettings(ratio=1.0, max_new_tokens=70, temperature=1.0, sequence_len=SEQ)
    new, _ = on_policy_batches(student, [one, batch], settings, jax.random.key(0))
    assert new[0]["input_ids"].shape == new[1]["input_ids"].shape == (2, SEQ)  # 12 + 70 > 64; capped at SEQ
    assert new[0]["segment_ids"].max(axis=1).tolist() == [1, 1]
    # completions are cut so prompt + completion fits sequence_len
    assert (new[1]["segment_ids"] > 0).sum(axis=1).max() <= SEQ


def test_step_hook_reports_the_same_metrics_every_step(student):
    settings = OnPolicySettings(ratio=0.5, max_new_tokens=4, temperature=0.0, sequence_len=SEQ)
    hook = OnPolicyStep(lambda: student, settings, seed=0)
    batch = _packed_batch()
    off, off_stats = hook(0, [batch])
    on, on_stats = hook(1, [batch])
    assert off[0] is batch and off_stats["on_policy"] == 0 and on_stats["on_policy"] == 1
    assert set(off_stats) == set(on_stats) and on_stats["sampling_seconds"] > 0
    assert hook.steps == 1


def _kd_online(*overrides):
    return load_config(CONFIGS / "sft.yaml", ["kd_trainer=true", f"kd_teacher_model={REPO / 'demo' / 'teacher'}",
                                             *overrides])


def test_config():
    cfg = _kd_online("kd_on_policy_ratio=0.5")
    assert (cfg.kd_on_policy_max_new_tokens, cfg.kd_on_policy_temperature) == (128, 0.9)  # TRL GKDConfig's
    assert _kd_online().kd_on_policy_ratio == 0
    with pytest.raises(ConfigError, match="stored KD targets cannot score"):
        load_config(CONFIGS / "kd.yaml", ["kd_on_policy_ratio=0.5"])
    with pytest.raises(ConfigError, match="kd_on_policy_ratio"):
        _kd_online("kd_on_policy_ratio=1.5")
    with pytest.raises(ConfigError, match="set kd_trainer: true"):
        load_config(CONFIGS / "sft.yaml", ["kd_on_policy_ratio=0.5"])


@pytest.mark.slow
def test_on_policy_run(tmp_path):
    """3 steps of in-process-teacher KD, all on-policy: it runs, logs sampling, and trains on other
    sequences than the off-policy run (a different loss)."""
    from jaxpref.train import run

    common = ["max_steps=3", "micro_batch_size=2", "warmup_steps=0", "datasets.0.split=train[:16]",
              f"sequence_len={SEQ}", "test_datasets=", "use_tensorboard=false", "dataset_processes=1",
              "kd_teacher_top_k=8", "random_init_weights=true", "logging_steps=1",
              "kd_on_policy_max_new_tokens=24", f"base_model={STUDENT}"]
    results = {}
    for ratio in (0.0, 1.0):
        out = tmp_path / f"r{ratio}"
        cfg = _kd_online(*common, f"kd_on_policy_ratio={ratio}", f"output_dir={out}")
        results[ratio] = run(cfg, show_progress=False)
        assert results[ratio]["steps"] == 3
    on = results[1.0]["train"]
    assert on["on_policy"] == 1.0 and on["sampling_seconds"] > 0 and 0 < on["sampling_share"] < 1
    assert on["completion_tokens"] > 0
    assert "on_policy" not in results[0.0]["train"]
    assert on["loss"] != pytest.approx(results[0.0]["train"]["loss"], rel=1e-3)
    logged = [json.loads(x) for x in (tmp_path / "r1.0" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in logged if m["split"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3] and all(m["sampling_seconds"] > 0 for m in train)
