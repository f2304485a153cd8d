"""Shared pieces of the objective tests: a tiny random transformers Llama saved to disk and loaded by
jaxpref, the demo tokenizer, preference rows and jaxpref batches built by the real data pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from transformers import AutoTokenizer

from jaxpref import models
from jaxpref.config import JaxprefConfig
from jaxpref.data.formats import get_format
from jaxpref.data.preference import KTO_SIDES, PAIR_SIDES, CollateKTO, ProcessPreference, collate_pairs
from tests.data.helpers import DEMO_MODEL, config, data_settings, ds_config
from tests.models.tiny import build_hf

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"
ORCA = [json.loads(line) for line in (FIXTURES / "orca_dpo_pairs.jsonl").read_text().splitlines()]
KTO_ROWS = [json.loads(line) for line in (FIXTURES / "ultrafeedback_kto.jsonl").read_text().splitlines()]
VOCAB = 512  # the demo tokenizer's


def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_MODEL)


def hf_llama(seed: int, **overrides: Any):
    """A tiny random transformers Llama over the demo tokenizer's vocabulary (float32, eval mode)."""
    return build_hf("llama", seed=seed, vocab_size=VOCAB, max_position_embeddings=512, **overrides)


def save_and_load(hf_model, path: Path):
    """``save_pretrained`` with transformers, ``from_pretrained`` with jaxpref: the same weights."""
    hf_model.save_pretrained(path)
    return models.from_pretrained(str(path))


def pair_texts(tok) -> tuple[Any, list]:
    """The ``chatml.intel`` format and the rendered (prompt, chosen, rejected) strings of the ORCA rows."""
    f = get_format("chatml.intel", kind="preference").build(ds_config(type="chatml.intel"), data_settings(), tok)
    return f, [f.text(r) for r in ORCA]


def pair_batch(tok, length: int = 128) -> dict[str, np.ndarray]:
    """The ORCA rows as one jaxpref pair micro-batch, through the pipeline's per-row map and collator."""
    f, _ = pair_texts(tok)
    process = ProcessPreference(f, sides=PAIR_SIDES, sequence_len=10_000, excess_length_strategy="drop")
    return collate_pairs([process(r)[0] for r in ORCA], length)


def kto_parts(tok):
    f = get_format("llama3.ultra", kind="kto").build(ds_config(type="llama3.ultra"), data_settings(), tok)
    process = ProcessPreference(f, sides=KTO_SIDES, sequence_len=10_000, excess_length_strategy="drop", keep_parts=True)
    return f, [process(r)[0] for r in KTO_ROWS]


def kto_batch(tok, length: int = 128) -> dict[str, np.ndarray]:
    _, examples = kto_parts(tok)
    return CollateKTO(10_000)(examples, length)


def jnp_batch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    return {k: jnp.asarray(v) for k, v in batch.items()}


def cfg(**kw: Any) -> JaxprefConfig:
    """A validated config with the given keys: the preference defaults are the schema's (TRL's)."""
    if kw.get("adapter") == "lora":
        kw.setdefault("lora_target_linear", True)
    return config(**kw)


def floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def jit_loss(objective, model, batch: dict[str, np.ndarray], num_items: float, companions=None):
    """``objective.loss(model, batch, num_items, train=False)`` jitted (eager scans are slow), floats out."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    others = {k: nnx.split(m) for k, m in (companions or {}).items()}

    @jax.jit
    def run(state, other_states, b):
        kw = {}
        if objective.companions:
            kw["companions"] = {k: nnx.merge(others[k][0], s) for k, s in other_states.items()}
        return objective.loss(nnx.merge(graphdef, state), b, jnp.float32(num_items), train=False, **kw)

    loss, metrics = run(state, {k: s for k, (_, s) in others.items()}, jnp_batch(batch))
    return float(loss), floats(metrics)
