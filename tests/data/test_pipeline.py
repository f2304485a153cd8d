"""The Grain pipeline: shift, packing, bucketing, sharding, resume, eval batches, the bad-row report."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from jaxpref.data import build_lm_data
from jaxpref.data.pipeline import shift
from jaxpref.data.settings import DataSettings
from jaxpref.errors import DataError
from tests.data.helpers import IM_END, IM_START, chatml_tokenizer, config, dataset, ids, real_rows, write_jsonl

KEYS = {"input_ids": "int32", "labels": "int32", "loss_mask": "bool", "positions": "int32", "segment_ids": "int32"}


def text_rows(lengths: list[int]) -> list[dict]:
    """Completion rows whose token count (with EOS) is ``length``; the first 3 chars identify the row."""
    return [{"text": f"{i:03d}" + "abcdefghij"[i % 10] * (n - 4)} for i, n in enumerate(lengths)]


def tokens(row: dict) -> list[int]:
    return [*row["text"].encode(), IM_END]


def completion_data(tmp_path, rows, **cfg_kw):
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    kw = {k: cfg_kw.pop(k) for k in ("shard_index", "shard_count", "micro_batch_size") if k in cfg_kw}
    cfg = config(datasets=[dataset(path=path, type="completion")], **cfg_kw)
    return build_lm_data(DataSettings.from_config(cfg), chatml_tokenizer(), **kw)


def epoch(data, num_epochs=1):
    return list(data.train_iterator(num_epochs))


def check_batch(batch, shape):
    assert {k: v.dtype.name for k, v in batch.items()} == KEYS
    assert all(v.shape == shape for v in batch.values())
    ids, labels, mask, pos, seg = (batch[k] for k in ("input_ids", "labels", "loss_mask", "positions", "segment_ids"))
    for b in range(shape[0]):
        for t in range(shape[1]):
            if seg[b, t] == 0:  # padding
                assert ids[b, t] == 0 and not mask[b, t]
                continue
            starts = t == 0 or seg[b, t - 1] != seg[b, t]
            assert pos[b, t] == (0 if starts else pos[b, t - 1] + 1)
            same_next = t + 1 < shape[1] and seg[b, t + 1] == seg[b, t]
            if mask[b, t]:
                assert same_next and labels[b, t] == ids[b, t + 1]  # never crosses a segment
            if not same_next:
                assert not mask[b, t]


def test_shift():
    ex = {"input_ids": np.array([5, 6, 7, 8], np.int32), "trainable": np.array([0, 0, 1, 1], bool)}
    out = shift(ex)
    assert out["input_ids"].tolist() == [5, 6, 7, 8]
    assert out["labels"].tolist() == [6, 7, 8, 0]
    assert out["loss_mask"].tolist() == [False, True, True, False]


def test_packing_keeps_segments_apart_and_every_row_once(tmp_path):
    rng = np.random.default_rng(0)
    rows = text_rows(rng.integers(5, 61, size=50).tolist())
    data = completion_data(tmp_path, rows, sequence_len=64, sample_packing=True, micro_batch_size=4, seed=1)
    batches = epoch(data)
    assert len(batches) == data.micro_batches_per_epoch == -(-data.report.sequences // 4)
    assert data.report.sequences < len(rows)  # rows were actually packed together
    for batch in batches:
        check_batch(batch, (4, 64))
    seen = [r for batch in batches for r in real_rows(batch)]
    assert Counter(map(tuple, seen)) == Counter(tuple(tokens(r)) for r in rows)
    # completion: every position but the last of each row is trainable
    assert sum(int(b["loss_mask"].sum()) for b in batches) == sum(len(tokens(r)) - 1 for r in rows)
    assert data.report.trainable_tokens == sum(len(tokens(r)) - 1 for r in rows)
    assert data.report.tokens == sum(len(tokens(r)) for r in rows)
    assert f"{data.report.sequences} sequences of 64 tokens" in data.report.summary()


def test_bucketing_without_packing(tmp_path):
    lengths = [10, 70, 130, 20, 5, 199, 64, 65, 30, 12]
    data = completion_data(
        tmp_path, text_rows(lengths), sequence_len=160, excess_length_strategy="truncate", micro_batch_size=2, seed=3
    )
    for batch in epoch(data):
        longest = int((batch["segment_ids"] > 0).sum(axis=1).max())
        assert batch["input_ids"].shape[1] == min(160, -(-longest // 64) * 64)
        check_batch(batch, batch["input_ids"].shape)
    assert data.report.truncated == 1 and "sequences of" not in data.report.summary()
    data = completion_data(tmp_path, text_rows(lengths), sequence_len=256, pad_to_sequence_len=True, micro_batch_size=2)
    assert {b["input_ids"].shape for b in epoch(data)} == {(2, 256)}


@pytest.mark.parametrize("packing", [False, True])
def test_shards_partition_each_global_batch(tmp_path, packing):
    rows = text_rows([5 + (7 * i) % 40 for i in range(23)])
    kw = dict(sequence_len=64, sample_packing=packing, seed=5)
    single = epoch(completion_data(tmp_path, rows, micro_batch_size=6, **kw), 2)
    shards = [
        epoch(completion_data(tmp_path, rows, micro_batch_size=2, shard_index=s, shard_count=3, **kw), 2)
        for s in range(3)
    ]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == len(single)
    for step, whole in enumerate(single):
        parts = [s[step] for s in shards]
        assert len({p["input_ids"].shape[1] for p in parts}) == 1  # the same T on every shard
        got = Counter(tuple(r) for p in parts for r in real_rows(p))
        assert got == Counter(tuple(r) for r in real_rows(whole))
    per_epoch = len(single) // 2
    for e in range(2):
        seen = [tuple(r) for s in shards for batch in s[e * per_epoch : (e + 1) * per_epoch] for r in real_rows(batch)]
        assert Counter(seen) == Counter(tuple(tokens(r)) for r in rows)


def test_epochs_reshuffle_deterministically(tmp_path):
    rows = text_rows([8] * 12)
    first = epoch(completion_data(tmp_path, rows, micro_batch_size=3, seed=7), 2)
    again = epoch(completion_data(tmp_path, rows, micro_batch_size=3, seed=7), 2)
    other = epoch(completion_data(tmp_path, rows, micro_batch_size=3, seed=8), 2)
    order = [r for b in first for r in real_rows(b)]
    assert order == [r for b in again for r in real_rows(b)]
    assert order != [r for b in other for r in real_rows(b)]
    assert order[:12] != order[12:] and sorted(order[:12]) == sorted(order[12:])


@pytest.mark.parametrize("consumed", [1, 3, 4, 5, 7])  # per epoch: 4 micro-batches
def test_resume_mid_epoch_and_across_epochs(tmp_path, consumed):
    data = completion_data(
        tmp_path,
        text_rows([6, 9, 12, 7, 30, 8, 11, 10, 5, 14, 13, 6]),
        micro_batch_size=3,
        sample_packing=False,
        sequence_len=64,
        seed=11,
    )
    assert data.micro_batches_per_epoch == 4
    full = epoch(data, 2)
    it = data.train_iterator(2)
    for _ in range(consumed):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = data.train_iterator(2)
    resumed.set_state(state)
    rest = list(resumed)
    assert len(rest) == len(full) - consumed
    for a, b in zip(rest, full[consumed:]):
        for k in KEYS:
            np.testing.assert_array_equal(a[k], b[k])


def test_eval_split_and_padded_eval_batches(tmp_path):
    rows = text_rows([6 + i for i in range(23)])
    shards = [
        completion_data(
            tmp_path, rows, val_set_size=0.2, eval_batch_size=2, micro_batch_size=2, shard_index=s, shard_count=2
        )
        for s in range(2)
    ]
    assert shards[0].eval_report.rows_in == 5 and shards[0].report.rows_in == 18
    evals = [b for d in shards for b in d.eval_batches()]
    assert len(shards[0].eval_batches()) == len(shards[1].eval_batches()) == 2  # ceil(5 / (2 * 2))
    eval_rows = [tuple(r) for b in evals for r in real_rows(b)]
    train_rows = [tuple(r) for b in epoch(shards[0]) + epoch(shards[1]) for r in real_rows(b)]
    assert len(eval_rows) == 5 and Counter(eval_rows + train_rows) == Counter(tuple(tokens(r)) for r in rows)
    empty = [b for batch in evals for b in range(2) if not batch["segment_ids"][b].any()]
    assert len(empty) == 3  # 8 slots, 5 rows
    for batch in evals:
        assert not batch["loss_mask"][batch["segment_ids"] == 0].any()


def test_test_datasets_are_the_eval_set(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", text_rows([8] * 6))
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "zz-test"}])
    cfg = config(
        datasets=[dataset(path=train, type="completion")], test_datasets=[dataset(path=test, type="completion")]
    )
    data = build_lm_data(DataSettings.from_config(cfg), chatml_tokenizer())
    assert data.report.rows_in == 6
    assert [r for b in data.eval_batches() for r in real_rows(b)] == [[*b"zz-test", IM_END]]


def test_no_eval_set_gives_no_eval_batches(tmp_path):
    data = completion_data(tmp_path, text_rows([8] * 3))
    assert data.eval_batches() == [] and not data.has_eval and data.eval_report is None


def test_fractional_and_endless_epochs(tmp_path):
    data = completion_data(tmp_path, text_rows([8] * 4), micro_batch_size=2)
    assert len(epoch(data, 1.5)) == 4
    it = data.train_iterator(None)
    assert len([next(it) for _ in range(7)]) == 7


def test_a_micro_batch_larger_than_the_data_warns(tmp_path, caplog):
    """3 rows and micro_batch_size 8: each batch holds the 3 rows and 5 padding rows; it used to say nothing."""
    with caplog.at_level("WARNING", logger="jaxpref.data.pipeline"):
        data = completion_data(tmp_path, text_rows([8] * 3), micro_batch_size=8)
    expected = "micro_batch_size=8 x 1 process(es) asks for 8 rows per micro-batch, but the training data has 3"
    assert expected in caplog.text
    batch = epoch(data)[0]
    assert batch["input_ids"].shape[0] == 8 and int((batch["segment_ids"].max(axis=1) > 0).sum()) == 3
    caplog.clear()
    with caplog.at_level("WARNING", logger="jaxpref.data.pipeline"):
        completion_data(tmp_path, text_rows([8] * 3), micro_batch_size=3)
    assert "micro_batch_size" not in caplog.text


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


BAD_ROWS = [
    {"conversation": []},  # missing field
    chat("Q", ""),  # empty assistant turn
    chat("Q", "x" * 200),  # too long for sequence_len 64
]


def chat_data(tmp_path, rows, **cfg_kw):
    tok = chatml_tokenizer()
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = config(datasets=[dataset(path=path, type="chat_template")], sequence_len=64, **cfg_kw)
    return build_lm_data(DataSettings.from_config(cfg), tok)


def test_bad_rows_are_counted_and_never_shift_neighbours(tmp_path):
    good = [chat(f"Q{i}", f"A{i}") for i in range(7)]
    rows = good[:3] + BAD_ROWS + good[3:]
    data = chat_data(tmp_path, rows, sample_packing=False)
    report = data.report
    assert (report.rows_in, report.rows_out) == (10, 7)
    assert report.dropped == {"missing_field": 1, "empty_response": 1, "too_long": 1}
    assert "'messages'" in report.examples["missing_field"] and "conversation" in report.examples["missing_field"]
    assert "xxxx" in report.examples["too_long"]
    summary = report.summary()
    assert "10 rows in, 7 kept, 3 dropped" in summary and "too_long" in summary
    kept = Counter(tuple(r) for b in epoch(data) for r in real_rows(b))
    want = [ids(IM_START, f"user\nQ{i}", IM_END, "\n", IM_START, f"assistant\nA{i}", IM_END, "\n") for i in range(7)]
    assert kept == Counter(map(tuple, want))


def test_too_many_bad_rows_is_an_error(tmp_path):
    rows = [chat("Q", "A")] * 4 + BAD_ROWS
    with pytest.raises(DataError) as e:
        chat_data(tmp_path, rows, max_bad_row_fraction=0.25)
    msg = str(e.value)
    assert "3 of 7 train rows" in msg and "max_bad_row_fraction=0.25" in msg
    for reason in ("missing_field", "empty_response", "too_long"):
        assert reason in msg
    chat_data(tmp_path, rows, max_bad_row_fraction=0.5)  # 43% is fine under the default


def test_excess_length_truncate_and_raise(tmp_path):
    rows = [chat("Q", "A"), chat("Q", "x" * 200)]
    data = chat_data(tmp_path, rows, excess_length_strategy="truncate", sample_packing=True)
    assert data.report.truncated == 1 and data.report.rows_out == 2 and data.report.max_length == 64
    batches = epoch(data)
    long_row = [b for b in batches for r in real_rows(b) if len(r) == 64]
    assert long_row
    with pytest.raises(DataError, match="excess_length_strategy is 'raise'"):
        chat_data(tmp_path, rows, excess_length_strategy="raise")


def test_unknown_type_fails_before_loading(tmp_path):
    cfg = config(datasets=[dataset(path="does/not/exist.jsonl", type="sharegpt:chat")])
    with pytest.raises(DataError, match=r"datasets\[0\]: unknown type 'sharegpt:chat'; known types.*chat_template"):
        build_lm_data(DataSettings.from_config(cfg), chatml_tokenizer())
