"""The prepared-data cache (key, hit/miss, atomic writes) and ``python -m jaxpref.preprocess``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxpref.data import build_lm_data, load_tokenizer
from jaxpref.data import pipeline as pipeline_module
from jaxpref.data.cache import PreparedCache
from jaxpref.data.settings import DataSettings
from jaxpref.preprocess import length_histogram, main
from tests.data.helpers import DEMO_MODEL, config, data_settings, dataset, write_jsonl
from tests.data.test_kd import kd_rows


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(data_settings(chat_template="chatml"))


def kd_config(path, prepared, **kw):
    entry = {k: kw.pop(k) for k in ("temperature", "logprobs_field") if k in kw}
    kw.setdefault("sequence_len", 256)
    return config(
        datasets=[dataset(path=str(path), type="chat_template", **entry)],
        kd_trainer=True,
        chat_template="chatml",
        dataset_prepared_path=str(prepared),
        val_set_size=2,
        **kw,
    )


@pytest.fixture
def kd_file(tmp_path, tok):
    rows, _ = kd_rows(tok, range(8), fmt="a")
    return tmp_path / "kd.jsonl", rows, write_jsonl(tmp_path / "kd.jsonl", rows)


def key(cfg, tok) -> str:
    return PreparedCache(DataSettings.from_config(cfg), tok, "kd").key


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_hit_loads_instead_of_tokenizing_and_gives_the_same_batches(tmp_path, tok, kd_file, monkeypatch):
    path, rows, _ = kd_file
    cfg = kd_config(path, tmp_path / "prepared", sample_packing=True, micro_batch_size=2)
    first = build_lm_data(DataSettings.from_config(cfg), tok)
    written = [p for p in (tmp_path / "prepared").iterdir()]
    assert [p.name for p in written] == [f"kd-{key(cfg, tok)}"]  # no temp dirs left behind

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a cache hit must not run the row stages")

    monkeypatch.setattr(pipeline_module, "_load_examples", no_tokenizing)
    # packing and batch size are not part of the key: the hit is re-packed and re-batched
    for overrides in ({}, {"sample_packing": False, "micro_batch_size": 3}):
        second = build_lm_data(DataSettings.from_config(cfg.model_copy(update=overrides)), tok)
        assert second.report == first.report or overrides
        assert second.eval_report.rows_out == first.eval_report.rows_out == 2
    second = build_lm_data(DataSettings.from_config(cfg), tok)
    assert all(same(a, b) for a, b in zip(first.train_iterator(1), second.train_iterator(1), strict=True))
    assert all(same(a, b) for a, b in zip(first.eval_batches(), second.eval_batches(), strict=True))


def test_the_key_follows_what_changes_the_examples(tmp_path, tok, kd_file):
    path, rows, _ = kd_file
    prepared = tmp_path / "prepared"
    base = key(kd_config(path, prepared), tok)
    # irrelevant: optimisation, batching, packing, output, bad-row threshold
    for kw in (
        {"learning_rate": 0.5},
        {"micro_batch_size": 7},
        {"sample_packing": True},
        {"output_dir": "elsewhere"},
        {"max_bad_row_fraction": 0.9},
        {"kd_alpha": 0.3},
    ):
        assert key(kd_config(path, prepared, **kw), tok) == base, kw
    # relevant: lengths, split, seed, KD temperatures, the field names
    for kw in (
        {"sequence_len": 128},
        {"excess_length_strategy": "truncate"},
        {"seed": 1},
        {"train_on_inputs": True},
        {"kd_temperature": 2.0},
        {"temperature": 0.5},
        {"logprobs_field": "lp"},
    ):
        assert key(kd_config(path, prepared, **kw), tok) != base, kw
    # the data file's contents (size/mtime) and the tokenizer's chat template
    path.write_text(path.read_text() + path.read_text().splitlines()[0] + "\n")
    changed = key(kd_config(path, prepared), tok)
    assert changed != base
    os.utime(path, ns=(1, 1))
    assert key(kd_config(path, prepared), tok) != changed
    other = load_tokenizer(data_settings(chat_template="qwen3"))
    assert key(kd_config(path, prepared), other) != key(kd_config(path, prepared), tok)


def test_save_is_atomic_and_a_second_writer_loses_quietly(tmp_path, tok, kd_file):
    path, _, _ = kd_file
    cfg = kd_config(path, tmp_path / "prepared")
    cache = PreparedCache(DataSettings.from_config(cfg), tok, "kd")
    prepared = pipeline_module._load_examples(
        DataSettings.from_config(cfg), tok, kind="kd", make_processor=_processor(cfg)
    )
    assert cache.save(prepared) is True
    assert cache.save(prepared) is False  # the target exists: the other writer won
    assert [p.name for p in cache.root.iterdir()] == [cache.path.name]
    loaded = cache.load()
    assert len(loaded[0]) == len(prepared[0]) and all(same(a, b) for a, b in zip(loaded[0], prepared[0]))
    (cache.path / "meta.json").write_text("{not json")
    assert cache.load() is None  # unreadable: rebuilt, not fatal


def _processor(cfg):
    import functools

    return functools.partial(pipeline_module.ProcessRow, sequence_len=cfg.sequence_len, excess_length_strategy="drop")


def write_config(tmp_path, data_path, **kw) -> str:
    cfg = {
        "base_model": str(DEMO_MODEL),
        "chat_template": "chatml",
        "learning_rate": 1e-3,
        "kd_trainer": True,
        "sequence_len": 256,
        "sample_packing": True,
        "datasets": [{"path": str(data_path), "type": "chat_template"}],
        **kw,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_preprocess_cli_prints_the_report_and_a_rerun_hits(tmp_path, tok, kd_file, capsys):
    path, rows, _ = kd_file
    rows = [*rows, {"messages": rows[0]["messages"]}]  # one row without teacher log-probs
    write_jsonl(path, rows)
    cfg = write_config(tmp_path, path)
    prepared = tmp_path / "prepared"
    assert main(["--config", cfg, f"dataset_prepared_path={prepared}"]) == 0
    out = capsys.readouterr().out
    assert "(written)" in out and str(prepared) in out
    assert "train: 9 rows in, 8 kept, 1 dropped" in out
    assert "dropped 1 x missing_field" in out and "trainable" in out
    assert "KD: top-k K = 4" in out and "row lengths (tokens):" in out
    assert main(["--config", cfg, f"dataset_prepared_path={prepared}"]) == 0
    assert "(already prepared, loaded)" in capsys.readouterr().out
    assert main(["--config", cfg, f"dataset_prepared_path={prepared}", "--force"]) == 0
    assert "(written)" in capsys.readouterr().out
    assert len(list(prepared.iterdir())) == 1


def test_preprocess_cli_defaults_the_cache_directory(tmp_path, kd_file, capsys, monkeypatch):
    path, _, _ = kd_file
    monkeypatch.chdir(tmp_path)
    assert main(["--config", write_config(tmp_path, path)]) == 0
    assert "using last_run_prepared/" in capsys.readouterr().out
    assert len(list((tmp_path / "last_run_prepared").iterdir())) == 1


@pytest.mark.parametrize("problem", ["missing file", "bad rows", "bad key"])
def test_preprocess_cli_bad_input_exits_2_with_one_paragraph(tmp_path, kd_file, capsys, problem):
    path, rows, _ = kd_file
    args = []
    if problem == "missing file":
        path = tmp_path / "nope.jsonl"
    elif problem == "bad rows":
        write_jsonl(path, [{"messages": r["messages"]} for r in rows])  # no teacher log-probs at all
    else:
        args = ["sequence_lenn=12"]
    code = main(["--config", write_config(tmp_path, path), f"dataset_prepared_path={tmp_path / 'p'}", *args])
    err = capsys.readouterr().err
    message = err[err.index("error: ") :]  # after the datasets progress bars
    assert code == 2 and "Traceback" not in err and "\n\n" not in message.strip()
    assert {"missing file": "nope.jsonl", "bad rows": "missing_field", "bad key": "sequence_len"}[problem] in message


def test_length_histogram():
    lines = length_histogram([1, 2, 3, 16, 16])
    assert len(lines) == 8 and lines[0].split()[0] == "1-2" and lines[0].endswith(" 2")
    assert lines[-1].split()[0] == "15-16" and lines[-1].endswith(" 2")
    assert length_histogram([]) == ["  (no rows)"]


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("rl,fixture,type_", [("dpo", "orca_dpo_pairs.jsonl", "chatml.intel"),
                                              ("kto", "ultrafeedback_kto.jsonl", "chatml.ultra")])
def test_preference_data_goes_through_the_cache_and_the_cli(tmp_path, tok, monkeypatch, capsys, rl, fixture, type_):
    from jaxpref.data.preference import build_preference_data

    prepared = tmp_path / "prepared"
    cfg = config(datasets=[dataset(path=str(FIXTURES / fixture), type=type_)], rl=rl, micro_batch_size=2,
                 dataset_prepared_path=str(prepared))
    first = build_preference_data(DataSettings.from_config(cfg), tok)
    monkeypatch.setattr(pipeline_module, "_load_examples", lambda *a, **k: pytest.fail("cache miss"))
    second = build_preference_data(DataSettings.from_config(cfg), tok)
    assert all(same(a, b) for a, b in zip(first.train_iterator(1), second.train_iterator(1), strict=True))
    monkeypatch.undo()
    path = write_config(tmp_path, FIXTURES / fixture, kd_trainer=False, rl=rl, micro_batch_size=2,
                        datasets=[{"path": str(FIXTURES / fixture), "type": type_}])
    assert main(["--config", path, f"dataset_prepared_path={prepared}"]) == 0
    out = capsys.readouterr().out
    assert f"{'kto' if rl == 'kto' else 'preference'} data:" in out and "(written)" in out
    assert "row lengths (tokens):" in out and "0 dropped" in out
    assert main(["--config", path, f"dataset_prepared_path={prepared}"]) == 0
    assert "(already prepared, loaded)" in capsys.readouterr().out
