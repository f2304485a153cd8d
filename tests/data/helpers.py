"""Test helpers: byte-level tokenizers with readable ids, config objects, jsonl files.

The byte tokenizers map byte b to id b and put special tokens at 256, 257, ...; expected ids in the
tests can therefore be written by hand: ``ids("Hi")`` is ``[72, 105]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from jaxpref.config import DatasetConfig, JaxprefConfig, validate_config
from jaxpref.data.settings import DataSettings

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "demo" / "tiny-llama"

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ENDOFTEXT, IM_START, IM_END = 256, 257, 258
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
BOT, EOT_TEXT, START_HEADER, END_HEADER, EOT = 256, 257, 258, 259, 260


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel pre-tokenization uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_tokenizer(
    specials: list[str], *, eos: str, pad: str | None = None, bos: str | None = None, add_bos: bool = False
) -> PreTrainedTokenizerFast:
    """A tokenizer whose ids are the utf-8 bytes; ``add_bos`` prepends BOS like Llama 3's tokenizer."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad, bos_token=bos)


def chatml_tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer(CHATML_SPECIALS, eos="<|im_end|>", pad="<|endoftext|>")


def llama3_tokenizer(eos: str = "<|eot_id|>") -> PreTrainedTokenizerFast:
    return byte_tokenizer(LLAMA3_SPECIALS, eos=eos, bos="<|begin_of_text|>", add_bos=True)


def ids(*parts: str | int) -> list[int]:
    """Expected ids: strings become their utf-8 bytes, ints are special-token ids."""
    out: list[int] = []
    for p in parts:
        out.extend(p.encode() if isinstance(p, str) else [p])
    return out


def spec(*parts: tuple[str | int, bool]) -> tuple[list[int], list[bool]]:
    """Expected (ids, trainable) from (piece, trainable) pairs."""
    all_ids, mask = [], []
    for piece, trainable in parts:
        piece_ids = ids(piece)
        all_ids += piece_ids
        mask += [trainable] * len(piece_ids)
    return all_ids, mask


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path: Path) -> str:
    tokenizer.save_pretrained(path)
    return str(path)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def dataset(**kw: Any) -> dict[str, Any]:
    """A ``datasets:`` entry as written in YAML (a placeholder ``path`` when no source is given)."""
    return kw if "path" in kw or "data_files" in kw else {"path": "unused.jsonl", **kw}


def config(**kw: Any) -> JaxprefConfig:
    """A validated ``JaxprefConfig`` with the given keys (datasets as YAML dicts)."""
    return validate_config({"base_model": str(DEMO_MODEL), "learning_rate": 1e-4, **kw}, require_datasets=False)


def data_settings(**kw: Any) -> DataSettings:
    """The ``DataSettings`` of ``config(**kw)`` (what the data layer takes)."""
    return DataSettings.from_config(config(**kw))


def ds_config(**kw: Any) -> DatasetConfig:
    """One validated ``DatasetConfig``."""
    return config(datasets=[dataset(**kw)]).datasets[0]


def real_rows(batch: dict[str, np.ndarray]) -> list[list[int]]:
    """The token sequences of every segment in a micro-batch, in order."""
    out = []
    for b in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][b]
        for s in np.unique(seg[seg > 0]):
            out.append(batch["input_ids"][b][seg == s].tolist())
    return out
