"""Token ids and collated batches equal TRL 1.16's (DPOTrainer / KTOTrainer dataset preparation + collators).

TRL's tokenization is a closure inside ``_prepare_dataset``; it only reads ``self._tokenizer`` (DPO) and
a few attributes (KTO), so it runs unbound with a stub ``self``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from jaxpref.data.formats import get_format
from jaxpref.data.preference import KTO_SIDES, PAIR_SIDES, CollateKTO, ProcessPreference, collate_pairs
from tests.data.helpers import DEMO_MODEL, chatml_tokenizer, data_settings, ds_config, llama3_tokenizer

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_kto = pytest.importorskip("trl.trainer.kto_trainer")
datasets = pytest.importorskip("datasets")

FIXTURES = Path(__file__).parent / "fixtures"
ORCA = [json.loads(line) for line in (FIXTURES / "orca_dpo_pairs.jsonl").read_text().splitlines()]
KTO_ROWS = [json.loads(line) for line in (FIXTURES / "ultrafeedback_kto.jsonl").read_text().splitlines()]
# prompt/completion boundaries inside a BPE merge of the demo tokenizer ("Wh"+"at", "the"+"re")
MERGING = [{"prompt": "Wh", "chosen": "at?", "rejected": "o?"}, {"prompt": "Is the", "chosen": "re", "rejected": "m"}]

TOKENIZERS = {
    "chatml-bytes": chatml_tokenizer,
    "llama3-bytes-bos": llama3_tokenizer,
    "demo-bpe": lambda: AutoTokenizer.from_pretrained(DEMO_MODEL),
}


def trl_pairs(tok, texts, max_length=None):
    ds = datasets.Dataset.from_list([{"prompt": t.prompt, "chosen": t.chosen, "rejected": t.rejected} for t in texts])
    args = SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start")
    return list(trl_dpo.DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tok), ds, tok, args, "train"))


def rows_of(batch: dict, prefix: str) -> list[tuple[list[int], list[bool]]]:
    """(ids, loss_mask) of each real row, trimmed to its length."""
    out = []
    for b in range(batch[prefix + "input_ids"].shape[0]):
        n = int((batch[prefix + "segment_ids"][b] > 0).sum())
        if n:
            out.append((batch[prefix + "input_ids"][b, :n].tolist(), batch[prefix + "loss_mask"][b, :n].tolist()))
    return out


def trl_rows(ids, attention, completion) -> list[tuple[list[int], list[bool]]]:
    """TRL's padded rows -> (ids, prediction-aligned mask): our loss_mask[t] = completion_mask[t + 1]."""
    out = []
    for i, a, c in zip(ids.tolist(), attention.tolist(), completion.tolist()):
        n = sum(a)
        out.append((i[:n], [bool(x) for x in c[1:n]] + [False]))
    return out


@pytest.mark.parametrize("tok_name", list(TOKENIZERS))
@pytest.mark.parametrize(
    "type_, rows", [("chatml.intel", ORCA), ("llama3.intel", ORCA), ("user_defined.default", MERGING)]
)
def test_pair_ids_equal_trl(tok_name, type_, rows):
    tok = TOKENIZERS[tok_name]()
    f = get_format(type_, kind="preference").build(ds_config(type=type_), data_settings(), tok)
    trl = trl_pairs(tok, [f.text(r) for r in rows])
    for row, want in zip(rows, trl):
        got = f(row)
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert got[key].tolist() == want[key], key
    if tok_name == "demo-bpe" and type_ == "user_defined.default":  # the merge really crossed the boundary
        assert trl[0]["prompt_ids"] == [] and len(trl[1]["prompt_ids"]) < len(tok("Is the")["input_ids"])


@pytest.mark.parametrize("max_length", [None, 160, 180])  # 160: two prompts alone are longer
def test_collated_pair_batch_equals_trl(max_length):
    tok = llama3_tokenizer()
    f = get_format("chatml.intel", kind="preference").build(ds_config(type="chatml.intel"), data_settings(), tok)
    trl = trl_pairs(tok, [f.text(r) for r in ORCA], max_length)
    assert len(trl) == {None: 4, 160: 2, 180: 4}[max_length]
    trl_batch = trl_dpo.DataCollatorForPreference(pad_token_id=0, max_length=max_length)(trl)
    process = ProcessPreference(
        f, sides=PAIR_SIDES, sequence_len=max_length or 10_000, excess_length_strategy="truncate"
    )
    ours = [process(r) for r in ORCA]
    assert len([r for r in ours if isinstance(r, tuple)]) == len(trl)  # TRL's prompt >= max_length filter too
    batch = collate_pairs([r[0] for r in ours if isinstance(r, tuple)], 256)
    want = trl_rows(trl_batch["input_ids"], trl_batch["attention_mask"], trl_batch["completion_mask"])
    assert rows_of(batch, "chosen_") == want[: len(trl)]
    assert rows_of(batch, "rejected_") == want[len(trl) :]


@pytest.mark.parametrize("tok_name", ["llama3-bytes-bos", "demo-bpe"])
def test_kto_ids_and_kl_rotation_equal_trl(tok_name):
    tok = TOKENIZERS[tok_name]()
    f = get_format("llama3.ultra", kind="kto").build(ds_config(type="llama3.ultra"), data_settings(), tok)
    texts = [f.text(r) for r in KTO_ROWS]
    ds = datasets.Dataset.from_list(
        [{"prompt": t.prompt, "completion": t.completion, "label": t.desirable} for t in texts]
    )
    stub = SimpleNamespace(_tokenizer=tok, calculate_KL=True, desirable_weight=1.0, undesirable_weight=1.0)
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, per_device_train_batch_size=len(KTO_ROWS))
    trl = list(trl_kto.KTOTrainer._prepare_dataset(stub, ds, tok, args, "train"))
    trl_batch = trl_kto.DataCollatorForUnpairedPreference(pad_token_id=0)(trl)

    process = ProcessPreference(f, sides=KTO_SIDES, sequence_len=10_000, excess_length_strategy="drop", keep_parts=True)
    examples = [process(r)[0] for r in KTO_ROWS]
    for ex, want in zip(examples, trl):
        assert (
            ex["prompt_ids"].tolist() == want["prompt_ids"] and ex["completion_ids"].tolist() == want["completion_ids"]
        )
    batch = CollateKTO(10_000)(examples, 128)
    for prefix, trl_prefix in (("", ""), ("kl_", "KL_")):
        want = trl_rows(*(trl_batch[trl_prefix + k] for k in ("input_ids", "attention_mask", "completion_mask")))
        assert rows_of(batch, prefix) == want
    assert batch["desirable"].tolist() == trl_batch["label"].tolist()
