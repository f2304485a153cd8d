"""The trained model written out at the end of a run: a Hugging Face directory, a PEFT adapter (LoRA),
or a reward model as a transformers ``*ForSequenceClassification`` directory, plus the tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from jaxpref import lora, models
from jaxpref.models.reward import save_reward_model
from jaxpref.trainer import Trainer


def export_final(cfg: Any, trainer: Trainer, tokenizer: Any, out_dir: Path) -> None:
    """Write the trained model as a Hugging Face directory (or PEFT adapter) plus the tokenizer.

    Every process calls this (gathering sharded weights is a collective); only process 0 writes.
    """
    model = trainer.model()
    if trainer.objective.score_head:
        export_reward_model(cfg, model, tokenizer, out_dir)
    elif cfg.adapter == "lora":
        lora.export_peft_adapter(model, out_dir, base_model_name_or_path=cfg.base_model)
    else:
        models.save_pretrained(model, out_dir)
    if jax.process_index() == 0:
        tokenizer.save_pretrained(out_dir)


def export_reward_model(cfg: Any, model: Any, tokenizer: Any, out_dir: Path) -> None:
    """A reward model as a transformers ``*ForSequenceClassification`` directory (LoRA merged in)."""
    if cfg.adapter == "lora":
        score = model.score
        model = lora.merge_lora(model)
        model.score = score
    save_reward_model(model, out_dir, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
