"""Reward models: a scalar ``score`` head on the decoder, as transformers' ``*ForSequenceClassification``.

The head is an optional attribute of a :class:`CausalLM` (``model.score``, kernel [H, 1], no bias),
attached by :func:`add_score_head`; the CausalLM API is unchanged. The reward of a sequence is the
head applied to the final hidden state of its **last real token** (the rightmost position with
``segment_ids > 0``), which is where transformers' ``LlamaForSequenceClassification`` pools (the
last token that is not ``pad_token_id``, so the pad token must not occur inside sequences; a
tokenizer whose pad token is its EOS token would make transformers score the token before a final
EOS, and :func:`save_reward_model` warns about it).

:func:`save_reward_model` writes a directory that ``AutoModelForSequenceClassification`` loads:
the decoder's ``model.*`` tensors, ``score.weight`` [1, H], and a config with the architecture
``<Family>ForSequenceClassification``, ``num_labels`` 1 and ``pad_token_id``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpref.errors import ModelError
from jaxpref.models.decoder import CausalLM
from jaxpref.models.hf_io import _dtype_name, hf_sort_key, tensor_specs, to_host
from jaxpref.models.layers import make_param
from jaxpref.models.safetensors_io import write_safetensors

log = logging.getLogger(__name__)

ARCHITECTURES = {
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
    "gemma2": "Gemma2ForSequenceClassification",
    "gemma3_text": "Gemma3TextForSequenceClassification",
    "phi3": "Phi3ForSequenceClassification",
}


class ScoreParam(nnx.LoRAParam):
    """The score kernel when the decoder trains LoRA adapters: trainable next to them (a LoRAParam),
    as PEFT's ``modules_to_save=["score"]`` for sequence classification."""


class ScoreHead(nnx.Module):
    """``reward = h . kernel``: kernel [H, 1] (transformers ``score.weight`` [1, H] transposed)."""

    def __init__(self, hidden_size: int, *, std: float, param_dtype: Any, rngs: nnx.Rngs, trainable_with_lora: bool):
        value = (std * jax.random.normal(rngs.params(), (hidden_size, 1), jnp.float32)).astype(param_dtype)
        self.kernel = make_param(value, ("embed", None), ScoreParam if trainable_with_lora else nnx.Param)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., H] -> float32 rewards [...]."""
        return jnp.einsum("...h,ho->...o", hidden.astype(jnp.float32), self.kernel[...].astype(jnp.float32))[..., 0]


def add_score_head(model: CausalLM, *, seed: int = 0, std: float | None = None) -> CausalLM:
    """Attach a freshly initialised ``score`` head (normal(0, initializer_range), as transformers) in place.

    Call it after ``jaxpref.lora.apply_lora`` when training adapters, so the head is trainable with them.
    """
    cfg = model.config
    model.score = ScoreHead(
        cfg.hidden_size,
        std=cfg.initializer_range if std is None else std,
        param_dtype=model.param_dtype,
        rngs=nnx.Rngs(seed),
        trainable_with_lora=model.lora_config is not None,
    )
    return model


def last_token_index(segment_ids: jax.Array) -> jax.Array:
    """[B, T] segment ids -> [B] index of the rightmost real token (0 for an all-padding row)."""
    positions = jnp.arange(segment_ids.shape[-1])
    return jnp.max(jnp.where(segment_ids > 0, positions, 0), axis=-1)


def sequence_rewards(
    model: CausalLM,
    input_ids: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    deterministic: bool = True,
) -> jax.Array:
    """Scalar rewards [B] float32 of [B, T] sequences (one per row; ``segment_ids`` 0 = padding)."""
    if getattr(model, "score", None) is None:
        raise ModelError("the model has no score head: call jaxpref.models.reward.add_score_head(model) first")
    if segment_ids is None:
        segment_ids = jnp.ones_like(input_ids)
    hidden = model(input_ids, positions=positions, segment_ids=segment_ids, deterministic=deterministic)
    last = last_token_index(segment_ids)
    h_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, H]
    return model.score(h_last)


def load_score_head(model: CausalLM, path: str | os.PathLike) -> CausalLM:
    """Attach the ``score.weight`` of a saved sequence-classification checkpoint to ``model``."""
    from jaxpref.models.safetensors_io import SafetensorsReader

    with SafetensorsReader.for_checkpoint(os.fspath(path)) as reader:
        if "score.weight" not in reader.keys():  # noqa: SIM118  (a reader, not a dict)
            raise ModelError(f"{path} has no score.weight tensor: it is not a reward (sequence classification) model")
        weight = np.asarray(reader.get("score.weight"), dtype=np.float32)
    add_score_head(model)
    model.score.kernel.set_value(jnp.asarray(weight.T, dtype=model.param_dtype))
    return model


def save_reward_model(
    model: CausalLM,
    out_dir: str | os.PathLike,
    *,
    pad_token_id: int | None,
    eos_token_id: int | None = None,
    dtype: Any = None,
) -> None:
    """Write config.json + safetensors that ``AutoModelForSequenceClassification`` loads (num_labels 1).

    The model must have no LoRA adapters (merge them first with ``jaxpref.lora.merge_lora`` and
    re-attach the head). ``pad_token_id`` is required: transformers pools at the last non-pad token.
    """
    if model.lora_config is not None:
        raise ModelError("save_reward_model needs a model without LoRA: merge the adapters first")
    if getattr(model, "score", None) is None:
        raise ModelError("save_reward_model: the model has no score head")
    if pad_token_id is None:
        raise ModelError(
            "save_reward_model needs pad_token_id: transformers' sequence classifiers pool at the last token "
            "that is not the pad token; give the tokenizer a pad token (special_tokens: {pad_token: ...})"
        )
    if eos_token_id is not None and pad_token_id == eos_token_id:
        log.warning(
            "the pad token is the EOS token (id %d): transformers scores the last token that is not the pad "
            "token, so for sequences ending in EOS it scores the token before it, unlike jaxpref's training; "
            "use a pad token of its own",
            pad_token_id,
        )
    model_type = model.config.hf_config.get("model_type", "llama")
    if model_type not in ARCHITECTURES:
        raise ModelError(f"no sequence-classification export for model_type {model_type!r}")
    out_dir = os.fspath(out_dir)
    out_dtype = np.dtype(model.param_dtype if dtype is None else jnp.dtype(dtype))
    tensors = []
    for spec in tensor_specs(model):
        if spec.module[0] == "lm_head":  # a classifier has no LM head
            continue
        for i, name in enumerate(spec.hf_names()):

            def fetch(spec: Any = spec, i: int = i) -> np.ndarray:
                value = spec.variable[...]
                return spec.to_hf(to_host(value if spec.num_layers is None else value[i]))

            tensors.append((name, spec.hf_shape, out_dtype, fetch))
    hidden = model.config.hidden_size
    tensors.append(("score.weight", (1, hidden), out_dtype, lambda: to_host(model.score.kernel[...]).T))
    tensors.sort(key=lambda t: hf_sort_key(t[0]))
    write_safetensors(tensors, out_dir, base="model", max_shard_size=5 * 1024**3)
    if jax.process_index() == 0:
        d = model.config.to_hf_dict()
        d.pop("torch_dtype", None)
        d.update(
            {
                "dtype": _dtype_name(out_dtype),
                "architectures": [ARCHITECTURES[model_type]],
                "id2label": {"0": "LABEL_0"},
                "label2id": {"LABEL_0": 0},
                "pad_token_id": int(pad_token_id),
            }
        )
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(d, f, indent=2, sort_keys=True)
