"""``dataset_exact_deduplication`` against axolotl's rules (utils/data/utils.py ``deduplicate_and_log_datasets``,
called by utils/data/sft.py on the tokenized rows of each split and before the val_set_size split, and by
utils/data/rl.py on the formatted rows, with the eval set checked against the training set): the first
occurrence of each distinct example is kept, the others are dropped and counted as ``duplicate``.

The reference for "distinct" is computed here independently of ``dedup.py``: the examples of the same run
without deduplication, compared as Python tuples.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from jaxpref.data import build_lm_data, build_preference_data, load_tokenizer
from jaxpref.data import pipeline as pipeline_module
from jaxpref.data.cache import PreparedCache
from jaxpref.data.dedup import ExactDuplicates, example_digest
from jaxpref.data.settings import DataSettings
from jaxpref.errors import DataError
from tests.data.helpers import chatml_tokenizer, config, data_settings, dataset, write_jsonl
from tests.data.test_kd import kd_data, kd_rows

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def chat(q: str, a: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **extra}


def tokenizer():
    tok = chatml_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def lm(tmp_path, entries: list[dict], *, test: list[dict] | None = None, **kw):
    """LM data of ``entries`` (dataset entries with a ``rows`` key instead of a path)."""

    def write(name: str, es: list[dict]) -> list[dict]:
        out = []
        for i, e in enumerate(es):
            e = dict(e)
            path = write_jsonl(tmp_path / f"{name}{i}.jsonl", e.pop("rows"))
            out.append(dataset(path=path, type="chat_template", **e))
        return out

    extra = {"test_datasets": write("test", test)} if test else {}
    cfg = config(datasets=write("train", entries), sequence_len=kw.pop("sequence_len", 64), **extra, **kw)
    return build_lm_data(DataSettings.from_config(cfg), tokenizer())


def segments(batches) -> list[tuple]:
    """Every segment of the batches as (input_ids, loss_mask) tuples."""
    out = []
    for batch in batches:
        for b in range(batch["input_ids"].shape[0]):
            seg = batch["segment_ids"][b]
            for s in np.unique(seg[seg > 0]):
                keep = seg == s
                out.append((tuple(batch["input_ids"][b][keep]), tuple(batch["loss_mask"][b][keep])))
    return out


def train_segments(data) -> list[tuple]:
    return segments(data.train_iterator(1))


def eval_segments(data) -> list[tuple]:
    return segments(data.eval_batches())


# 10 rows: one repeated three times, one repeated with a column the format does not read, two that differ
# only after sequence_len (truncated to the same example), and four distinct ones.
ROWS = [
    chat("Q", "A"),
    chat("Q", "A"),
    chat("Q", "A"),
    chat("R", "B"),
    chat("R", "B", source="another crawl"),
    chat("long", "x" * 80 + "1"),
    chat("long", "x" * 80 + "2"),
    *[chat(f"Q{i}", f"A{i}") for i in range(3)],
]


def test_sft_drops_repeated_examples_and_counts_them(tmp_path):
    plain = lm(tmp_path, [{"rows": ROWS}], excess_length_strategy="truncate")
    dedup = lm(tmp_path, [{"rows": ROWS}], excess_length_strategy="truncate", dataset_exact_deduplication=True)
    everything = train_segments(plain)
    assert len(everything) == 10
    # The reference: each distinct example once (axolotl keeps the first of each).
    assert Counter(train_segments(dedup)) == Counter(set(everything))
    assert len(set(everything)) == 6
    report = dedup.report
    assert (report.rows_in, report.rows_out, report.dropped) == (10, 6, {"duplicate": 4})
    assert report.truncated == 1  # the kept one of the two truncated rows
    assert "the same example as an earlier row" in report.examples["duplicate"]
    assert "dropped 4 x duplicate" in report.summary()
    assert plain.report.dropped == {} and plain.report.rows_out == 10  # off by default


def test_other_trainable_tokens_are_not_duplicates(tmp_path):
    # The same conversations under roles_to_train [user, assistant]: other labels, other examples (axolotl
    # hashes input_ids and labels). Within each entry the repeats go.
    entries = [{"rows": ROWS[:3]}, {"rows": ROWS[:3], "roles_to_train": ["user", "assistant"]}]
    data = lm(tmp_path, entries, dataset_exact_deduplication=True)
    kept = train_segments(data)
    assert len(kept) == 2 and kept[0][0] == kept[1][0] and kept[0][1] != kept[1][1]
    assert data.report.dropped == {"duplicate": 4}


def test_duplicates_are_not_bad_rows(tmp_path):
    rows = [chat("Q", "A")] * 8 + [chat("Q2", "A2"), {"conversation": []}]
    data = lm(tmp_path, [{"rows": rows}], dataset_exact_deduplication=True, max_bad_row_fraction=0.2)
    report = data.report
    assert report.dropped == {"duplicate": 7, "missing_field": 1} and report.rows_out == 2
    assert report.bad_rows == 1 and report.bad_fraction == 0.1  # 80% dropped, 10% bad: no error
    with pytest.raises(DataError, match="1 of 10 train rows"):
        lm(tmp_path, [{"rows": rows}], dataset_exact_deduplication=True, max_bad_row_fraction=0.05)


def test_val_set_size_split_shares_no_example_with_training(tmp_path):
    # axolotl deduplicates before it splits: the eval split never repeats a training example.
    rows = [chat(f"Q{i % 4}", f"A{i % 4}") for i in range(12)] + [chat(f"U{i}", "x") for i in range(8)]
    data = lm(tmp_path, [{"rows": rows}], val_set_size=0.4, seed=3, dataset_exact_deduplication=True)
    train, evals = train_segments(data), eval_segments(data)
    assert len(set(train)) == len(train) and len(set(evals)) == len(evals)
    assert not set(train) & set(evals)
    assert set(train) | set(evals) == set(train_segments(lm(tmp_path, [{"rows": rows}])))  # all 12 distinct ones
    assert data.report.rows_in + data.eval_report.rows_in == 20
    dropped = data.report.dropped.get("duplicate", 0) + data.eval_report.dropped.get("duplicate", 0)
    assert dropped == 8 and data.eval_report.dropped.get("duplicate", 0) > 0  # seed 3 puts repeats in eval


def test_sft_test_datasets_are_deduplicated_but_may_overlap_training(tmp_path):
    # axolotl's SFT loader deduplicates test_datasets on their own, not against the training rows.
    test = [chat("Q0", "A0"), chat("Q0", "A0"), chat("T", "only in test")]
    data = lm(tmp_path, [{"rows": ROWS[7:]}], test=[{"rows": test}], dataset_exact_deduplication=True)
    assert data.eval_report.dropped == {"duplicate": 1} and data.eval_report.rows_out == 2
    assert set(eval_segments(data)) & set(train_segments(data))  # Q0/A0 is in both


def pairs(rows):
    return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows]


def preference(tmp_path, rows, *, test=None, rl="dpo", type_="chatml.prompt_pairs", **kw):
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    extra = {}
    if test is not None:
        extra["test_datasets"] = [dataset(path=write_jsonl(tmp_path / "test.jsonl", test), type=type_)]
    mbs = 2 if rl == "kto" else 1
    cfg = config(rl=rl, datasets=[dataset(path=path, type=type_)], micro_batch_size=mbs, **extra, **kw)
    return build_preference_data(DataSettings.from_config(cfg), chatml_tokenizer())


def test_preference_pairs_and_eval_against_training(tmp_path):
    rows = pairs([("p", "good", "bad"), ("p", "good", "bad"), ("p", "good", "worse"), ("q", "good", "bad")])
    rows.append({"prompt": "p", "chosen": "good", "rejected": "bad", "id": 5})  # an extra column: a duplicate
    test = pairs([("p", "good", "bad"), ("new", "a", "b"), ("new", "a", "b")])
    data = preference(tmp_path, rows, test=test, dataset_exact_deduplication=True)
    assert data.report.dropped == {"duplicate": 2} and data.report.rows_out == 3
    # axolotl's RL loader checks the eval set against the training set: (p, good, bad) goes from eval.
    assert data.eval_report.dropped == {"duplicate": 2} and data.eval_report.rows_out == 1
    digests = [example_digest(e) for e in data.examples("train")]
    assert len(set(digests)) == 3
    plain = preference(tmp_path, rows, test=test)
    assert plain.report.rows_out == 5 and plain.eval_report.rows_out == 3


def test_kto_label_is_part_of_the_example(tmp_path):
    row = {"prompt": "p", "completion": "c", "label": True}
    rows = [row, row, {**row, "label": False}]
    data = preference(tmp_path, rows, rl="kto", type_="chatml.prompt_pairs", dataset_exact_deduplication=True)
    assert data.report.dropped == {"duplicate": 1}
    assert sorted(bool(e["desirable"]) for e in data.examples("train")) == [False, True]


def test_kd_teacher_targets_are_part_of_the_example(tmp_path):
    tok = load_tokenizer(data_settings(chat_template="chatml"))
    rows, _ = kd_rows(tok, range(3), fmt="a")

    def teacher(row, f):
        return {**row, "logprobs": [p and [{**e, "logprob": f(e["logprob"])} for e in p] for p in row["logprobs"]]}

    # Other teacher log-probs: another example. A constant shift is not: the kept entries are renormalised.
    sharper, shifted = teacher(rows[0], lambda lp: 1.5 * lp), teacher(rows[0], lambda lp: lp - 0.5)
    data = kd_data(tmp_path, tok, [*rows, rows[0], rows[1], sharper, shifted], dataset_exact_deduplication=True)
    assert data.report.dropped == {"duplicate": 3} and data.report.rows_out == 4


def test_exact_duplicates_and_digest():
    a = {"input_ids": np.array([1, 2], np.int32), "loss_mask": np.array([False, True])}
    assert example_digest(a) == example_digest(dict(reversed(list(a.items()))))  # key order does not matter
    for b in (
        {**a, "input_ids": np.array([1, 2], np.int64)},  # another dtype
        {**a, "loss_mask": np.array([True, True])},
        {"input_ids": a["input_ids"]},
    ):
        assert example_digest(b) != example_digest(a)
    seen = ExactDuplicates()
    assert seen.first(a) and not seen.first({k: v.copy() for k, v in a.items()})
    assert not ExactDuplicates(seen.seen).first(a)


def test_the_flag_keys_the_prepared_data_cache(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    cfg = config(datasets=[dataset(path=path, type="chat_template")], dataset_prepared_path=str(tmp_path / "prep"))
    off, on = (
        DataSettings.from_config(cfg),
        DataSettings.from_config(cfg.model_copy(update={"dataset_exact_deduplication": True})),
    )
    tok = tokenizer()
    assert PreparedCache(off, tok, "lm").key != PreparedCache(on, tok, "lm").key
    first = build_lm_data(on, tok)
    monkeypatch.setattr(pipeline_module, "_load_examples", None)  # a hit must not run the row stages
    hit = build_lm_data(on, tok)
    assert hit.report == first.report and hit.report.dropped == {"duplicate": 3} and hit.report.bad_rows == 0
