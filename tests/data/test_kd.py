"""KD datasets: teacher rows from a known distribution end up prediction-aligned in the batches.

The teacher distribution over token i (token-aligned row i) is a known function of (i, token); batch
row t must hold it for token t + 1 of the same segment, cut to K by value, rescaled by T_gen / T_kd
and renormalised (checked against float64 NumPy written independently of jaxpref).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxpref.data import build_lm_data
from jaxpref.data.chat_templates import shipped_template
from jaxpref.data.formats import BadRow, get_format
from jaxpref.data.formats.kd import kd_row, parse_teacher, read_kd_dataset, write_kd_dataset
from jaxpref.data.kd_targets import fit_top_k, renormalize, top_k_by_value
from jaxpref.data.settings import DataSettings
from jaxpref.errors import ConfigError, DataError
from tests.data.helpers import chatml_tokenizer, config, data_settings, dataset, ds_config, write_jsonl

K = 4


@pytest.fixture(scope="module")
def tok():
    t = chatml_tokenizer()
    t.chat_template = shipped_template("chatml")
    return t


def conversation(n: int) -> list[dict]:
    """A unique conversation; the answer length varies with ``n``."""
    return [
        {"role": "user", "content": f"question {n:03d}"},
        {"role": "assistant", "content": f"answer {n:03d} " + "xyz"[n % 3] * (3 + 7 * (n % 5))},
    ]


def tokenize(tok, messages) -> tuple[list[int], np.ndarray]:
    ex = get_format("chat_template", kind="lm").build(ds_config(type="chat_template"), data_settings(), tok)(
        {"messages": messages}
    )
    return ex["input_ids"].tolist(), ex["trainable"]


def teacher_dist(i: int, token: int) -> tuple[list[int], list[float]]:
    """The teacher's top-K over token i (it was ``token``): ids and log-probs (full-vocab normalised).

    Positions i % 3 == 0 hold K+1 entries: an extra, least likely entry stored *first*.
    """
    ids = [(token + 17 * j) % 256 for j in range(K)]
    logits = np.array([-(j + 1) * (0.5 + 0.25 * (i % 3)) + 0.01 * token for j in range(K)])
    lps = (logits - (np.log(np.exp(logits).sum()) + 0.2)).tolist()  # top-K mass e^-0.2
    if i % 3 == 0:
        ids, lps = [(token + 17 * K) % 256, *ids], [min(lps) - 1.0, *lps]
    return ids, lps


def expected(i: int, token: int, ratio: float) -> tuple[list[int], np.ndarray]:
    """Independent float64 reference: K largest by value, p ** ratio renormalised, highest first."""
    ids, lps = teacher_dist(i, token)
    order = np.argsort(-np.asarray(lps), kind="stable")[:K]
    p = np.exp(np.asarray(lps, dtype=np.float64)[order]) ** ratio
    return [ids[j] for j in order], np.log(p / p.sum())


def teacher_positions(tokens: list[int], alignment: str = "token") -> list[tuple[list[int], list[float]] | None]:
    if alignment == "token":  # row i over token i; vLLM's leading null row
        return [None] + [teacher_dist(i, tokens[i]) for i in range(1, len(tokens))]
    return [teacher_dist(t + 1, tokens[t + 1]) for t in range(len(tokens) - 1)]  # row t over token t + 1


def kd_rows(tok, ns, fmt="a", alignment="token", field="logprobs") -> tuple[list[dict], dict[tuple, list[int]]]:
    """Rows in format (a) or (b), and {token tuple: tokens} to find a segment's row."""
    rows, known = [], {}
    for n in ns:
        messages = conversation(n)
        tokens, _ = tokenize(tok, messages)
        known[tuple(tokens)] = tokens
        positions = teacher_positions(tokens, alignment)
        if fmt == "a":
            entries = [
                None if p is None else [{"token": f"token_id:{i}", "logprob": lp} for i, lp in zip(*p)]
                for p in positions
            ]
            rows.append({"messages": messages, field: entries})
        else:
            rows.append(
                kd_row(
                    messages,
                    [None if p is None else p[0] for p in positions],
                    [None if p is None else p[1] for p in positions],
                    logprobs_field=field,
                )
            )
    return rows, known


def kd_data(tmp_path, tok, rows, *, entry=None, name="kd.jsonl", **cfg_kw):
    path = write_jsonl(tmp_path / name, rows)
    cfg_kw.setdefault("sequence_len", 256)
    cfg = config(datasets=[dataset(path=path, type="chat_template", **(entry or {}))], kd_trainer=True, **cfg_kw)
    return build_lm_data(DataSettings.from_config(cfg), tok)


