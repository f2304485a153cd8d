"""Streaming datasets: the same examples as map-style, packing, resume, per-host shards, KD, config errors."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from jaxpref.data import build_lm_data, streaming
from jaxpref.data.chat_templates import shipped_template
from jaxpref.data.packing import pack
from jaxpref.data.preference import build_preference_data
from jaxpref.data.settings import DataSettings
from jaxpref.errors import ConfigError, DataError
from tests.data.helpers import chatml_tokenizer, config, data_settings, dataset, real_rows, write_jsonl
from tests.data.test_kd import K, kd_rows
from tests.data.test_kd import check_batch as check_kd_batch
from tests.data.test_pipeline import KEYS, check_batch, text_rows, tokens
from tests.data.test_preference_pipeline import PAIR_KEYS, check_side, kl_expectations, kto_rows, pairs, sequences

ROW_KEYS = ("input_ids", "labels", "loss_mask")


def lm_config(paths, *, streaming=True, **kw):
    entries = [dataset(path=p, type="completion", streaming=streaming) for p in paths]
    if streaming:
        kw.setdefault("max_steps", 10)
    return config(datasets=entries, **kw)


def lm_data(cfg, **kw):
    return build_lm_data(DataSettings.from_config(cfg), chatml_tokenizer(), **kw)


def segments(batches) -> Counter:
    """Every segment of the batches as a (input_ids, labels, loss_mask) tuple of tuples."""
    out = Counter()
    for batch in batches:
        for b in range(batch["input_ids"].shape[0]):
            seg = batch["segment_ids"][b]
            for s in np.unique(seg[seg > 0]):
                out[tuple(tuple(batch[k][b][seg == s].tolist()) for k in ROW_KEYS)] += 1
    return out


def report_counts(report) -> dict:
    """The report without what depends on the order (first example per reason) or on packing."""
    counts = dataclasses.asdict(report)
    counts["examples"] = sorted(counts["examples"])
    for key in ("sequences", "sequence_len", "name"):
        counts.pop(key)
    return counts


@pytest.fixture
def two_files(tmp_path):
    """Two completion files with bad rows: too long for sequence_len 64, and a missing field."""
    rng = np.random.default_rng(0)
    first = text_rows(rng.integers(5, 61, size=40).tolist()) + [{"text": "x" * 90}, {"other": 1}]
    second = [{"text": f"B{i:02d}" + "z" * (3 + i)} for i in range(15)]
    return [write_jsonl(tmp_path / "a.jsonl", first), write_jsonl(tmp_path / "b.jsonl", second)], first + second


def test_streaming_gives_the_examples_and_report_of_map_style(two_files):
    paths, rows = two_files
    kw = dict(sequence_len=64, micro_batch_size=4, seed=3)
    mapped = lm_data(lm_config(paths, streaming=False, **kw))
    streamed = lm_data(lm_config(paths, **kw))
    want = list(mapped.train_iterator(1))
    got = list(streamed.train_iterator(1))
    for batch in got:
        check_batch(batch, (4, 64))  # T = sequence_len, the map-style keys and dtypes
    assert segments(got) == segments(want) and sum(segments(got).values()) == 55
    assert report_counts(streamed.report) == report_counts(mapped.report)
    assert streamed.report.dropped == {"too_long": 1, "missing_field": 1}
    assert len(got) == 14 and streamed.micro_batches_per_epoch is None  # ceil(55 / 4), the last one padded
    assert not got[-1]["segment_ids"][3:].any()


def test_packing_is_the_map_style_packer_over_the_stream_order(two_files):
    paths, _ = two_files
    kw = dict(sequence_len=64, micro_batch_size=1, seed=3)
    rows_in_order = list(lm_data(lm_config(paths, **kw)).train_iterator(1))  # unpacked: one row per batch
    examples = [{k: b[k][0][b["segment_ids"][0] > 0] for k in ROW_KEYS} for b in rows_in_order]
    packed = list(lm_data(lm_config(paths, sample_packing=True, **kw)).train_iterator(1))
    want = pack(examples, 64, num_bins=streaming.STREAM_PACKING_BINS)
    assert len(packed) == len(want) < len(examples)
    for batch, seq in zip(packed, want):
        check_batch(batch, (1, 64))
        assert batch.keys() == seq.keys()
        for key in seq:
            np.testing.assert_array_equal(batch[key][0], seq[key])
    # the same segments as map-style packing (which packs in its own, globally shuffled, row order)
    mapped = lm_data(lm_config(paths, streaming=False, sample_packing=True, **kw))
    assert segments(packed) == segments(mapped.train_iterator(1))


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("consumed", [1, 2])
def test_resume_mid_stream_and_across_epochs(tmp_path, monkeypatch, packing, consumed):
    monkeypatch.setattr(streaming, "STREAM_PACKING_BINS", 2)  # several packing rounds: resume inside the stream
    path = write_jsonl(tmp_path / "rows.jsonl", text_rows([5 + (7 * i) % 50 for i in range(20)]))
    data = lm_data(lm_config([path], sequence_len=64, sample_packing=packing, micro_batch_size=3, seed=11))
    full = list(data.train_iterator(2))
    assert consumed < len(full) // 2 < len(full) - consumed  # resume early, and about one epoch later
    for start in (consumed, len(full) // 2 + consumed):
        it = data.train_iterator(2)
        for _ in range(start):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        resumed = data.train_iterator(2)
        resumed.set_state(state)
        rest = list(resumed)
        assert len(rest) == len(full) - start
        for a, b in zip(rest, full[start:]):
            for key in KEYS:
                np.testing.assert_array_equal(a[key], b[key])
        assert data.report.rows_in == 40  # the restored report goes on counting


def test_epochs_reshuffle_and_repeat(tmp_path):
    rows = text_rows([8] * 12)
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    data = lm_data(lm_config([path], micro_batch_size=3, seed=7))
    order = [tuple(r) for b in data.train_iterator(2) for r in real_rows(b)]
    assert order[:12] != order[12:]
    assert sorted(order[:12]) == sorted(order[12:]) == sorted(tuple(tokens(r)) for r in rows)
    endless = data.train_iterator()
    assert len([next(endless) for _ in range(20)]) == 20  # 5 epochs and counting


def test_per_host_shards_partition_the_data(two_files):
    paths, _ = two_files
    kw = dict(sequence_len=64, micro_batch_size=2, seed=5)
    whole = segments(lm_data(lm_config(paths, **kw)).train_iterator(1))
    shards = [
        segments(lm_data(lm_config(paths, **kw), shard_index=s, shard_count=3).train_iterator(1)) for s in range(3)
    ]
    assert sum(shards, Counter()) == whole
    assert all(not (set(a) & set(b)) for i, a in enumerate(shards) for b in shards[i + 1 :])
    assert all(17 <= sum(s.values()) <= 20 for s in shards)  # every 3rd row of each file


def test_a_process_without_rows_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", text_rows([8, 9]))
    data = lm_data(lm_config([path]), shard_index=2, shard_count=3)
    with pytest.raises(DataError, match="process 2 of 3 read no rows"):
        next(data.train_iterator())


@pytest.mark.parametrize("fmt,packing", [("a", False), ("a", True), ("b", True)])
def test_kd_rows_through_streaming(tmp_path, fmt, packing):
    tok = chatml_tokenizer()
    tok.chat_template = shipped_template("chatml")
    rows, known = kd_rows(tok, range(12), fmt=fmt)
    rows[5] = {"messages": rows[5]["messages"]}  # no teacher rows: dropped
    path = write_jsonl(tmp_path / "kd.jsonl", rows)
    kw = dict(kd_trainer=True, sequence_len=256, sample_packing=packing, micro_batch_size=2)
    streamed = build_lm_data(data_settings(datasets=[dataset(path=path, type="chat_template", streaming=True)],
                                    max_steps=5, **kw), tok)
    mapped = build_lm_data(data_settings(datasets=[dataset(path=path, type="chat_template")], **kw), tok)
    got = list(streamed.train_iterator(1))
    assert streamed.top_k == K and {b["target_token_ids"].shape for b in got} == {(2, 256, K)}
    assert sum(check_kd_batch(b, known) for b in got) == 11
    assert streamed.report.dropped == {"missing_field": 1} == mapped.report.dropped

    def with_targets(batches):
        out = Counter()
        for batch in batches:
            for b in range(batch["input_ids"].shape[0]):
                seg = batch["segment_ids"][b]
                for s in np.unique(seg[seg > 0]):
                    out[tuple(batch[k][b][seg == s].tobytes() for k in batch)] += 1
        return out

    if not packing:  # identical example arrays, KD targets included
        assert with_targets(got) == with_targets(mapped.train_iterator(1))


@pytest.mark.parametrize("rl", ["dpo", "kto"])
def test_preference_rows_through_streaming(tmp_path, rl):
    rows, type_ = (pairs(9), "chatml.prompt_pairs") if rl == "dpo" else (kto_rows(9), "chatml.ultra")
    path = write_jsonl(tmp_path / "rows.jsonl", rows)

    def build(stream: bool):
        entry = dataset(path=path, type=type_, streaming=stream)
        steps = {"max_steps": 3} if stream else {}
        cfg = config(rl=rl, datasets=[entry], micro_batch_size=2, sequence_len=128, **steps)
        return build_preference_data(DataSettings.from_config(cfg), chatml_tokenizer())

    first = "chosen_" if rl == "dpo" else ""
    got, want = list(build(True).train_iterator(1)), list(build(False).train_iterator(1))
    assert len(got) == len(want) == 5
    for batch in got:
        assert batch[first + "input_ids"].shape == (2, 128)
        if rl == "dpo":
            assert {k: v.dtype.name for k, v in batch.items()} == PAIR_KEYS
            check_side(batch, "rejected_", batch["pair_mask"])
        else:
            kl_expectations(batch)

    def seen(batches):
        return Counter(tuple(s) for b in batches for s in sequences(b, first) if s is not None)

    assert seen(got) == seen(want) and sum(seen(got).values()) == 9


def test_eval_set_is_loaded_in_memory(tmp_path, caplog):
    train = write_jsonl(tmp_path / "train.jsonl", text_rows([8] * 6))
    test = write_jsonl(tmp_path / "test.jsonl", text_rows([9, 10, 11]))
    kw = dict(micro_batch_size=2, eval_batch_size=2)
    streamed = lm_data(config(datasets=[dataset(path=train, type="completion", streaming=True)], max_steps=2,
                              test_datasets=[dataset(path=test, type="completion", streaming=True)], **kw))
    mapped = lm_data(config(datasets=[dataset(path=train, type="completion")],
                            test_datasets=[dataset(path=test, type="completion")], **kw))
    assert "eval sets are loaded in memory" in caplog.text
    assert streamed.has_eval and streamed.eval_report == mapped.eval_report
    for a, b in zip(streamed.eval_batches(), mapped.eval_batches(), strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in KEYS)


def test_bad_row_fraction_is_checked_on_the_first_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "CHECK_AFTER_ROWS", 10)
    rows = [{"text": "ok"} if i % 3 == 0 else {"other": i} for i in range(30)]
    data = lm_data(lm_config([write_jsonl(tmp_path / "bad.jsonl", rows)], micro_batch_size=2))
    with pytest.raises(DataError, match=r"of 10 train rows .* max_bad_row_fraction=0.5"):
        list(data.train_iterator())
    few = lm_data(lm_config([write_jsonl(tmp_path / "few.jsonl", rows[:6])]))
    with pytest.raises(DataError, match="4 of 6 train rows"):  # a finite stream shorter than the check
        list(few.train_iterator(1))


def test_config_errors(tmp_path, caplog):
    path = write_jsonl(tmp_path / "rows.jsonl", text_rows([8] * 4))
    with pytest.raises(ConfigError, match="streaming datasets need max_steps"):
        lm_data(config(datasets=[dataset(path=path, type="completion", streaming=True)]))
    with pytest.raises(ConfigError, match=r"datasets\[1\] set streaming: true and the other"):
        lm_data(config(datasets=[dataset(path=path, type="completion"),
                                 dataset(path=path, type="completion", streaming=True)], max_steps=3))
    with pytest.raises(ConfigError, match="val_set_size needs the dataset's length"):
        lm_data(lm_config([path], val_set_size=2))
    from jaxpref.preprocess import preprocess

    with pytest.raises(ConfigError, match="never prepared ahead"):
        preprocess(lm_config([path]))


def test_plan_steps_without_an_epoch_length():
    from jaxpref.train import plan_steps

    cfg = SimpleNamespace(gradient_accumulation_steps=4, num_epochs=1, max_steps=30)
    assert plan_steps(cfg, None) == (30, 30)
    with pytest.raises(ConfigError, match="need max_steps"):
        plan_steps(SimpleNamespace(gradient_accumulation_steps=1, num_epochs=1, max_steps=None), None)

