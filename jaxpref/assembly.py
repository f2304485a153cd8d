"""A run's pieces from its config: the objective's name, model (+ LoRA), data, companions, trainer.

``python -m jaxpref.train`` assembles a run from these, and so do ``--dry_run --lower_for``
(``jaxpref.lowering``), the benchmarks and the tests, so every path builds the same step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxpref.errors import ConfigError
from jaxpref.optim import make_optimizer
from jaxpref.trainer import Trainer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def objective_name(cfg: Any) -> str:
    """The objective a config asks for: an explicit ``objective``, else by ``rl``/KD keys, else SFT."""
    if cfg.objective:
        return cfg.objective
    if cfg.rl or cfg.reward_model:
        return cfg.rl or "reward"
    if cfg.kd_trainer:
        return "kd"
    return "sft"


def lora_config(cfg: Any) -> Any:
    """The LoRA settings of ``cfg`` (``adapter: lora``)."""
    from jaxpref import lora

    return lora.LoraConfig(
        r=cfg.lora_r,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        target_modules=tuple(lora.resolve_target_modules(cfg.lora_target_modules, cfg.lora_target_linear)),
        modules_to_save=tuple(cfg.lora_modules_to_save or ()),
    )


def quantization(cfg: Any) -> Any:
    """The NF4 settings of the base model (``load_in_4bit``, QLoRA), or None for float weights."""
    if not cfg.load_in_4bit:
        return None
    from jaxpref.models.nf4 import NF4Config

    return NF4Config(double_quant=cfg.bnb_4bit_use_double_quant, quantize_embeddings=cfg.qlora_quantize_embeddings)


def build_model(cfg: Any, vocab_needed: int, mesh: Any = None, *, weights: bool = True) -> Any:
    """The base model (pretrained or random init), with LoRA applied when configured.

    With a mesh, every parameter is created (or read) straight into its shard. ``weights=False``
    initialises from the checkpoint's ``config.json`` without reading tensors (for ``nnx.eval_shape``:
    lowering and planning).
    """
    from flax import nnx

    from jaxpref import lora, models

    rules = cfg.logical_axis_rules
    common = dict(
        dtype=DTYPES[cfg.compute_dtype],
        param_dtype=DTYPES[cfg.param_dtype],
        remat_policy=remat_policy(cfg),
        scan_layers=cfg.scan_layers,
        attention_impl=cfg.attention_impl,
        mesh=mesh,
        rules=rules,
        quantization=quantization(cfg),
    )
    if cfg.random_init_weights or not weights:
        mcfg = models.load_model_config(cfg.base_model_config or cfg.base_model)
        model = models.from_config(mcfg, seed=cfg.seed, **common)
    else:
        model = models.from_pretrained(cfg.base_model, **common)
    vocab = model.config.vocab_size
    if vocab_needed > vocab:
        raise ConfigError(
            f"the tokenizer has {vocab_needed} tokens but the model's vocab_size is {vocab}; use the "
            "model's own tokenizer (tokenizer_config) or do not add tokens beyond the embedding size."
        )
    if cfg.adapter == "lora":
        lora.apply_lora(model, lora_config(cfg), rngs=nnx.Rngs(cfg.seed + 1), mesh=mesh, rules=rules)
        if cfg.lora_model_dir and weights:
            lora.load_peft_adapter(model, cfg.lora_model_dir, mesh=mesh, rules=rules)
    return model


def build_data(settings: Any, tokenizer: Any, kind: str) -> Any:
    """This process's shard of the training (and eval) data for an objective's data ``kind``."""
    from jaxpref.data import build_lm_data, build_preference_data
    from jaxpref.data.prompts import build_prompt_data

    builders = {"lm": build_lm_data, "preference": build_preference_data, "prompts": build_prompt_data}
    if kind not in builders:
        raise ConfigError(f"objective needs data of kind {kind!r}; jaxpref has {', '.join(builders)}")
    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    if kind == "prompts":  # one prompt batch per optimizer step (data/prompts.py)
        shard.update(prompts_per_step=settings.prompts_per_step, repeats=settings.num_iterations)
    return builders[kind](settings, tokenizer, **shard)


def with_served_targets(cfg: Any, data: Any, tokenizer: Any) -> Any:
    """``data`` whose micro-batches get KD targets from ``kd_online_server_base_url`` (unchanged without
    one); ``close()`` the result when the run ends."""
    if not cfg.kd_online_server_base_url:
        return data
    from jaxpref.data import DataSettings
    from jaxpref.served_targets import ServedTeacherData
    from jaxpref.teacher_client import ServerSettings

    scale = 1.0 / DataSettings.from_config(cfg).target_temperature  # T_gen = 1: a server's prompt log-probs
    return ServedTeacherData(data, ServerSettings.from_config(cfg), scale=scale, vocab_size=len(tokenizer))


def build_teacher(cfg: Any, vocab_needed: int, mesh: Any, *, weights: bool = True) -> Any:
    """``kd_teacher_model`` (frozen, ``kd_teacher_dtype``, with ``kd_teacher_adapter``) straight into its
    shards; ConfigError when its vocabulary is smaller than the tokenizer's. ``weights=False``: from its
    ``config.json`` only."""
    from jaxpref import models

    opts = dict(
        dtype=DTYPES[cfg.compute_dtype], param_dtype=DTYPES[cfg.kd_teacher_dtype or cfg.param_dtype],
        scan_layers=cfg.scan_layers, attention_impl=cfg.attention_impl, mesh=mesh, rules=cfg.logical_axis_rules,
    )  # fmt: skip
    if weights:
        teacher = models.from_pretrained(cfg.kd_teacher_model, **opts)
    else:
        teacher = models.from_config(models.load_model_config(cfg.kd_teacher_model), seed=0, **opts)
    if cfg.kd_teacher_adapter and weights:
        from jaxpref import lora

        lora.load_peft_adapter(teacher, cfg.kd_teacher_adapter, mesh=mesh, rules=cfg.logical_axis_rules)
    vocab = teacher.config.vocab_size
    if vocab < vocab_needed:
        raise ConfigError(
            f"kd_teacher_model {cfg.kd_teacher_model} has vocab_size {vocab} but the tokenizer has {vocab_needed} "
            "tokens; the teacher must use the student's tokenizer (tokenizer_config / base_model)."
        )
    return teacher


def build_companions(
    cfg: Any, names: tuple[str, ...], vocab_needed: int, mesh: Any, *, weights: bool = True
) -> dict[str, Any]:
    """The frozen models an objective reads: ``teacher`` (``kd_teacher_model``), ``reference``
    (a frozen copy of the base model, without adapters). Each is created straight into its shards.
    ``weights=False``: from the checkpoints' ``config.json`` only (see ``build_model``)."""
    out = {}
    for name in names:
        if name == "teacher":
            out[name] = build_teacher(cfg, vocab_needed, mesh, weights=weights)
        elif name == "reference":
            dtype = cfg.rl_reference_dtype or cfg.param_dtype
            reference_cfg = cfg.model_copy(update={"adapter": None, "param_dtype": dtype})
            out[name] = build_model(reference_cfg, vocab_needed, mesh, weights=weights)
        else:
            raise ConfigError(f"the objective needs a companion model {name!r} that jaxpref cannot build")
    return out


def build_trainer(
    cfg: Any, objective: Any, data: Any, tokenizer: Any, mesh: Any, total_steps: int
) -> tuple[Trainer, Any]:
    """The model (+ LoRA, score head, reference pass), optimizer and companions, as a Trainer at step 0;
    also returns the learning-rate schedule."""
    from jaxpref import lora

    model = build_model(cfg, len(tokenizer), mesh)
    if objective.data == "preference":
        from jaxpref.reference_pass import prepare_preference_run

        prepare_preference_run(cfg, objective, model, data, mesh, tokenizer)  # score head, reference pass
    tx, schedule = make_optimizer(cfg, total_steps)
    trainer = Trainer(
        model,
        objective,
        tx,
        mesh=mesh,
        trainable=lora.trainable_filter(model),
        rules=cfg.logical_axis_rules,
        seed=cfg.seed,
        companions=build_companions(cfg, objective.companions, len(tokenizer), mesh),
        step_inputs=objective.schedules(total_steps) if objective.schedules else None,
    )
    return trainer, schedule


def remat_policy(cfg: Any) -> str:
    if cfg.remat_policy:
        return cfg.remat_policy
    return "full" if cfg.gradient_checkpointing else "none"