def check_batch(batch, known, ratio=1.0) -> int:
    """Every segment's targets are its own teacher's, prediction-aligned; returns segments checked."""
    assert batch["target_token_ids"].dtype == np.int32 and batch["target_logprobs"].dtype == np.float32
    assert batch["target_mask"].dtype == bool and batch["target_token_ids"].shape == (*batch["input_ids"].shape, K)
    segments = 0
    for b in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][b]
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            tokens = known[tuple(batch["input_ids"][b, where].tolist())]
            segments += 1
            for t, pos in zip(where, batch["positions"][b, where]):
                mask = batch["target_mask"][b, t]
                if not batch["loss_mask"][b, t]:
                    assert not mask.any() and not batch["target_token_ids"][b, t].any()
                    assert not batch["target_logprobs"][b, t].any()
                    continue
                assert mask.all()
                ids, lps = expected(int(pos) + 1, tokens[pos + 1], ratio)  # the prediction of token t + 1
                assert batch["target_token_ids"][b, t].tolist() == ids
                np.testing.assert_allclose(batch["target_logprobs"][b, t], lps, rtol=1e-6, atol=1e-6)
            assert not batch["target_mask"][b, where[-1]].any()  # never crosses into the next segment
    for b in range(batch["input_ids"].shape[0]):  # time padding is masked
        assert not batch["target_mask"][b, batch["segment_ids"][b] == 0].any()
    return segments


@pytest.mark.parametrize("fmt", ["a", "b"])
@pytest.mark.parametrize("packing", [False, True])
def test_batch_row_t_holds_the_teacher_distribution_of_token_t_plus_1(tmp_path, tok, fmt, packing):
    rows, known = kd_rows(tok, range(12), fmt=fmt)
    data = kd_data(tmp_path, tok, rows, sample_packing=packing, micro_batch_size=2)
    batches = list(data.train_iterator(1))
    assert sum(check_batch(b, known) for b in batches) == len(rows)
    assert data.report.rows_out == len(rows) and not data.report.dropped
    if packing:
        assert data.report.sequences < len(rows)  # several rows share a sequence
        assert all(b["target_token_ids"].shape[1] == 256 for b in batches)


@pytest.mark.parametrize("t_gen,t_kd", [(1.0, 2.0), (0.7, 1.0), (2.0, 0.5)])
def test_temperature_rescale_and_renormalise_match_float64(tmp_path, tok, t_gen, t_kd):
    rows, known = kd_rows(tok, range(4), fmt="b")
    data = kd_data(tmp_path, tok, rows, entry={"temperature": t_gen}, kd_temperature=t_kd)
    for batch in data.train_iterator(1):
        check_batch(batch, known, ratio=t_gen / t_kd)
        p = np.exp(batch["target_logprobs"].astype(np.float64)) * batch["target_mask"]
        np.testing.assert_allclose(p.sum(-1)[batch["loss_mask"]], 1.0, atol=1e-6)


def test_prediction_aligned_input_declared_in_the_entry(tmp_path, tok):
    rows, known = kd_rows(tok, range(6), fmt="a", alignment="prediction")
    pred = list(kd_data(tmp_path, tok, rows, entry={"logprobs_alignment": "prediction"}).train_iterator(1))
    token_rows, _ = kd_rows(tok, range(6), fmt="a")
    token = list(kd_data(tmp_path, tok, token_rows, name="token.jsonl").train_iterator(1))
    for a, b in zip(pred, token, strict=True):
        check_batch(a, known)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    # a prediction-aligned row may also carry a last row (for the position after the final token)
    rows[0]["logprobs"] = rows[0]["logprobs"] + [rows[0]["logprobs"][-1]]
    data = kd_data(tmp_path, tok, rows, entry={"logprobs_alignment": "prediction"}, name="extra.jsonl")
    assert data.report.rows_out == 6


def test_custom_logprobs_field_and_axolotl_type_names(tmp_path, tok):
    rows, known = kd_rows(tok, range(3), fmt="a", field="llm_vllm_logprobs")
    for type_name in ("axolotl.integrations.kd.chat_template", "axolotl.integrations.kd.chat_template.load_legacy"):
        path = write_jsonl(tmp_path / "custom.jsonl", rows)
        entry = dataset(path=path, type=type_name, logprobs_field="llm_vllm_logprobs")
        data = build_lm_data(data_settings(datasets=[entry], sequence_len=256), tok)  # the type alone makes it KD
        assert sum(check_batch(b, known) for b in data.train_iterator(1)) == 3


