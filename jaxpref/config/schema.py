"""The typed config: ``JaxprefConfig`` (pydantic v2), the union of the sections of
``jaxpref.config.sections``, with the validators that translate axolotl keys, resolve the defaults
that depend on other keys and check keys against each other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import PrivateAttr, ValidationInfo, model_validator

from jaxpref.config import axolotl
from jaxpref.config.nested import DatasetConfig
from jaxpref.config.notes import warn
from jaxpref.config.sections import BUILTIN_OBJECTIVES, PREFERENCE_OBJECTIVES, SECTIONS

_LORA_KEYS = (
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_target_linear",
    "lora_modules_to_save",
    "lora_model_dir",
)


class JaxprefConfig(*SECTIONS):
    """A validated jaxpref config. Build it with ``load_config`` (YAML + overrides + paths) or
    ``JaxprefConfig.model_validate(dict)``; axolotl keys are translated either way.

    After validation every default is resolved: ``remat_policy``, ``eval_batch_size``,
    ``pad_to_sequence_len``, ``dataset_processes`` and ``chat_template`` hold concrete values.
    Validation context (optional): ``require_datasets`` (default True).
    """

    _warnings: tuple[str, ...] = PrivateAttr(default=())
    _config_path: Path | None = PrivateAttr(default=None)

    @property
    def warnings(self) -> tuple[str, ...]:
        """The warning lines emitted while loading this config (also logged on ``jaxpref.config``)."""
        return self._warnings

    @property
    def config_path(self) -> Path | None:
        """The YAML file this config was loaded from, if any."""
        return self._config_path

    @property
    def kd_top_k_before_softmax(self) -> bool:
        """axolotl's name for ``kd_normalize_topk``."""
        return self.kd_normalize_topk

    @model_validator(mode="before")
    @classmethod
    def _from_axolotl(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = axolotl.drop_empty(data)
        errors = axolotl.translate(data, cls.model_fields, DatasetConfig.model_fields)
        if errors:
            raise ValueError("\n".join(errors))
        return data

    @model_validator(mode="after")
    def _resolve_and_check(self, info: ValidationInfo) -> JaxprefConfig:
        problems = self._resolve_defaults()
        problems += self._problems(require_datasets=(info.context or {}).get("require_datasets", True))
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _resolve_defaults(self) -> list[str]:
        """Fill the defaults that depend on other keys; returns the contradictions found doing so."""
        p: list[str] = []
        if self.remat_policy is None:
            self.remat_policy = "full" if self.gradient_checkpointing else "none"
        elif self.remat_policy == "none" and self.gradient_checkpointing:
            p.append(
                "gradient_checkpointing: true and remat_policy: none contradict each other; remove one "
                "(remat_policy none turns checkpointing off, full/dots/dots_with_no_batch_dims turn it on)"
            )
        self.gradient_checkpointing = self.remat_policy != "none"
        if self.eval_batch_size is None:
            self.eval_batch_size = self.micro_batch_size
        if self.pad_to_sequence_len is None:
            self.pad_to_sequence_len = self.sample_packing
        if self.dataset_processes is None:
            self.dataset_processes = min(32, os.cpu_count() or 1)
        if self.chat_template_jinja and "chat_template" not in self.model_fields_set:
            self.chat_template = "jinja"
        p += self._resolve_objective()
        return p

    def _resolve_objective(self) -> list[str]:
        """``objective: dpo`` (a built-in name) and ``rl: dpo`` say the same: either sets the other, so the
        data and the objective are chosen from one answer; both set and different is a contradiction."""
        implied = self.rl or ("reward" if self.reward_model else "kd" if self.kd_trainer else None)
        if self.objective not in BUILTIN_OBJECTIVES:
            return []  # unset, or a plugin (package.module:builder): the keys decide the data
        if implied is not None and implied != self.objective:
            keys = f"rl: {self.rl}" if self.rl else "reward_model: true" if self.reward_model else "kd_trainer: true"
            return [f"objective: {self.objective} and {keys} ask for different objectives; keep one of them"]
        if self.objective in PREFERENCE_OBJECTIVES:
            self.rl = self.objective
        self.reward_model = self.reward_model or self.objective == "reward"
        self.kd_trainer = self.kd_trainer or self.objective == "kd"
        return []

    def _problems(self, *, require_datasets: bool) -> list[str]:
        """Cross-field checks; each problem is one line naming the keys involved."""
        p: list[str] = []
        if self.base_model is None:
            if not (self.random_init_weights and self.base_model_config):
                p.append(
                    "base_model: required (a Hugging Face model directory or hub id), unless "
                    "random_init_weights: true with base_model_config"
                )
            if self.tokenizer_config is None:
                p.append("tokenizer_config: required when base_model is not set")
        if require_datasets and not self.datasets:
            p.append("datasets: required for training (a list of at least one dataset)")
        if self.test_datasets == []:
            p.append("test_datasets: empty list; remove the key or add a dataset")
        if self.test_datasets and self.val_set_size:
            p.append("val_set_size and test_datasets: use one of them for evaluation, not both")
        if self.chat_template == "jinja" and not self.chat_template_jinja:
            p.append("chat_template: jinja needs chat_template_jinja (template text or a .jinja file)")
        elif self.chat_template_jinja and self.chat_template != "jinja":
            warn(f"chat_template_jinja is not used because chat_template is {self.chat_template}")
        for name in ("datasets", "test_datasets"):
            for i, ds in enumerate(getattr(self, name) or []):
                if ds.chat_template == "jinja" and not self.chat_template_jinja:
                    p.append(f"{name}[{i}].chat_template: jinja needs the top-level chat_template_jinja")
        if self.dataset_exact_deduplication:
            streamed = [f"datasets[{i}]" for i, ds in enumerate(self.datasets or []) if ds.streaming]
            if streamed:
                p.append(
                    f"dataset_exact_deduplication: not available for streaming datasets ({', '.join(streamed)} "
                    "stream): a stream is never held whole, so an earlier duplicate cannot be known (axolotl refuses "
                    "this too). Remove dataset_exact_deduplication, or load the datasets in memory (streaming: false)"
                )
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            p.append("warmup_steps and warmup_ratio: set one of them, not both")
        if self.eval_steps is not None and self.evals_per_epoch is not None:
            p.append("eval_steps and evals_per_epoch: set one of them, not both")
        if self.save_steps is not None and self.saves_per_epoch is not None:
            p.append("save_steps and saves_per_epoch: set one of them, not both")
        modes = [
            k
            for k, on in (
                ("rl", self.rl),
                ("kd_trainer", self.kd_trainer),
                ("reward_model", self.reward_model),
            )
            if on
        ]
        if len(modes) > 1:
            p.append(f"{' and '.join(modes)}: choose one training objective (they are mutually exclusive)")
        if self.adapter == "lora":
            if not (self.lora_target_modules or self.lora_target_linear or self.lora_model_dir):
                p.append("adapter: lora needs lora_target_modules (e.g. [q_proj, v_proj]) or lora_target_linear: true")
        else:
            stray = [k for k in _LORA_KEYS if k in self.model_fields_set]
            if stray:
                warn(f"ignored: {', '.join(stray)} (adapter is not lora: full fine-tuning)")
        if self.precompute_ref_log_probs and (self.rl in ("orpo", "simpo") or self.reward_model):
            warn(f"precompute_ref_log_probs has no effect: {self.rl or 'reward_model'} uses no reference model")
        if self.train_on_inputs and (self.rl or self.reward_model):
            warn(
                f"train_on_inputs has no effect with {f'rl: {self.rl}' if self.rl else 'reward_model'}: preference "
                "losses score the completion only (as TRL's trainers); the prompt is context"
            )
        if self.rl == "kto" and self.micro_batch_size < 2 and not self.precompute_ref_log_probs:
            p.append(
                "rl: kto with micro_batch_size 1: KTO's KL term pairs each row with another row of its "
                "micro-batch, so with one row it pairs the row with itself and the loss stays at its "
                "starting value (TRL refuses this too); set micro_batch_size >= 2, or "
                "precompute_ref_log_probs: true (partners fixed across the whole dataset)"
            )
        p.extend(self._preference_problems())
        return p

    def _preference_problems(self) -> list[str]:
        """Label smoothing as TRL 1.16 uses it: only DPO's robust/exo_pair/aot/aot_unpaired losses and
        SimPO read it (TRL silently ignores it elsewhere, e.g. for the sigmoid loss); exo_pair needs it > 0,
        robust < 0.5."""
        p: list[str] = []
        loss_type = "ipo" if self.rl == "ipo" else (self.dpo_loss_type or "sigmoid")
        smoothing = self.dpo_label_smoothing
        if self.rl in ("dpo", "ipo"):
            if smoothing and loss_type not in ("robust", "exo_pair", "aot", "aot_unpaired"):
                warn(
                    f"dpo_label_smoothing={smoothing} has no effect with dpo_loss_type {loss_type} (TRL 1.16 only uses "
                    "it in the robust, exo_pair, aot and aot_unpaired losses); for conservative DPO use "
                    "dpo_loss_type: robust"
                )
            if loss_type == "exo_pair" and not smoothing:
                p.append("dpo_loss_type: exo_pair needs dpo_label_smoothing > 0 (the EXO paper uses 1e-3)")
            if loss_type == "robust" and smoothing >= 0.5:
                p.append(f"dpo_label_smoothing={smoothing}: the robust loss needs a value in [0, 0.5)")
        elif smoothing and self.rl != "simpo":
            warn(f"dpo_label_smoothing has no effect with {self.rl or 'this objective'} (only DPO and SimPO use it)")
        if self.rl == "ipo" and self.dpo_loss_type not in (None, "ipo"):
            p.append(f"rl: ipo is DPO with the ipo loss; remove dpo_loss_type: {self.dpo_loss_type} or use rl: dpo")
        elif self.dpo_loss_type and self.rl not in ("dpo", "ipo", None):
            warn(f"dpo_loss_type has no effect with rl: {self.rl}")
        return p
