"""The typed config: ``JaxprefConfig`` (pydantic v2), the union of the sections of
``jaxpref.config.sections``, with the validators that translate axolotl keys, resolve the defaults
that depend on other keys and check keys against each other.
"""

from __future__ import annotations

import math
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
        self._resolve_eval_cadence()
        if self.eval_batch_size is None:
            self.eval_batch_size = self.micro_batch_size
        if self.pad_to_sequence_len is None:
            self.pad_to_sequence_len = self.sample_packing
        if self.dataset_processes is None:
            self.dataset_processes = min(32, os.cpu_count() or 1)
        if self.chat_template_jinja and "chat_template" not in self.model_fields_set:
            self.chat_template = "jinja"
        p += self._resolve_objective()
        if self.rl == "ipo" and "dpo_loss_type" not in self.model_fields_set:
            self.dpo_loss_type = ["ipo"]  # rl: ipo is DPO with the ipo loss (TRL's loss_type=["ipo"])
        p += self._resolve_beta()
        p += self._resolve_4bit()
        return p

    def _resolve_4bit(self) -> list[str]:
        """QLoRA keys: ``bnb_4bit_compute_dtype`` is ``compute_dtype`` (sets it, or must agree); the other
        ``bnb_4bit_*`` keys need ``load_in_4bit``."""
        p: list[str] = []
        bnb_set = sorted(k for k in self.model_fields_set if k.startswith("bnb_4bit_"))
        if not self.load_in_4bit:
            if bnb_set:
                warn(f"ignored: {', '.join(bnb_set)} (no effect without load_in_4bit: true / adapter: qlora)")
            return p
        if self.bnb_4bit_compute_dtype is not None:
            if "compute_dtype" not in self.model_fields_set:
                self.compute_dtype = self.bnb_4bit_compute_dtype
            elif self.compute_dtype != self.bnb_4bit_compute_dtype:
                p.append(
                    f"bnb_4bit_compute_dtype ({self.bnb_4bit_compute_dtype}) and compute_dtype ({self.compute_dtype}) "
                    "disagree: the dequantized weights are computed in compute_dtype; keep one of them"
                )
        storage = (self.bnb_4bit_quant_storage or "uint8").strip().lower().removeprefix("torch.")
        if storage != "uint8":
            warn(
                f"bnb_4bit_quant_storage: {self.bnb_4bit_quant_storage} has no effect: jaxpref packs two 4-bit codes "
                "per uint8 (the same bytes; bitsandbytes' storage dtype only matters to torch FSDP)"
            )
        return p

    def _resolve_beta(self) -> list[str]:
        """axolotl passes one beta to every TRL preference trainer: trl.beta, else rl_beta, else orpo_alpha
        (core/builders/rl.py; ``trl.beta`` and ``dpo_beta`` load as rl_beta). So ORPO's weight is rl_beta when
        that is set, and a DPO/IPO/KTO/SimPO run with orpo_alpha but no rl_beta takes orpo_alpha as beta.
        Where this makes a key silently lose (or win) against what it says, the config is an error."""
        beta_set = "rl_beta" in self.model_fields_set
        alpha_set = "orpo_alpha" in self.model_fields_set
        if self.rl == "orpo":
            if beta_set and alpha_set and self.rl_beta != self.orpo_alpha:
                return [
                    f"rl: orpo with rl_beta ({self.rl_beta}) and orpo_alpha ({self.orpo_alpha}): axolotl passes "
                    "ORPO's weight as TRL's beta, taking trl.beta, then rl_beta, then orpo_alpha, so it would "
                    f"train with {self.rl_beta}; keep one of the two keys"
                ]
            if beta_set:
                self.orpo_alpha = self.rl_beta
            elif self.orpo_alpha > 0:
                self.rl_beta = self.orpo_alpha  # one value for TRL's beta, so the saved config reads back the same
        elif alpha_set and self.rl is not None:
            if not beta_set and self.orpo_alpha != self.rl_beta:
                return [
                    f"orpo_alpha: {self.orpo_alpha} with rl: {self.rl} and no rl_beta: axolotl would use orpo_alpha as "
                    f"{self.rl}'s beta (it takes trl.beta, then rl_beta, then orpo_alpha); write "
                    f"rl_beta: {self.orpo_alpha} to train as axolotl does, or remove orpo_alpha for beta {self.rl_beta}"
                ]
            warn(f"orpo_alpha has no effect with rl: {self.rl} (rl_beta is its beta)")
        elif alpha_set:
            warn("orpo_alpha has no effect without rl: orpo")
        return []

    def _resolve_eval_cadence(self) -> None:
        """axolotl reads ``eval_steps: 0`` and ``evals_per_epoch: 0`` as not set, and runs no evaluation
        when neither is set. A 0 next to a cadence > 0 is dropped; a 0 alone (the common
        ``evals_per_epoch: 0``) is kept as ``evals_per_epoch: 0``, no evaluation, so that it does not fall
        back to jaxpref's own default (one evaluation after the last step)."""
        zero = 0 in (self.eval_steps, self.evals_per_epoch)
        if self.eval_steps == 0:
            self.eval_steps = None
        if self.evals_per_epoch == 0:
            self.evals_per_epoch = None
        if zero and self.eval_steps is None and self.evals_per_epoch is None:
            self.evals_per_epoch = 0
            if self.val_set_size or self.test_datasets:
                what = (
                    "the val_set_size rows are still held out of training"
                    if self.val_set_size
                    else ("test_datasets are still loaded")
                )
                warn(f"evals_per_epoch: 0 (or eval_steps: 0): no evaluation, as in axolotl; {what}")

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
        if self.load_in_4bit and self.adapter != "lora":
            p.append(
                "load_in_4bit: true stores the frozen base in 4 bits for QLoRA and needs adapter: qlora (LoRA "
                "adapters trained on top); 4-bit weights cannot be fully fine-tuned. Set adapter: qlora, or remove "
                "load_in_4bit for full fine-tuning"
            )
        if self.qlora_quantize_embeddings:
            if not self.load_in_4bit:
                p.append(
                    "qlora_quantize_embeddings: true stores the embedding as NF4 beside a 4-bit (QLoRA) base and needs "
                    "adapter: qlora (or load_in_4bit: true); remove it otherwise"
                )
            saved = sorted(set(self.lora_modules_to_save or ()) & {"embed_tokens", "lm_head"})
            if saved:
                p.append(
                    f"qlora_quantize_embeddings: true with lora_modules_to_save {saved}: a trainable copy of the table "
                    "holds it in full precision (plus optimizer state), undoing the 4-bit storage; remove "
                    f"{', '.join(saved)} from lora_modules_to_save or set qlora_quantize_embeddings: false"
                )
        if self.adapter == "lora":
            if not (self.lora_target_modules or self.lora_target_linear or self.lora_model_dir):
                p.append("adapter: lora needs lora_target_modules (e.g. [q_proj, v_proj]) or lora_target_linear: true")
        else:
            stray = [k for k in _LORA_KEYS if k in self.model_fields_set]
            if stray:
                warn(f"ignored: {', '.join(stray)} (adapter is not lora: full fine-tuning)")
        if self.center_rewards_coefficient is not None and not self.reward_model:
            warn("center_rewards_coefficient has no effect without reward_model: true (as in axolotl)")
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
        p.extend(self._grpo_problems())
        p.extend(self._kd_problems())
        if self.eval_generation is not None:
            if not (self.val_set_size or self.test_datasets):
                warn("eval_generation has no effect without an eval set (val_set_size or test_datasets)")
            streamed = [ds for ds in [*(self.datasets or []), *(self.test_datasets or [])] if ds.streaming]
            if streamed:
                p.append("eval_generation: reads the eval rows in memory; it does not work with streaming datasets")
            if self.reward_model:
                p.append("eval_generation: a reward model scores sequences and does not generate; remove it")
        return p

    def _grpo_problems(self) -> list[str]:
        """``rl: grpo``: the trl section with reward functions, whole groups per process and step, and the
        keys that mean nothing for online RL."""
        if self.rl != "grpo":
            return []
        p: list[str] = []
        trl = self.trl
        if trl is None or not trl.reward_funcs:
            return ["rl: grpo needs trl.reward_funcs: the reward functions as import paths (module.function)"]
        rows = self.micro_batch_size * self.gradient_accumulation_steps
        if rows % trl.num_generations:
            p.append(
                f"rl: grpo samples micro_batch_size x gradient_accumulation_steps = {rows} completions per process "
                f"and step, which must be whole groups of trl.num_generations = {trl.num_generations}; change "
                "one of them"
            )
        if "rl_beta" in self.model_fields_set:
            p.append("rl_beta is DPO's beta; GRPO's KL weight is trl.beta (as in axolotl and TRL)")
        if self.precompute_ref_log_probs:
            p.append("precompute_ref_log_probs: GRPO's completions are new every step; remove it")
        if self.sample_packing:
            warn("sample_packing has no effect with rl: grpo: each completion is one row, as in TRL")
        if trl.beta == 0 and self.rl_adapter_ref_model:
            warn("rl_adapter_ref_model has no effect with trl.beta 0: GRPO then uses no reference model")
        return p

    def _kd_problems(self) -> list[str]:
        """The KD teacher sources: stored targets, kd_teacher_model (in the step) or a teacher server."""
        p = []
        if self.kd_online_server_base_url:
            if not self.kd_trainer:
                p.append("kd_online_server_base_url: the teacher server gives KD targets; set kd_trainer: true")
            if self.kd_teacher_model:
                p.append(
                    "kd_online_server_base_url and kd_teacher_model: choose one teacher (a server, or a "
                    "checkpoint run inside the train step)"
                )
            if self.kd_online_topk is None:
                p.append("kd_online_server_base_url needs kd_online_topk: the entries per position to ask for (K)")
            if not self.kd_online_server_base_url.startswith(("http://", "https://")):
                p.append(
                    f"kd_online_server_base_url: {self.kd_online_server_base_url!r} is not an http(s) URL "
                    "(e.g. http://127.0.0.1:8000)"
                )
        elif self.kd_online_topk is not None:
            warn("kd_online_topk has no effect without kd_online_server_base_url")
        if self.kd_temperature_min is not None and not self.kd_trainer:
            warn("kd_temperature_min has no effect without kd_trainer")
        if self.kd_on_policy_ratio > 0:
            if not self.kd_trainer:
                p.append("kd_on_policy_ratio: on-policy distillation is a KD setting; set kd_trainer: true")
            elif not (self.kd_teacher_model or self.kd_online_server_base_url):
                p.append(
                    f"kd_on_policy_ratio={self.kd_on_policy_ratio}: on-policy steps train on the student's own "
                    "completions, which stored KD targets cannot score; set kd_teacher_model (a teacher run in the "
                    "train step) or kd_online_server_base_url (a teacher server), or kd_on_policy_ratio: 0"
                )
        return p

    def _preference_problems(self) -> list[str]:
        """The DPO keys as TRL 1.16's ``DPOConfig`` / ``DPOTrainer`` check them: label smoothing only where
        TRL reads it (the robust/exo_pair/aot/aot_unpaired losses and SimPO; TRL silently ignores it
        elsewhere, e.g. for the sigmoid loss), exo_pair needs it > 0, robust < 0.5; one
        ``dpo_loss_weights`` entry per ``dpo_loss_type``; WPO weighting not with the sorted aot losses nor with
        sft (TRL 1.16 fails on it)."""
        p: list[str] = []
        types, weights = self.dpo_loss_type, self.dpo_loss_weights
        named = types[0] if len(types) == 1 else f"[{', '.join(types)}]"
        smoothing = self.dpo_label_smoothing
        if self.rl in ("dpo", "ipo"):
            if smoothing and not {"robust", "exo_pair", "aot", "aot_unpaired"} & set(types):
                warn(
                    f"dpo_label_smoothing={smoothing} has no effect with dpo_loss_type {named} (TRL 1.16 only uses "
                    "it in the robust, exo_pair, aot and aot_unpaired losses); for conservative DPO use "
                    "dpo_loss_type: robust"
                )
            if "exo_pair" in types and not smoothing:
                p.append("dpo_loss_type: exo_pair needs dpo_label_smoothing > 0 (the EXO paper uses 1e-3)")
            if "robust" in types and smoothing >= 0.5:
                p.append(f"dpo_label_smoothing={smoothing}: the robust loss needs a value in [0, 0.5)")
            if weights is not None and len(weights) != len(types):
                p.append(
                    f"dpo_loss_weights has {len(weights)} entries for the {len(types)} of dpo_loss_type {named}; "
                    "give one weight per loss type, in the same order (or remove dpo_loss_weights: 1.0 each)"
                )
            if weights is not None and not all(math.isfinite(w) and w >= 0 for w in weights):
                p.append(f"dpo_loss_weights {weights}: each weight must be a finite number >= 0")
            if self.dpo_use_weighting and {"aot", "aot_unpaired"} & set(types):
                p.append(
                    "dpo_use_weighting (WPO) does not work with dpo_loss_type aot or aot_unpaired: they sort the "
                    "pairs over the batch, so per-pair weights would be misaligned (TRL refuses this too); remove "
                    "one of them"
                )
            if self.dpo_use_weighting and "sft" in types:
                p.append(
                    "dpo_use_weighting (WPO) with dpo_loss_type sft: TRL 1.16 fails on this combination (it weights "
                    "the batch-level sft loss in place), so there is no reference behaviour to match; remove sft "
                    "from dpo_loss_type or turn dpo_use_weighting off"
                )
        elif smoothing and self.rl != "simpo":
            warn(f"dpo_label_smoothing has no effect with {self.rl or 'this objective'} (only DPO and SimPO use it)")
        if self.rl == "ipo":
            if types != ["ipo"]:
                p.append(f"rl: ipo is DPO with the ipo loss; remove dpo_loss_type: {named} or use rl: dpo")
            if weights is not None:
                p.append(
                    "rl: ipo trains the ipo loss alone; remove dpo_loss_weights, or use rl: dpo with "
                    "dpo_loss_type: [ipo, ...] to combine losses"
                )
        elif self.rl not in ("dpo", None):
            given = [k for k in ("dpo_loss_type", "dpo_loss_weights") if k in self.model_fields_set]
            given += ["dpo_use_weighting"] if self.dpo_use_weighting else []
            for key in given:
                warn(f"{key} has no effect with rl: {self.rl}")
        return p