def test_kd_run_rejects_types_without_teacher_targets(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match="'completion' is a type for lm"):
        build_lm_data(data_settings(datasets=[dataset(path=path, type="completion")], kd_trainer=True), tok)


def test_top_k_cut_is_by_value_never_by_position():
    ids = np.array([[9, 1, 2, 3, 4], [5, 6, 7, 0, 0]])
    lps = np.array([[-9.0, -1.0, -3.0, -2.0, -4.0], [-1.0, -3.0, -2.0, 0.0, 0.0]])
    valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
    out_ids, out_lps, kept = top_k_by_value(ids, lps, valid, 4)
    assert out_ids.tolist() == [[1, 3, 2, 4], [5, 7, 6, 0]]
    assert out_lps.tolist() == [[-1.0, -2.0, -3.0, -4.0], [-1.0, -2.0, -3.0, 0.0]]
    assert kept.tolist() == [[True] * 4, [True, True, True, False]]


def test_fit_top_k_cuts_and_renormalises_or_pads():
    lps = np.log(np.array([[0.5, 0.3, 0.2]]))
    ex = {
        "target_token_ids": np.array([[4, 5, 6]], np.int32),
        "target_logprobs": lps.astype(np.float32),
        "target_mask": np.ones((1, 3), bool),
    }
    cut = fit_top_k(ex, 2)
    assert cut["target_token_ids"].tolist() == [[4, 5]]
    np.testing.assert_allclose(np.exp(cut["target_logprobs"]), [[0.625, 0.375]], rtol=1e-6)
    padded = fit_top_k(ex, 5)
    assert padded["target_mask"].tolist() == [[True] * 3 + [False] * 2]
    assert padded["target_token_ids"][0, 3:].tolist() == [0, 0] and padded["target_logprobs"][0, 3:].tolist() == [0, 0]
    np.testing.assert_allclose(renormalize(lps, np.ones((1, 3), bool), 2.0), np.log([[25, 9, 4]]) - math.log(38))


def test_the_run_uses_the_most_common_k(tmp_path, tok):
    # a row where every position holds K+1 entries is still cut to the run's K (by value)
    rows, known = kd_rows(tok, range(5), fmt="b")
    ids, lps = rows[0]["target_token_ids"], rows[0]["logprobs"]
    for i in range(1, len(ids)):
        if len(ids[i]) == K:
            ids[i], lps[i] = [ids[i][0] + 100, *ids[i]], [-30.0, *lps[i]]
    data = kd_data(tmp_path, tok, rows)
    assert sum(check_batch(b, known) for b in data.train_iterator(1)) == 5


def bad(tok, reason: str, n: int) -> dict:
    """One row of ``reason`` (format (a) with its teacher rows broken), built from conversation n."""
    rows, _ = kd_rows(tok, [n], fmt="a")
    row = rows[0]
    lp = row["logprobs"]
    if reason == "missing_field":
        del row["logprobs"]
    elif reason == "kd_malformed_teacher_row":
        lp[3][0]["token"] = "hello"
    elif reason == "kd_nonfinite_logprob":
        lp[5][1]["logprob"] = float("nan")
    elif reason == "kd_token_out_of_vocab":
        lp[2][0]["token"] = "token_id:100000"
    elif reason == "kd_length_mismatch":
        row["logprobs"] = lp[:-1]
    elif reason == "kd_empty_teacher_row":
        lp[-2] = None  # a trained token (the answer's last character)
    elif reason == "no_trainable_tokens":  # every target masked: nothing is trained
        row["messages"] = row["messages"][:1]
        tokens, _ = tokenize(tok, row["messages"])
        row["logprobs"] = lp[: len(tokens)]
    elif reason == "too_long":
        row["messages"][1]["content"] += "z" * 300
        tokens, _ = tokenize(tok, row["messages"])
        row["logprobs"] = [None] + [
            [{"token": f"token_id:{t}", "logprob": -1.0}] * K for t in tokens[1:]
        ]
    return row


BAD_REASONS = [
    "missing_field",
    "kd_malformed_teacher_row",
    "kd_nonfinite_logprob",
    "kd_token_out_of_vocab",
    "kd_length_mismatch",
    "kd_empty_teacher_row",
    "no_trainable_tokens",
    "too_long",
]


