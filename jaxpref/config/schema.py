"""The typed config schema: ``JaxprefConfig`` (pydantic v2), one section class per topic.

Key names follow axolotl where axolotl has the feature; defaults are axolotl's (or the Hugging Face
Trainer's / TRL's, which axolotl inherits) unless the description says otherwise. Axolotl-only keys
are translated before validation (``jaxpref.config.axolotl``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, PrivateAttr, ValidationInfo, model_validator

from jaxpref.config import axolotl, coerce
from jaxpref.config.nested import (
    ChatTemplateName,
    DatasetConfig,
    DistributedConfig,
    FusedKernelConfig,
    MeshConfig,
    Section,
    SpecialTokensConfig,
    StrList,
)
from jaxpref.config.notes import warn

DType = Literal["float32", "bfloat16"]


def _by_name(normalize: Any) -> Any:
    """A before-validator applying ``normalize`` to string values (other types fail type checks)."""
    return lambda value: normalize(value) if isinstance(value, str) else value


class ModelSection(Section):
    """Model and tokenizer."""

    base_model: str | None = Field(
        None,
        description="Hugging Face model directory or hub id. Required, unless random_init_weights is set "
        "with base_model_config.",
    )
    base_model_config: str | None = Field(
        None, description="Where config.json comes from, when not from base_model (directory or hub id)."
    )
    tokenizer_config: str | None = Field(None, description="Tokenizer directory or hub id; default: base_model.")
    random_init_weights: bool = Field(
        False,
        description="Build the model from its config.json with random weights instead of loading weights "
        "(axolotl: reinit_weights).",
    )
    chat_template: ChatTemplateName = Field(
        "tokenizer_default",
        description="tokenizer_default: the tokenizer's own template (axolotl default); jinja: "
        "chat_template_jinja (implied when only chat_template_jinja is given).",
    )
    chat_template_jinja: str | None = Field(None, description="A jinja chat template, or the path of a .jinja file.")
    special_tokens: SpecialTokensConfig | None = Field(None, description="Special tokens to set on the tokenizer.")
    param_dtype: DType = Field(
        "float32",
        description="Storage dtype of the model's parameters, trained and frozen (optimizer state and LoRA "
        "adapters stay float32; bfloat16 parameters are updated with stochastic rounding: see Precision). "
        "axolotl's bfloat16/float16: true set it.",
    )
    compute_dtype: DType = Field(
        "float32",
        description="Activation/matmul dtype (norms, softmax and losses stay float32); bf16: true|auto sets "
        "bfloat16 (axolotl's bf16 defaults to auto on GPUs; jaxpref's default is float32).",
    )
    gradient_checkpointing: Annotated[bool, BeforeValidator(coerce.gradient_checkpointing)] = Field(
        False, description="Rematerialise activations in backward (axolotl's offload variants -> true)."
    )
    remat_policy: Literal["none", "full", "dots", "dots_with_no_batch_dims"] | None = Field(
        None,
        description="What to save in backward; default: full when gradient_checkpointing, else none. "
        "Anything but none turns gradient_checkpointing on.",
    )
    scan_layers: bool = Field(True, description="Stack decoder layers and run them with a scan (fast compiles).")


class DataSection(Section):
    """Data."""

    datasets: list[DatasetConfig] | None = Field(None, description="Training datasets (required to train).")
    test_datasets: list[DatasetConfig] | None = Field(
        None, description="Evaluation datasets; use these or val_set_size, not both."
    )
    val_set_size: Annotated[int | float, BeforeValidator(coerce.count_or_fraction)] = Field(
        0.0,
        description="Held-out evaluation rows: a fraction in [0, 1) of the training data, or a whole "
        "number of rows >= 1 (axolotl default 0: no evaluation).",
    )
    sequence_len: int = Field(512, ge=1, description="Maximum tokens per row (axolotl default).")
    sample_packing: bool = Field(False, description="Pack several rows into each sequence_len row.")
    pad_to_sequence_len: bool | None = Field(
        None, description="Pad every batch to sequence_len; default: same as sample_packing (axolotl)."
    )
    excess_length_strategy: Literal["drop", "truncate", "raise"] = Field(
        "drop", description="Rows longer than sequence_len: drop (axolotl default), truncate, or raise."
    )
    train_on_inputs: bool = Field(False, description="Also train on prompt tokens (axolotl default: false).")
    dataset_prepared_path: str | None = Field(None, description="Cache directory for tokenized datasets.")
    dataset_processes: int | None = Field(
        None,
        ge=1,
        description="Worker processes for the per-row step (format, tokenize, KD targets) of in-memory "
        "datasets; default: min(32, CPU count), as axolotl. Small datasets stay in one process (below about "
        "12 s of per-row work); the result is the same. Not used for streaming datasets.",
    )
    max_bad_row_fraction: float = Field(
        0.5, ge=0, le=1, description="A dataset with more bad rows than this fraction is an error."
    )


class OptimSection(Section):
    """Optimization."""

    micro_batch_size: int = Field(1, ge=1, description="Rows per micro-batch per process (axolotl default).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    eval_batch_size: int | None = Field(None, ge=1, description="Eval rows per micro-batch; default: micro_batch_size.")
    num_epochs: float = Field(1.0, gt=0, description="Epochs to train (axolotl default); max_steps wins if set.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to train; overrides num_epochs.")
    learning_rate: float = Field(ge=0, description="Peak learning rate (required, as in axolotl).")
    lr_scheduler: Annotated[
        Literal["cosine", "linear", "constant"], BeforeValidator(_by_name(axolotl.normalize_lr_scheduler))
    ] = Field(
        "cosine",
        description="Decay after warmup (axolotl default cosine). axolotl names are mapped, see below.",
    )
    warmup_steps: int | None = Field(None, ge=0, description="Linear warmup steps; exclusive with warmup_ratio.")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="Warmup as a fraction of the total steps.")
    cosine_min_lr_ratio: float | None = Field(
        None, ge=0, le=1, description="Cosine decays to this fraction of learning_rate (default 0)."
    )
    optimizer: Annotated[
        Literal["adamw", "adam", "adafactor", "sgd", "lion"],
        BeforeValidator(_by_name(axolotl.normalize_optimizer)),
    ] = Field(
        "adamw",
        description="optax optimizer (axolotl default adamw_torch_fused -> adamw); axolotl names are mapped.",
    )
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (axolotl default 0).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="Adam/Lion beta1 (HF Trainer default).")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="Adam/Lion beta2 (HF Trainer default).")
    adam_epsilon: float = Field(1e-8, gt=0, description="Adam epsilon (HF Trainer default).")
    max_grad_norm: float | None = Field(
        1.0, ge=0, description="Global-norm gradient clipping (HF Trainer default); 0 disables."
    )
    seed: int = Field(42, description="Seed for initialisation, shuffling and dropout (HF Trainer default).")
    skip_nonfinite_steps: bool = Field(
        False, description="Skip an optimizer step with a non-finite loss/gradient instead of stopping."
    )


class LoraSection(Section):
    """LoRA."""

    adapter: Annotated[Literal["lora"] | None, BeforeValidator(coerce.adapter)] = Field(
        None, description="lora, or empty for full fine-tuning. qlora is not supported yet."
    )
    lora_r: int = Field(8, ge=1, description="LoRA rank (PEFT default).")
    lora_alpha: float = Field(8, gt=0, description="LoRA scaling numerator, scale = alpha / r (PEFT default).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input (axolotl default 0).")
    lora_target_modules: StrList | None = Field(
        None, description="Module names to adapt, e.g. [q_proj, v_proj] (a string or a list)."
    )
    lora_target_linear: bool = Field(False, description="Adapt every linear layer of the decoder.")
    lora_modules_to_save: StrList | None = Field(
        None, description="Modules trained in full alongside LoRA, e.g. [embed_tokens, lm_head]."
    )
    lora_model_dir: str | None = Field(None, description="A PEFT adapter directory to start from.")


class RunSection(Section):
    """Run, logging and checkpoints."""

    output_dir: str = Field("./model-out", description="Checkpoints, logs and the final model (relative to CWD).")
    logging_steps: int = Field(1, ge=1, description="Log metrics every N optimizer steps.")
    eval_steps: Annotated[int | float | None, BeforeValidator(coerce.steps_or_fraction)] = Field(
        None,
        description="Evaluate every N steps, or at a fraction (0, 1) of the run; excludes evals_per_epoch. "
        "Default (neither set): with an eval set, once after the last step.",
    )
    evals_per_epoch: int | None = Field(None, ge=1, description="Evaluations per epoch.")
    save_steps: Annotated[int | float | None, BeforeValidator(coerce.steps_or_fraction)] = Field(
        None,
        description="Checkpoint every N steps, or a fraction (0, 1) of the run; default: once per epoch.",
    )
    saves_per_epoch: int | None = Field(None, ge=1, description="Checkpoints per epoch.")
    save_total_limit: int | None = Field(None, ge=1, description="Checkpoints to keep; default: all.")
    resume_from_checkpoint: str | None = Field(
        None, description="auto (latest checkpoint in output_dir) or a checkpoint directory."
    )
    objective: Annotated[str | None, BeforeValidator(coerce.objective)] = Field(
        None,
        description="Objective override: a registered name (sft, kd, dpo, ...) or package.module:builder; "
        "default: from rl / reward_model / kd_trainer, else sft.",
    )
    use_tensorboard: bool = Field(True, description="Write TensorBoard event files to output_dir.")
    wandb_project: str | None = Field(None, description="W&B project; W&B logging is on when set (and installed).")
    wandb_entity: str | None = Field(None, description="W&B team/user.")
    wandb_name: str | None = Field(None, description="W&B run name.")
    wandb_run_id: str | None = Field(None, description="W&B run id (to resume a run).")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(None, description="W&B mode.")


class PreferenceSection(Section):
    """Preference training (defaults are TRL's, which axolotl passes through)."""

    rl: Literal["dpo", "ipo", "orpo", "kto", "simpo"] | None = Field(None, description="Preference objective.")
    rl_beta: float = Field(0.1, ge=0, description="beta of DPO/IPO/KTO/SimPO (TRL default).")
    reward_model: bool = Field(False, description="Train a Bradley-Terry reward model.")
    dpo_loss_type: Annotated[str | None, BeforeValidator(coerce.dpo_loss_type)] = Field(
        None, description="DPO loss variant by TRL name (sigmoid, hinge, ipo, robust, ...); default sigmoid."
    )
    dpo_label_smoothing: float = Field(0.0, ge=0, le=0.5, description="Conservative-DPO label smoothing.")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target reward margin (TRL default).")
    cpo_alpha: float = Field(1.0, ge=0, description="SimPO/CPO NLL weight (TRL default; 0 = pure SimPO).")
    orpo_alpha: float = Field(0.1, ge=0, description="ORPO odds-ratio weight (TRL's ORPO beta).")
    kto_desirable_weight: float = Field(1.0, ge=0, description="KTO weight of desirable examples.")
    kto_undesirable_weight: float = Field(1.0, ge=0, description="KTO weight of undesirable examples.")
    rl_adapter_ref_model: bool = Field(
        False,
        description="With LoRA: false = the reference is the base model with the adapter off; true = a "
        "separate frozen copy.",
    )
    precompute_ref_log_probs: bool = Field(False, description="Compute reference log-probs once, before training.")
    rl_reference_dtype: Literal["float32", "bfloat16"] | None = Field(
        None,
        description="Frozen reference copy (full fine-tuning or rl_adapter_ref_model): parameter dtype "
        "(default: param_dtype); bfloat16 halves its memory.",
    )


class KDSection(Section):
    """Knowledge distillation from teacher top-k log-probs (axolotl KD plugin keys)."""

    kd_trainer: bool = Field(False, description="Train with the KD objective.")
    kd_alpha: float = Field(1.0, ge=0, description="Weight of the KD term (axolotl default).")
    kd_ce_alpha: float = Field(0.0, ge=0, description="Weight of the cross-entropy term (axolotl: unset = 0).")
    kd_temperature: float = Field(1.0, gt=0, description="Distillation temperature T (axolotl default).")
    kd_beta: float = Field(
        0.0,
        ge=0,
        le=1,
        description="0 = forward KL, 1 = reverse KL, between: generalized JSD (axolotl default 0).",
    )
    kd_normalize_topk: bool = Field(
        False,
        description="Renormalise the student over the teacher's top-k ids (alias kd_top_k_before_softmax).",
    )
    kd_zscore_base_temp: float | None = Field(
        None,
        gt=0,
        description="Logit standardisation: z-score both sides over top-k at this base temperature.",
    )
    kd_teacher_model: str | None = Field(
        None,
        description="Online teacher: a Hugging Face model directory run inside the train step (frozen) "
        "whose top-k log-probs replace stored teacher targets; datasets are then plain chat rows.",
    )
    kd_teacher_top_k: int = Field(32, ge=1, description="Online teacher: entries per position (K).")
    kd_teacher_dtype: Literal["float32", "bfloat16"] | None = Field(
        None, description="Online teacher: parameter dtype (default: param_dtype)."
    )


class TeacherSection(Section):
    """Teacher pass (`python -m jaxpref.teacher`: a KD dataset from kd_teacher_model)."""

    teacher_output_dir: str | None = Field(
        None,
        description="Teacher pass: directory for the KD dataset shards and teacher_info.json (relative to "
        "CWD); required by python -m jaxpref.teacher (or its --output flag).",
    )
    teacher_temperature: float = Field(
        1.0,
        gt=0,
        description="Teacher pass: softmax temperature T_gen of the stored log-probs (normalised over the "
        "full vocabulary); the KD dataset entry then needs temperature: T_gen.",
    )
    teacher_shard_rows: int = Field(
        1000, ge=1, description="Teacher pass: input rows per output shard (the unit of resuming)."
    )
    teacher_format: Literal["jsonl", "parquet"] = Field(
        "jsonl", description="Teacher pass: shard file format (part-00000.jsonl or .parquet)."
    )
    teacher_positions: Literal["all", "trainable"] = Field(
        "all",
        description="Teacher pass: store top-k rows for every token (all) or only for trainable tokens "
        "(smaller files; a later run with other roles_to_train/train_on_inputs then drops rows).",
    )


class ScaleSection(Section):
    """Scale and kernels."""

    mesh: MeshConfig = Field(default_factory=MeshConfig, description="Device mesh sizes (see mesh below).")
    logical_axis_rules: Annotated[
        list[tuple[str, str | tuple[str, ...] | None]] | None, BeforeValidator(coerce.logical_axis_rules)
    ] = Field(
        None,
        description="[[logical_name, mesh_axis | null | [mesh_axis, ...]], ...] overriding the built-in "
        "rules (e.g. [[embed, fsdp], [mlp, tensor]]).",
    )
    fused_kernel: FusedKernelConfig = Field(
        default_factory=FusedKernelConfig, description="Fused LM-head kernel (see fused_kernel below)."
    )
    attention_impl: Literal["auto", "blocked", "splash", "cudnn", "xla"] = Field(
        "auto",
        description="Attention kernel. auto: blocked (flash-style XLA) on CPU, splash attention (Pallas) on "
        "TPU, cuDNN flash attention on GPU for bfloat16/float16 with head_dim <= 128 (else XLA).",
    )
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig,
        description="Multi-process start-up (see distributed below); automatic under srun, mpirun and TPU pods.",
    )


SECTIONS: tuple[type[Section], ...] = (
    ModelSection,
    DataSection,
    OptimSection,
    LoraSection,
    RunSection,
    PreferenceSection,
    KDSection,
    TeacherSection,
    ScaleSection,
)

_LORA_KEYS = (
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_target_linear",
    "lora_modules_to_save",
    "lora_model_dir",
)


class JaxprefConfig(
    ModelSection,
    DataSection,
    OptimSection,
    LoraSection,
    RunSection,
    PreferenceSection,
    KDSection,
    TeacherSection,
    ScaleSection,
):
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
        return p

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
