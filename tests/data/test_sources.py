"""Loading `datasets:` entries (local files, directories, data_files, hub ids offline) and mixing them."""

from __future__ import annotations

import re

import datasets
import pytest

from jaxpref.data import build_lm_data
from jaxpref.data.settings import DataSettings
from jaxpref.data.sources import load_entry
from jaxpref.errors import DataError
from tests.data.helpers import chatml_tokenizer, config, dataset, ds_config, real_rows, write_jsonl

ROWS = [{"text": f"row {i}"} for i in range(5)]


def texts(ds) -> list[str]:
    return [r["text"] for r in ds]


def test_local_file_types(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", ROWS)
    assert texts(load_entry(ds_config(path=jsonl))) == texts(ROWS)
    frame = datasets.Dataset.from_list(ROWS)
    frame.to_parquet(tmp_path / "a.parquet")
    frame.to_csv(tmp_path / "a.csv", index=False)
    assert texts(load_entry(ds_config(path=str(tmp_path / "a.parquet")))) == texts(ROWS)
    assert texts(load_entry(ds_config(path=str(tmp_path / "a.csv")))) == texts(ROWS)
    # ds_type wins over the extension
    other = tmp_path / "rows.data"
    other.write_text((tmp_path / "a.jsonl").read_text())
    assert texts(load_entry(ds_config(path=str(other), ds_type="json"))) == texts(ROWS)


def test_data_files_without_path_and_directories(tmp_path):
    a = write_jsonl(tmp_path / "d" / "a.jsonl", ROWS[:2])
    b = write_jsonl(tmp_path / "d" / "b.jsonl", ROWS[2:])
    # axolotl's local_dataset example: ds_type + data_files, no path
    assert texts(load_entry(ds_config(ds_type="json", data_files=[a, b]))) == texts(ROWS)
    assert sorted(texts(load_entry(ds_config(path=str(tmp_path / "d"))))) == texts(ROWS)
    assert sorted(texts(load_entry(ds_config(path=str(tmp_path / "d"), ds_type="json")))) == texts(ROWS)
    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "saved")
    assert texts(load_entry(ds_config(path=str(tmp_path / "saved")))) == texts(ROWS)


def test_missing_local_paths(tmp_path):
    with pytest.raises(DataError, match=r"datasets\[0\]: path 'data/missing.jsonl' does not exist"):
        load_entry(ds_config(path="data/missing.jsonl"))
    with pytest.raises(DataError, match=r"datasets\[2\]: data file\(s\) not found: .*nope.jsonl"):
        load_entry(ds_config(ds_type="json", data_files=str(tmp_path / "nope.jsonl")), where="datasets[2]")
    with pytest.raises(DataError, match='Unknown split "validation"'):
        load_entry(ds_config(path=write_jsonl(tmp_path / "a.jsonl", ROWS), split="validation"))


def test_offline_hub_id_is_a_data_error_naming_the_dataset():
    # tests/conftest.py sets HF_DATASETS_OFFLINE=1: the hub cannot be reached.
    with pytest.raises(DataError) as e:
        load_entry(ds_config(path="Intel/orca_dpo_pairs", type="chatml.intel"), where="datasets[1]")
    msg = str(e.value)
    assert "datasets[1]" in msg and "'Intel/orca_dpo_pairs'" in msg and "could not be downloaded" in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained traceback for the CLI


def test_malformed_file_is_a_data_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match="could not load"):
        load_entry(ds_config(path=str(bad)))


def test_several_datasets_are_concatenated_and_shuffled_with_seed(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(6)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"b{i}", "output": "o"} for i in range(6)])

    def order(seed):
        cfg = config(
            datasets=[dataset(path=a, type="completion"), dataset(path=b, type="alpaca")],
            micro_batch_size=12,
            seed=seed,
        )
        data = build_lm_data(DataSettings.from_config(cfg), chatml_tokenizer())
        assert data.report.rows_in == 12
        decoded = [tok.decode(r) for r in real_rows(next(data.train_iterator()))]
        return [re.search(r"^a\d|(?<=Instruction:\n)b\d", text).group() for text in decoded]

    tok = chatml_tokenizer()
    first = order(0)
    assert sorted(first) == [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(6)]
    assert first == order(0) and first != order(1)
    # rows of both datasets are interleaved by the shuffle, not appended
    assert {r[0] for r in first[:6]} == {"a", "b"}
