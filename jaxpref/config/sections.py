"""The sections of the config schema: one pydantic class per topic, the keys and their defaults.

``JaxprefConfig`` (``jaxpref.config.schema``) is their union plus the checks between keys. Key names
follow axolotl where axolotl has the feature; defaults are axolotl's (or the Hugging Face Trainer's /
TRL's, which axolotl inherits) unless the description says otherwise. Axolotl-only keys are
translated before validation (``jaxpref.config.axolotl``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from jaxpref.config import axolotl, coerce
from jaxpref.config.nested import (
    ChatTemplateName,
    DatasetConfig,
    DistributedConfig,
    EvalGenerationConfig,
    FusedKernelConfig,
    MeshConfig,
    Section,
    SpecialTokensConfig,
    StrList,
    TrlConfig,
)

DType = Literal["float32", "bfloat16"]


# A count whose 0 axolotl reads as not set (``if cfg.max_steps:``): 0 loads as the default.
ZeroIsUnset = Annotated[int | None, BeforeValidator(coerce.zero_is_unset)]


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
        "chat_template_jinja (implied when only chat_template_jinja is given); gemma, qwen_25, mistral_v3_tekken, "
        "phi_3, phi_35 are axolotl's templates (docs/data.md 'Chat templates' lists how they differ from the "
        "families' own).",
    )
    chat_template_jinja: str | None = Field(None, description="A jinja chat template, or the path of a .jinja file.")
    eot_tokens: StrList | None = Field(
        None,
        description="Tokens that end a turn, trained per the dataset's train_on_eot (axolotl); each must be one "
        "token of the tokenizer and appear in the chat template. Default: the eos token plus the shipped "
        "templates' turn ends (<|im_end|>, <|eot_id|>, <end_of_turn>, <|end|>). docs/data.md 'End-of-turn tokens'.",
    )
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
    dataset_exact_deduplication: bool = Field(
        False,
        description="Drop rows whose tokenized example equals an earlier one of the same split (SFT/KD: tokens, "
        "labels, teacher targets; preference: prompt and responses), as axolotl; a val_set_size eval split also drops "
        "rows of the training set, test_datasets do so for preference data (as axolotl). Counted as duplicate in the "
        "report. Not for streaming datasets. docs/data.md 'Exact deduplication'.",
    )


class OptimSection(Section):
    """Optimization."""

    micro_batch_size: int = Field(1, ge=1, description="Rows per micro-batch per process (axolotl default).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    eval_batch_size: ZeroIsUnset = Field(
        None, ge=1, description="Eval rows per micro-batch; default (or 0): micro_batch_size."
    )
    num_epochs: float = Field(1.0, gt=0, description="Epochs to train (axolotl default); max_steps wins if set.")
    max_steps: ZeroIsUnset = Field(
        None, ge=1, description="Optimizer steps to train; overrides num_epochs. 0 means not set (axolotl)."
    )
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
        None,
        description="lora, or empty for full fine-tuning. qlora: lora on a 4-bit base, read as adapter: lora "
        "with load_in_4bit: true (docs/qlora.md).",
    )
    load_in_4bit: bool = Field(
        False,
        description="QLoRA (with adapter: lora; adapter: qlora sets it): the decoder blocks' linear weights are "
        "stored as frozen NF4 (bitsandbytes' 4-bit NormalFloat, blocks of 64), quantized layer by layer as the "
        "checkpoint is read and dequantized per layer in the forward pass; embeddings, LM head and norms stay "
        "in param_dtype (as in bitsandbytes; see qlora_quantize_embeddings) (docs/qlora.md).",
    )
    bnb_4bit_quant_type: Annotated[Literal["nf4"], BeforeValidator(coerce.bnb_4bit_quant_type)] = Field(
        "nf4", description="With load_in_4bit: the 4-bit type; nf4 only (fp4 is an error)."
    )
    bnb_4bit_use_double_quant: bool = Field(
        True,
        description="With load_in_4bit: quantize the block absmax scales to 8 bits in blocks of 256 (bitsandbytes' "
        "double quantization; axolotl's default true): 0.517 instead of 0.563 bytes per weight.",
    )
    bnb_4bit_compute_dtype: Annotated[DType | None, BeforeValidator(coerce.torch_dtype_name)] = Field(
        None,
        description="With load_in_4bit: the dtype weights are dequantized to for the matmuls, i.e. compute_dtype "
        "(sets it when compute_dtype is not given; an error when they differ).",
    )
    qlora_quantize_embeddings: bool = Field(
        False,
        description="jaxpref only, with load_in_4bit: store the token embedding (and an untied lm_head) as NF4 "
        "too (double-quantized like the projections; hidden_size a multiple of 64): a lookup dequantizes only "
        "its rows, the fused loss the whole head in compute_dtype per step. Off by default, as in bitsandbytes/"
        "axolotl QLoRA (whose embedding stays 16-bit, so the numbers differ); Llama-3.2-1B base 0.26x bf16 "
        "instead of 0.42x. Not with lora_modules_to_save embed_tokens/lm_head (docs/qlora.md).",
    )
    bnb_4bit_quant_storage: str | None = Field(
        None,
        description="bitsandbytes' container dtype of the packed 4-bit codes (uint8, or bfloat16 for torch FSDP); "
        "jaxpref packs two codes per uint8 whatever it says (the same bytes); a warning for other values.",
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
        "Default (neither set): with an eval set, once after the last step. 0 is read as not set "
        "(axolotl); 0 with evals_per_epoch unset means no evaluation, as evals_per_epoch: 0.",
    )
    evals_per_epoch: int | None = Field(
        None,
        ge=0,
        description="Evaluations per epoch. 0: no evaluation at all, not even after the last step (as in "
        "axolotl, whose 0 means not set, and not set means no evaluation); an eval_steps > 0 wins over 0.",
    )
    save_steps: Annotated[
        int | float | None, BeforeValidator(coerce.steps_or_fraction), BeforeValidator(coerce.zero_is_unset)
    ] = Field(
        None,
        description="Checkpoint every N steps, or a fraction (0, 1) of the run; default (or 0): once per epoch.",
    )
    saves_per_epoch: ZeroIsUnset = Field(None, ge=1, description="Checkpoints per epoch; 0 means not set (axolotl).")
    save_total_limit: ZeroIsUnset = Field(
        None, ge=1, description="Checkpoints to keep; default (or 0): all (axolotl's default is 4)."
    )
    resume_from_checkpoint: str | None = Field(
        None, description="auto (latest checkpoint in output_dir) or a checkpoint directory."
    )
    objective: Annotated[str | None, BeforeValidator(coerce.objective)] = Field(
        None,
        description="Objective override: a registered name (sft, kd, dpo, ...) or package.module:builder; "
        "default: from rl / reward_model / kd_trainer, else sft.",
    )
    eval_generation: EvalGenerationConfig | None = Field(
        None,
        description="Evaluation by generation (see eval_generation below): at each evaluation, complete a fixed "
        "sample of eval rows with the model and log the metric as eval generation_<metric>.",
    )
    use_tensorboard: bool = Field(True, description="Write TensorBoard event files to output_dir.")
    wandb_project: str | None = Field(None, description="W&B project; W&B logging is on when set (and installed).")
    wandb_entity: str | None = Field(None, description="W&B team/user.")
    wandb_name: str | None = Field(None, description="W&B run name.")
    wandb_run_id: str | None = Field(None, description="W&B run id (to resume a run).")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(None, description="W&B mode.")


PREFERENCE_OBJECTIVES = ("dpo", "ipo", "orpo", "kto", "simpo")
RL_OBJECTIVES = (*PREFERENCE_OBJECTIVES, "grpo")  # the values of ``rl``
BUILTIN_OBJECTIVES = ("sft", "kd", "reward", *RL_OBJECTIVES)


class PreferenceSection(Section):
    """Preference training (defaults are TRL's, which axolotl passes through)."""

    rl: Literal[RL_OBJECTIVES] | None = Field(
        None, description="Preference objective, or grpo (online RL from reward functions; settings in trl)."
    )
    trl: TrlConfig | None = Field(
        None,
        description="axolotl's TRL section. rl: grpo reads TRL 1.16 GRPOConfig's keys here (see trl below); "
        "for the preference objectives only beta is read (as rl_beta).",
    )
    rl_beta: float = Field(
        0.1,
        gt=0,
        description="beta of DPO/IPO/KTO/SimPO (TRL default); > 0: IPO divides by it, DPO's loss is flat at 0. "
        "Also ORPO's weight when set: axolotl takes TRL's beta from trl.beta, then rl_beta, then orpo_alpha.",
    )
    reward_model: bool = Field(False, description="Train a Bradley-Terry reward model.")
    center_rewards_coefficient: float | None = Field(
        None,
        ge=0,
        description="Reward models: adds coefficient x mean((r_chosen + r_rejected)^2) to the loss, pulling "
        "rewards towards mean zero (TRL's RewardTrainer; unset: no term; axolotl's example uses 0.01).",
    )
    dpo_loss_type: Annotated[list[str], BeforeValidator(coerce.dpo_loss_type)] = Field(
        ["sigmoid"],
        description="DPO loss type by TRL name (sigmoid, hinge, ipo, robust, bco_pair, sft, ...), or a list of them "
        "combined as a weighted sum (MPO, e.g. [sigmoid, bco_pair, sft]); rl: ipo means [ipo].",
    )
    dpo_loss_weights: list[float] | None = Field(
        None,
        description="Weights of the dpo_loss_type entries, one per entry (>= 0; MPO e.g. [0.8, 0.2, 1.0]); "
        "null = 1.0 each (TRL).",
    )
    dpo_use_weighting: bool = Field(
        False,
        description="WPO (TRL use_weighting): weight each pair's DPO loss by exp of the policy's length-normalised "
        "log-probs of both completions, each token aligned by log sum_v p_v^2 (no gradient).",
    )
    dpo_label_smoothing: float = Field(0.0, ge=0, le=0.5, description="Conservative-DPO label smoothing.")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target reward margin (TRL default).")
    cpo_alpha: float = Field(1.0, ge=0, description="SimPO/CPO NLL weight (TRL default; 0 = pure SimPO).")
    orpo_alpha: float = Field(
        0.1,
        ge=0,
        description="ORPO odds-ratio weight (TRL's ORPO beta). rl_beta (or trl.beta), when set, is the weight "
        "instead (axolotl's order); both set and different is an error.",
    )
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
    kd_teacher_adapter: str | None = Field(
        None,
        description="A PEFT LoRA adapter directory applied to kd_teacher_model (in the train step, the "
        "teacher pass and python -m jaxpref.serve).",
    )
    kd_teacher_top_k: int = Field(32, ge=1, description="Online teacher: entries per position (K).")
    kd_teacher_dtype: Literal["float32", "bfloat16"] | None = Field(
        None, description="Online teacher: parameter dtype (default: param_dtype)."
    )
    kd_temperature_min: float | None = Field(
        None,
        gt=0,
        description="Decay the KD temperature from kd_temperature to this value over the run (axolotl's "
        "cosine: T = T0 - (T0 - Tmin) * (1 - cos(pi * step / steps)) / 2), for stored, in-process and "
        "served teachers alike; logged as kd_temperature.",
    )
    kd_online_server_base_url: str | None = Field(
        None,
        description="A teacher server (vLLM, SGLang or python -m jaxpref.serve), e.g. http://host:8000: its "
        "top-k prompt log-probs of each row become the KD targets; datasets are then plain chat rows.",
    )
    kd_online_server: Literal["vllm", "sglang"] = Field(
        "vllm",
        description="The server's API: vllm (POST /v1/completions, prompt_logprobs; also jaxpref.serve) or "
        "sglang (POST /generate, input_top_logprobs).",
    )
    kd_online_server_model: str | None = Field(
        None, description="vLLM: the served model name sent as 'model' (default: the server's only model)."
    )
    kd_online_topk: int | None = Field(
        None, ge=1, description="Teacher server: entries per position asked for and trained on (K)."
    )
    kd_online_timeout: float = Field(
        120.0, gt=0, description="Teacher server: seconds to wait for one answer before retrying (axolotl default)."
    )
    kd_online_concurrency: int = Field(
        4,
        ge=1,
        description="Teacher server: requests in flight (one per micro-batch, sent ahead of the train step).",
    )
    kd_online_retries: int = Field(
        8,
        ge=0,
        description="Teacher server: retries of a failed request (0.5 s, 1 s, 2 s ... backoff, capped at 30 s) "
        "before the run stops with an error; the last checkpoint stays, and the run resumes from it.",
    )
    kd_on_policy_ratio: float = Field(
        0.0,
        ge=0,
        le=1,
        description="On-policy distillation (GKD; TRL GKDConfig's lmbda, default 0.5 there, 0 = off here): this "
        "fraction of the optimizer steps trains on the student's own completions of the batch's prompts, "
        "scored by the teacher (step s is on-policy when floor((s+1)*ratio) > floor(s*ratio)). Needs "
        "kd_teacher_model or kd_online_server_base_url.",
    )
    kd_on_policy_max_new_tokens: int = Field(
        128, ge=1, description="On-policy steps: completion tokens sampled per prompt, at most (TRL GKD default)."
    )
    kd_on_policy_temperature: float = Field(
        0.9, ge=0, description="On-policy steps: sampling temperature, 0 = greedy (TRL GKD default 0.9)."
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
