"""dataset_processes: worker processes give the single-process examples and report, in the same order."""

from __future__ import annotations

import functools
import logging
import multiprocessing
from collections import Counter

import numpy as np

from jaxpref.data import workers
from jaxpref.data.chat_templates import shipped_template
from jaxpref.data.pipeline import ProcessRow, load_examples
from jaxpref.data.settings import DataSettings
from tests.data.helpers import chatml_tokenizer, config, dataset, write_jsonl
from tests.data.test_kd import kd_rows


def test_worker_count():
    assert workers.worker_count(1, 10_000, 1.0) == 0  # dataset_processes 1
    assert workers.worker_count(4, 1000, 0.001) == 0  # 1 s of work: start-up would cost more
    assert workers.worker_count(4, 1000, 0.1) == 4
    assert workers.worker_count(8, 3, 10.0) == 3


def test_worker_processes_equal_one_process(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(workers, "WORKER_MIN_SECONDS", 0.0)  # the rows are small: force the workers
    caplog.set_level(logging.INFO, logger="jaxpref.data.workers")
    tok = chatml_tokenizer()
    tok.chat_template = shipped_template("chatml")
    rows, _ = kd_rows(tok, range(300))
    rows[41] = {"messages": rows[41]["messages"]}  # no teacher rows
    rows[150]["messages"][1]["content"] += "!"  # the teacher rows no longer match
    path = write_jsonl(tmp_path / "kd.jsonl", rows)
    results = []
    for processes in (1, 2):
        cfg = config(datasets=[dataset(path=path, type="chat_template")], kd_trainer=True, sequence_len=256,
                     val_set_size=10, dataset_processes=processes)
        make = functools.partial(ProcessRow, sequence_len=256, excess_length_strategy="drop")
        results.append(load_examples(DataSettings.from_config(cfg), tok, kind="kd", make_processor=make))
    assert f"mapping {290 - workers.PROBE_ROWS} rows in 2 worker processes" in caplog.text
    assert not multiprocessing.active_children()  # the workers were stopped
    (train1, eval1, report1, eval_report1), (train2, eval2, report2, eval_report2) = results
    assert report1 == report2 and eval_report1 == eval_report2
    dropped = Counter(report1.dropped) + Counter(eval_report1.dropped)
    assert dropped == {"missing_field": 1, "kd_length_mismatch": 1} and report1.rows_out + eval_report1.rows_out == 298
    for one, two in ((train1, train2), (eval1, eval2)):
        assert len(one) == len(two)
        for a, b in zip(one, two):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key].dtype == b[key].dtype and type(b[key]) is np.ndarray
                np.testing.assert_array_equal(a[key], b[key])