def test_bad_rows_are_counted_per_reason_and_never_shift_neighbours(tmp_path, tok):
    good, known = kd_rows(tok, range(100, 110), fmt="a")
    rows = []
    for i, reason in enumerate(BAD_REASONS):  # each bad row between two good ones
        rows += [good[i], bad(tok, reason, i)]
    rows += good[len(BAD_REASONS) :]
    data = kd_data(tmp_path, tok, rows, max_bad_row_fraction=0.5, sample_packing=True, micro_batch_size=2)
    assert data.report.dropped == {reason: 1 for reason in BAD_REASONS}
    assert data.report.rows_in == len(rows) and data.report.rows_out == len(good)
    assert sum(check_batch(b, known) for b in data.train_iterator(1)) == len(good)
    summary = data.report.summary()
    assert all(reason in summary for reason in BAD_REASONS)


def test_mostly_bad_data_is_an_error(tmp_path, tok):
    rows = [bad(tok, "kd_length_mismatch", n) for n in range(3)] + kd_rows(tok, [9])[0]
    with pytest.raises(DataError, match="kd_length_mismatch"):
        kd_data(tmp_path, tok, rows)


def test_truncate_cuts_teacher_rows_with_the_tokens(tmp_path, tok):
    rows, known = kd_rows(tok, [4, 9], fmt="a")  # 4 and 9: the longest answers
    data = kd_data(tmp_path, tok, rows, sequence_len=40, excess_length_strategy="truncate")
    assert data.report.truncated == 2
    truncated = {key[:40]: tokens for key, tokens in known.items()}
    assert sum(check_batch(b, truncated) for b in data.train_iterator(1)) == 2


def test_resume_mid_epoch_gives_the_same_kd_batches(tmp_path, tok):
    rows, _ = kd_rows(tok, range(10), fmt="b")
    data = kd_data(tmp_path, tok, rows, micro_batch_size=2, sample_packing=True, sequence_len=128)
    it = data.train_iterator(2)
    for _ in range(3):
        next(it)
    state = it.get_state()
    rest = list(it)
    resumed = data.train_iterator(2)
    resumed.set_state(state)
    again = list(resumed)
    assert len(again) == len(rest) > 0
    for a, b in zip(rest, again):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_writer_reader_round_trip(tmp_path, tok, suffix):
    rows, known = kd_rows(tok, range(3), fmt="b")
    path = write_kd_dataset(rows, tmp_path / f"teacher{suffix}")
    ds = read_kd_dataset(path)
    for row, stored in zip(rows, ds):
        parsed, original = parse_teacher(stored), parse_teacher(row)
        assert np.array_equal(parsed.token_ids, original.token_ids)
        assert np.array_equal(parsed.valid, original.valid)
        np.testing.assert_allclose(parsed.logprobs, original.logprobs, rtol=1e-15)  # pyarrow's JSON: 1 ulp
    cfg = config(datasets=[dataset(path=path, type="chat_template")], kd_trainer=True, sequence_len=256)
    assert sum(check_batch(b, known) for b in build_lm_data(DataSettings.from_config(cfg), tok).train_iterator(1)) == 3


def test_bad_logprobs_alignment_is_a_config_error(tok):
    with pytest.raises(Exception, match="logprobs_alignment"):
        ds_config(type="chat_template", logprobs_alignment="shifted")
    fake = type("Entry", (), {"logprobs_alignment": "shifted", "type": "chat_template"})()
    with pytest.raises(ConfigError, match="logprobs_alignment"):
        get_format("chat_template", kind="kd").build(fake, data_settings(), tok)


@pytest.mark.parametrize(
    "token",
    ["hello", "token_id:", "token_id:1a", "token_id:-1", 5, None, "token_id:1token_id:2", "token_id:" + "9" * 19],
)
def test_malformed_token_strings(token):
    good = {"token": "token_id:3", "logprob": -0.5}
    with pytest.raises(BadRow) as e:
        parse_teacher({"logprobs": [None, [good, {"token": token, "logprob": -1.0}], [good]]})
    assert e.value.reason == "kd_malformed_teacher_row"
    parsed = parse_teacher({"logprobs": [None, [good, {"token": "token_id:123456", "logprob": -1.0}], [good]]})
    assert parsed.token_ids.tolist() == [[0, 0], [3, 123456], [3, 0]] and parsed.counts.tolist() == [0, 2, 1]
