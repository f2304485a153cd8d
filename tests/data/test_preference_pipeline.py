"""The preference pipeline: pair and KTO batches, KL rotation, sharding, resume, bad rows, truncation."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from jaxpref.config import load_config
from jaxpref.data.preference import build_preference_data
from jaxpref.data.settings import DataSettings
from jaxpref.errors import ConfigError, DataError
from tests.data.helpers import (
    DEMO_MODEL,
    IM_END,
    chatml_tokenizer,
    config,
    data_settings,
    dataset,
    llama3_tokenizer,
    write_jsonl,
)

FIXTURES = Path(__file__).parent / "fixtures"
SIDE_KEYS = {"input_ids": "int32", "labels": "int32", "loss_mask": "bool", "positions": "int32", "segment_ids": "int32"}
PAIR_KEYS = {**{f"{s}_{k}": d for s in ("chosen", "rejected") for k, d in SIDE_KEYS.items()}, "pair_mask": "bool"}
KTO_KEYS = {**SIDE_KEYS, **{f"kl_{k}": d for k, d in SIDE_KEYS.items()}, "desirable": "bool", "example_mask": "bool"}


def pairs(n: int, long: int = 0) -> list[dict]:
    """prompt_pairs rows; "p07" / "good07" / "bad07" identify row 7 in the token sequences."""
    return [{"prompt": f"p{i:02d}", "chosen": f"good{i:02d}" + "x" * (long if i == 0 else i), "rejected": f"bad{i:02d}"}
            for i in range(n)]  # fmt: skip


def kto_rows(n: int) -> list[dict]:
    return [{"prompt": f"p{i:02d}", "completion": f"c{i:02d}" + "y" * i, "label": i % 3 != 0} for i in range(n)]


PROMPT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def chatml_ids(text: str) -> list[int]:
    tok = chatml_tokenizer()
    return tok(text, add_special_tokens=False)["input_ids"]


def build(tmp_path, rows, *, rl="dpo", type_="chatml.prompt_pairs", tokenizer=None, **kw):
    split = {k: kw.pop(k) for k in ("shard_index", "shard_count", "micro_batch_size") if k in kw}
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    mbs = split.get("micro_batch_size", 2 if rl == "kto" else 1)  # KTO's KL pairs need two rows
    cfg = config(rl=rl, datasets=[dataset(path=path, type=type_)], micro_batch_size=mbs, **kw)
    return build_preference_data(DataSettings.from_config(cfg), tokenizer or chatml_tokenizer(), **split)


def sequences(batch: dict, prefix: str) -> list[list[int] | None]:
    """The real tokens of each row of one side (None for a padding row)."""
    out = []
    for b in range(batch[prefix + "input_ids"].shape[0]):
        seg = batch[prefix + "segment_ids"][b]
        out.append(batch[prefix + "input_ids"][b][seg > 0].tolist() or None)
    return out


def check_side(batch: dict, prefix: str, row_mask: np.ndarray) -> None:
    ids, labels, mask, pos, seg = (batch[prefix + k] for k in SIDE_KEYS)
    for b in range(ids.shape[0]):
        n = int((seg[b] > 0).sum())
        assert n == 0 or row_mask[b]
        assert seg[b].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert pos[b, :n].tolist() == list(range(n)) and not pos[b, n:].any() and not ids[b, n:].any()
        assert not mask[b, n - 1 :].any() if n else not mask[b].any()
        trained = np.flatnonzero(mask[b])
        np.testing.assert_array_equal(labels[b, trained], ids[b, trained + 1])
        # the trained predictions are one contiguous run that ends at the last token (the EOS)
        if n:
            assert trained.size and trained.tolist() == list(range(trained[0], n - 1))


def test_pair_batches(tmp_path):
    data = build(tmp_path, pairs(5), micro_batch_size=2, seed=3)
    batches = list(data.train_iterator(1))
    assert len(batches) == data.micro_batches_per_epoch == 3
    seen = []
    for batch in batches:
        assert {k: v.dtype.name for k, v in batch.items()} == PAIR_KEYS
        assert {v.shape for k, v in batch.items() if k != "pair_mask"} == {(2, 64)} and batch["pair_mask"].shape == (2,)
        for side in ("chosen_", "rejected_"):
            check_side(batch, side, batch["pair_mask"])
        for chosen, rejected in zip(sequences(batch, "chosen_"), sequences(batch, "rejected_")):
            if chosen is not None:
                seen.append((chosen, rejected))
    assert [b["pair_mask"].tolist() for b in batches][-1] == [True, False]  # 5 pairs, 2 per batch
    want = {(tuple(chatml_ids(PROMPT.format(r["prompt"]) + r["chosen"])) + (IM_END,),
             tuple(chatml_ids(PROMPT.format(r["prompt"]) + r["rejected"])) + (IM_END,)) for r in pairs(5)}  # fmt: skip
    assert {(tuple(c), tuple(r)) for c, r in seen} == want and len(seen) == 5
    # the loss mask covers exactly the predictions of the completion tokens (incl. EOS)
    batch = batches[0]
    prompt_len = len(chatml_ids(PROMPT.format("p00")))
    for b in range(2):
        n = int(batch["rejected_segment_ids"][b].sum())
        assert np.flatnonzero(batch["rejected_loss_mask"][b]).tolist() == list(range(prompt_len - 1, n - 1))
    report = data.report
    assert (report.rows_in, report.rows_out, report.sequences) == (5, 5, 5)
    assert report.trainable_tokens == sum(
        int(b[f"{s}_loss_mask"].sum()) for b in batches for s in ("chosen", "rejected")
    )
    assert report.tokens == sum(int((b[f"{s}_segment_ids"] > 0).sum()) for b in batches for s in ("chosen", "rejected"))


def test_bucketing_and_pad_to_sequence_len(tmp_path):
    data = build(tmp_path, pairs(4, long=100), micro_batch_size=4, sequence_len=256)
    assert {b["chosen_input_ids"].shape for b in data.train_iterator(1)} == {(4, 192)}  # longest 132 -> 192
    data = build(tmp_path, pairs(4), micro_batch_size=4, sequence_len=256, pad_to_sequence_len=True)
    assert {b["rejected_input_ids"].shape for b in data.train_iterator(1)} == {(4, 256)}


def kl_expectations(batch: dict) -> None:
    """kl row i = prompt of row i + completion of row i-1 among the real rows (cyclic)."""
    matched = sequences(batch, "")
    real = [m for m in matched if m is not None]
    split = []
    for m, mask in zip(real, batch["loss_mask"]):
        start = int(np.flatnonzero(mask)[0]) + 1  # first completion token
        split.append((m[:start], m[start:]))
    want = [split[i][0] + split[i - 1][1] for i in range(len(split))]
    assert [k for k in sequences(batch, "kl_") if k is not None] == want
    assert batch["example_mask"].tolist() == [m is not None for m in matched]


def test_kto_batches_rotate_completions_within_the_micro_batch(tmp_path):
    data = build(
        tmp_path, kto_rows(7), rl="kto", type_="llama3.ultra", tokenizer=llama3_tokenizer(), micro_batch_size=3
    )
    batches = list(data.train_iterator(1))
    assert len(batches) == 3 and [b["example_mask"].tolist() for b in batches][-1] == [True, False, False]
    labels = {}
    for batch in batches:
        assert {k: v.dtype.name for k, v in batch.items()} == KTO_KEYS
        check_side(batch, "", batch["example_mask"])
        check_side(batch, "kl_", batch["example_mask"])
        kl_expectations(batch)
        for seq, desirable in zip(sequences(batch, ""), batch["desirable"]):
            if seq is not None:
                labels[bytes(t for t in seq if t < 256).decode().split("\n\n")[-1]] = bool(desirable)
    assert labels == {f"c{i:02d}" + "y" * i: i % 3 != 0 for i in range(7)}
    # the single real row of the last batch is its own mismatched pair (TRL's rotation of a 1-row chunk)
    last = batches[-1]
    np.testing.assert_array_equal(last["kl_input_ids"][0], last["input_ids"][0])
    assert not last["desirable"][1:].any()


def test_kto_kl_sequences_are_cut_to_sequence_len(tmp_path):
    rows = [
        {"prompt": "p" * 40, "completion": "c", "label": True},
        {"prompt": "q", "completion": "d" * 40, "label": False},
    ]
    data = build(tmp_path, rows, rl="kto", type_="chatml.prompt_pairs", micro_batch_size=2, sequence_len=64)
    (batch,) = list(data.train_iterator(1))
    assert batch["kl_input_ids"].shape == (2, 64) and (batch["kl_segment_ids"] > 0).sum(axis=1).max() == 64
    kl_expectations_cut = sequences(batch, "kl_")
    assert all(len(k) <= 64 for k in kl_expectations_cut)


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_shards_partition_each_global_batch_and_share_t(tmp_path, kind):
    rows, kw = (pairs(11), {}) if kind == "dpo" else (kto_rows(11), {"rl": "kto", "type_": "chatml.ultra"})
    single = list(build(tmp_path, rows, micro_batch_size=6, seed=5, **kw).train_iterator(2))
    shards = [
        list(build(tmp_path, rows, micro_batch_size=2, shard_index=s, shard_count=3, seed=5, **kw).train_iterator(2))
        for s in range(3)
    ]
    first = "chosen_" if kind == "dpo" else ""
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == len(single) == 4
    for step, whole in enumerate(single):
        parts = [s[step] for s in shards]
        assert len({p[first + "input_ids"].shape for p in parts}) == 1
        got = Counter(tuple(r) for p in parts for r in sequences(p, first) if r is not None)
        assert got == Counter(tuple(r) for r in sequences(whole, first) if r is not None)
        if kind == "kto":
            for p in parts:
                kl_expectations(p)


def test_resume_mid_epoch(tmp_path):
    data = build(tmp_path, kto_rows(10), rl="kto", type_="chatml.ultra", micro_batch_size=3, seed=11)
    full = list(data.train_iterator(2))
    it = data.train_iterator(2)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = data.train_iterator(2)
    resumed.set_state(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 5
    for a, b in zip(rest, full[5:]):
        for k in KTO_KEYS:
            np.testing.assert_array_equal(a[k], b[k])


def test_eval_split(tmp_path):
    data = build(tmp_path, pairs(9), micro_batch_size=2, eval_batch_size=2, val_set_size=3)
    assert data.has_eval and data.eval_report.rows_in == 3 and data.report.rows_in == 6
    evals = data.eval_batches()
    assert [b["pair_mask"].tolist() for b in evals] == [[True, True], [True, False]]
    check_side(evals[1], "chosen_", evals[1]["pair_mask"])


BAD = [
    {"prompt": "p", "chosen": "c"},  # missing rejected
    {"prompt": "p", "chosen": " ", "rejected": "r"},  # empty response
    {"prompt": "p", "chosen": "same", "rejected": "same"},  # identical
    {"prompt": "p", "chosen": "c" * 100, "rejected": "r"},  # too long for sequence_len 64
]


def test_bad_rows_are_counted(tmp_path):
    data = build(tmp_path, pairs(6) + BAD, sequence_len=64)
    report = data.report
    assert (report.rows_in, report.rows_out) == (10, 6)
    assert report.dropped == {"missing_field": 1, "empty_response": 1, "identical_responses": 1, "too_long": 1}
    assert "'rejected'" in report.examples["missing_field"]
    with pytest.raises(DataError, match="4 of 10 train rows"):
        build(tmp_path, pairs(6) + BAD, sequence_len=64, max_bad_row_fraction=0.3)
    # KTO: a null label and (in a dataset of its own: JSON columns have one type) an integer label
    good = write_jsonl(tmp_path / "kto.jsonl", kto_rows(5) + [{"prompt": "p", "completion": "c", "label": None}])
    ints = write_jsonl(tmp_path / "ints.jsonl", [{"prompt": "p", "completion": "c", "label": 1}])
    kto_sets = [dataset(path=good, type="chatml.ultra"), dataset(path=ints, type="chatml.ultra")]
    cfg = config(rl="kto", datasets=kto_sets, micro_batch_size=2)
    report = build_preference_data(DataSettings.from_config(cfg), chatml_tokenizer()).report
    assert report.dropped == {"missing_field": 1, "bad_label": 1}


def test_truncate_keeps_the_start_as_trl(tmp_path):
    rows = pairs(3) + [
        {"prompt": "p", "chosen": "c" * 100, "rejected": "r"},
        {"prompt": "q" * 80, "chosen": "c", "rejected": "r"},
    ]
    data = build(tmp_path, rows, sequence_len=64, excess_length_strategy="truncate", micro_batch_size=5)
    assert data.report.dropped == {"too_long": 1} and data.report.truncated == 1
    assert "prompt alone" in data.report.examples["too_long"]
    (batch,) = list(data.train_iterator(1))
    long_row = next(b for b, c in enumerate(sequences(batch, "chosen_")) if c and len(c) == 64)
    full = chatml_ids(PROMPT.format("p") + "c" * 100) + [IM_END]
    assert sequences(batch, "chosen_")[long_row] == full[:64]  # keep_start: prompt, then the completion's start
    assert batch["chosen_loss_mask"][long_row].sum() == 64 - len(chatml_ids(PROMPT.format("p")))
    with pytest.raises(DataError, match="excess_length_strategy is 'raise'"):
        build(tmp_path, rows, sequence_len=64, excess_length_strategy="raise")


def test_reward_model_builds_pairs_and_rl_is_required(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", pairs(3))
    cfg = config(reward_model=True, datasets=[dataset(path=path, type="chatml.prompt_pairs")])
    data = build_preference_data(DataSettings.from_config(cfg), chatml_tokenizer())
    assert "pair_mask" in next(data.train_iterator(1))
    with pytest.raises(ConfigError, match="needs `rl`"):
        unlabelled = data_settings(datasets=[dataset(path=path, type="chatml.prompt_pairs")])
        build_preference_data(unlabelled, chatml_tokenizer())


def test_unknown_type_fails_before_loading(tmp_path):
    cfg = config(rl="orpo", datasets=[dataset(path="does/not/exist.jsonl", type="chat_template")])
    with pytest.raises(DataError, match=r"datasets\[0\]: unknown type 'chat_template'.*known types for preference: "):
        build_preference_data(DataSettings.from_config(cfg), chatml_tokenizer())


def test_user_defined_mapping_type_from_raw_entries(tmp_path):
    # The schema's DatasetConfig.type is a string; a raw (YAML) entry with a mapping `type` works.
    path = write_jsonl(tmp_path / "rows.jsonl", [{"q": f"Q{i}", "a": f"A{i}", "b": f"B{i}"} for i in range(4)])
    entry = {"path": path, "type": {"field_prompt": "q", "field_chosen": "a", "field_rejected": "b",
                                    "prompt_format": "Question: {q}\nAnswer: "}}  # fmt: skip
    cfg = SimpleNamespace(**{**dict(config()), "rl": "dpo", "datasets": [entry]})
    data = build_preference_data(DataSettings.from_config(cfg), chatml_tokenizer(), micro_batch_size=4)
    (batch,) = list(data.train_iterator(1))
    assert sorted(sequences(batch, "chosen_")) == [
        chatml_ids(f"Question: Q{i}\nAnswer: A{i}") + [IM_END] for i in range(4)
    ]


def test_seed_example_local_dataset_yaml(tmp_path):
    # seed-examples/local_dataset.yaml: ds_type json, data_files next to the config, type chatml.intel
    shutil.copy(FIXTURES / "orca_dpo_pairs.jsonl", tmp_path / "orca_rlhf.jsonl")
    seed = {
        "datasets": [{"ds_type": "json", "data_files": ["orca_rlhf.jsonl"], "split": "train", "type": "chatml.intel"}]
    }
    base = {
        "base_model": str(DEMO_MODEL),
        "rl": "dpo",
        "learning_rate": 1e-5,
        "micro_batch_size": 2,
        "sequence_len": 256,
    }
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump({**base, **seed}))
    cfg = load_config(tmp_path / "dpo.yaml")
    data = build_preference_data(DataSettings.from_config(cfg), chatml_tokenizer())
    assert data.report.rows_out == 4 and data.micro_batches_per_epoch == 2
    chosen = [c for b in data.train_iterator(1) for c in sequences(b, "chosen_") if c]
    sys_turn = chatml_ids("<|im_start|>system\nYou are an AI assistant. You will be given a task.<|im_end|>\n")
    assert sum(c[: len(sys_turn)] == sys_turn for c in chosen) == 1
