"""Nested config sections: ``mesh``, ``distributed``, ``fused_kernel``, ``special_tokens``,
``eval_generation``, ``trl`` (GRPO) and one dataset entry."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from jaxpref.config import axolotl, coerce
from jaxpref.config.notes import warn

# The templates shipped in jaxpref/templates (jaxpref.data.chat_templates.SHIPPED_TEMPLATES) and the two choices.
ChatTemplateName = Literal[
    "chatml",
    "llama3",
    "qwen3",
    "gemma",
    "qwen_25",
    "mistral_v3_tekken",
    "phi_3",
    "phi_35",
    "tokenizer_default",
    "jinja",
]
StrList = Annotated[list[str], BeforeValidator(coerce.str_list)]


class Section(BaseModel):
    """Base of every config model: unknown keys are errors, and ``key:`` with no value means unset."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_empty(cls, data: Any) -> Any:
        return axolotl.drop_empty(data) if isinstance(data, dict) else data


class MeshConfig(Section):
    """The (data, fsdp, tensor) device mesh."""

    data: int | None = Field(
        None,
        description="Data-parallel axis. Default: -1 (all remaining devices), or 1 when another axis is -1.",
    )
    fsdp: int = Field(1, description="Parameter-sharding (ZeRO-3 style) axis; -1 = all remaining devices.")
    tensor: int = Field(1, description="Tensor-parallel axis (heads, MLP, vocab); -1 = all remaining devices.")

    @model_validator(mode="after")
    def _sizes(self) -> MeshConfig:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        bad = [f"{k}={v}" for k, v in sizes.items() if v is not None and v != -1 and v < 1]
        if bad:
            raise ValueError(f"axis sizes must be positive or -1 (all remaining devices), got {', '.join(bad)}")
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ValueError("at most one axis may be -1 (all remaining devices)")
        if self.data is None:
            self.data = 1 if -1 in (self.fsdp, self.tensor) else -1
        return self


class FusedKernelConfig(Section):
    """The fused LM-head kernel (log-sum-exp and gathered logits without materialising [N, V])."""

    impl: Literal["auto", "reference", "xla_chunked", "xla_onepass", "pallas"] = Field(
        "auto",
        description="auto: Pallas on GPU/TPU; on CPU xla_onepass for token-sum losses (SFT, KD: value and "
        "gradient in one pass over the vocabulary) with a float32 LM head, and xla_chunked otherwise; reference "
        "materialises full logits.",
    )
    block_n: int | None = Field(None, ge=1, description="Rows per block; None = the per-backend table.")
    block_v: int | None = Field(None, ge=1, description="Vocabulary entries per block; None = the table.")


class EvalGenerationConfig(Section):
    """Evaluation by generation: at each evaluation, complete eval rows with the model and score them.

    Preference runs (``rl``) read each eval row through its dataset's ``type`` (prompt as the loss sees it,
    the chosen or desirable completion as the reference) unless prompt_field/reference_field are set."""

    samples: int = Field(32, ge=1, description="Eval rows generated for (the first N of the eval set, fixed).")
    max_new_tokens: int = Field(64, ge=1, description="New tokens per completion.")
    temperature: float = Field(0.0, ge=0, description="0: greedy (default); > 0: sampled with the run's seed.")
    metric: str = Field(
        "exact_match",
        description="exact_match (completion == reference after stripping whitespace), or package.module:function "
        "called as function(completion, reference, row) -> float.",
    )
    field_messages: str = Field(
        "messages",
        description="Conversation rows: the conversation's field; the prompt is every turn but a final assistant "
        "turn, which is the reference. Preference runs (rl) ignore it: each eval row is read by its dataset's type "
        "(the prompt the loss sees; the reference is the chosen, for KTO a desirable, completion).",
    )
    prompt_field: str | None = Field(
        None,
        description="Flat rows: the prompt's field (sent as one user turn through the chat template); needs "
        "reference_field. Also overrides the dataset type of preference runs.",
    )
    reference_field: str | None = Field(None, description="Flat rows: the reference answer's field.")

    @model_validator(mode="after")
    def _fields(self) -> EvalGenerationConfig:
        if (self.prompt_field is None) != (self.reference_field is None):
            raise ValueError("prompt_field and reference_field go together (flat rows); set both or neither")
        if self.metric != "exact_match" and ":" not in self.metric:
            raise ValueError(f"metric: {self.metric!r}; use exact_match or package.module:function")
        return self


def _scale_rewards(value: Any) -> Any:
    """TRL's bool form: true -> "group", false -> "none"."""
    if isinstance(value, bool):
        return "group" if value else "none"
    return value


class TrlConfig(Section):
    """axolotl's ``trl:`` section for ``rl: grpo``: TRL 1.16 ``GRPOConfig``'s names and defaults.

    (For the preference objectives axolotl reads only ``trl.beta`` from it, which loads as ``rl_beta``.)"""

    reward_funcs: StrList = Field(
        default_factory=list,
        description="Reward functions as import paths (module.function or package.module:function), called as "
        "TRL calls them: f(prompts=..., completions=..., completion_ids=..., **the row's other columns) -> one "
        "float (or None: not scored) per completion.",
    )
    reward_weights: list[float] | None = Field(
        None, description="One weight per reward function (null: 1.0 each), as TRL."
    )
    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (the group size G).")
    max_completion_length: int = Field(512, ge=1, description="New tokens per completion at most.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; log-probs are taken at it too (TRL).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (1.0: off).")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0: off).")
    beta: float = Field(
        0.0,
        ge=0,
        description="Weight of the k3 KL estimate to the reference model (TRL's default 0: no reference model).",
    )
    epsilon: float = Field(0.2, gt=0, description="Lower clipping range of the importance ratio (1 - epsilon).")
    epsilon_high: float | None = Field(
        None, gt=0, description="Upper clipping range (1 + epsilon_high; DAPO's clip-higher); null: epsilon."
    )
    delta: float | None = Field(
        None, gt=1, description="Two-sided clipping: the importance ratio capped at delta (null: off)."
    )
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field(
        "dapo",
        description="How per-token losses are averaged: grpo (per sequence, then over sequences), bnpo and dapo "
        "(over every completion token of the step), dr_grpo (sum / (sequences x max_completion_length)).",
    )
    scale_rewards: Annotated[Literal["group", "batch", "none"], BeforeValidator(_scale_rewards)] = Field(
        "group",
        description="Advantages divided by the reward std of the group, of the whole batch, or not (TRL; "
        "true = group, false = none).",
    )
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = Field(
        "sum_then_normalize", description="How several reward functions combine before the advantage (TRL)."
    )
    num_iterations: int = Field(
        1, ge=1, description="Optimizer steps per batch of completions (GRPO's mu); > 1 clips against the sampler."
    )
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="Importance ratios per token, or per sequence (GSPO)."
    )
    mask_truncated_completions: bool = Field(
        False, description="Completions cut at max_completion_length do not train (DAPO)."
    )
    use_bias_correction_kl: bool = Field(
        True, description="The KL estimate multiplied by the importance ratio (TRL's default)."
    )
    log_completions: bool = Field(
        False, description="Log the first completion of each step and its rewards in the run's text log."
    )

    @model_validator(mode="after")
    def _weights(self) -> TrlConfig:
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} entries for {len(self.reward_funcs)} reward_funcs; "
                "give one weight per function"
            )
        if self.importance_sampling_level == "sequence" and self.loss_type != "grpo":
            warn(
                f"trl.importance_sampling_level: sequence with loss_type {self.loss_type} sums per-token terms, so "
                "each sequence weighs by its length; GSPO's objective is loss_type: grpo (TRL warns the same)"
            )
        return self

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def epsilon_upper(self) -> float:
        """The upper clip range: ``epsilon_high``, else ``epsilon``."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


class DistributedConfig(Section):
    """Multi-process start-up (jax.distributed); every key may also come from JAX's environment variables."""

    enabled: bool | None = Field(
        None,
        description="null: initialise when a launcher started several processes (srun, mpirun, a TPU pod) or a "
        "coordinator is given; true: always call jax.distributed.initialize(); false: never. "
        "Env JAXPREF_DISTRIBUTED=1/0/auto does the same.",
    )
    coordinator_address: str | None = Field(
        None, description="host:port of process 0 (env JAX_COORDINATOR_ADDRESS); null = auto-detected."
    )
    num_processes: int | None = Field(None, ge=1, description="Process count (env JAX_NUM_PROCESSES).")
    process_id: int | None = Field(
        None, ge=0, description="This process's index, usually a per-process override (env JAX_PROCESS_ID)."
    )
    local_device_ids: list[int] | None = Field(
        None,
        description="GPUs this process uses (env JAX_LOCAL_DEVICE_IDS); under SLURM with one process per node "
        "list all of the node's GPUs.",
    )
    initialization_timeout: int = Field(300, ge=1, description="Seconds to wait for every process to connect.")


class SpecialTokensConfig(Section):
    """Special tokens to set on the tokenizer (axolotl's `special_tokens`)."""

    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    additional_special_tokens: list[str] | None = None


def _format_type(value: Any) -> Any:
    if value is None or isinstance(value, str | dict):
        return value
    raise ValueError(f"expected a format name or a user_defined mapping, got {value!r}")


class DatasetConfig(Section):
    """One entry of `datasets` / `test_datasets` (axolotl key names)."""

    path: str | None = Field(
        None, description="Hub dataset id, local file or directory. Relative paths: see Paths at the top."
    )
    type: Annotated[str | dict[str, Any] | None, BeforeValidator(_format_type)] = Field(
        None,
        description="Row format, e.g. chat_template, completion, alpaca, chatml.intel, chatml.argilla, "
        "chat_template.argilla, llama3.ultra (checked by the data pipeline); a mapping of field names and "
        "format strings means user_defined.default (axolotl).",
    )
    ds_type: str | None = Field(None, description="File type when path/data_files are files: json, csv, parquet, ...")
    data_files: StrList | None = Field(None, description="File(s) to load (a string or a list; globs allowed).")
    name: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Split to load (axolotl default: train).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the dataset.")
    field: str | None = Field(None, description="Text column for `completion` datasets (default: text).")
    field_system: str | None = Field(None, description="Column holding a row-level system prompt (default: system).")
    field_messages: str = Field("messages", description="Column holding the conversation (axolotl default).")
    field_chosen: str | None = Field(
        None, description="Preference chat_template types: column of the chosen response (default: chosen)."
    )
    field_rejected: str | None = Field(
        None, description="Preference chat_template types: column of the rejected response (default: rejected)."
    )
    message_property_mappings: dict[str, str] | None = Field(
        None,
        description="Message keys to read as role/content, e.g. {role: from, content: value}; unmapped "
        "properties are read under their own name (axolotl semantics).",
    )
    roles: dict[str, list[str]] | None = Field(
        None,
        description="Role aliases {target_role: [source_roles]} (default: human->user, gpt->assistant).",
    )
    roles_to_train: list[str] = Field(
        default_factory=lambda: ["assistant"], description="Roles whose tokens are trained (axolotl default)."
    )
    train_on_eos: Literal["all", "turn", "last", "none"] = Field(
        "turn",
        description="Which eos tokens are trained (axolotl default: turn): all, turn (after each trained "
        "turn), last (after the last trained turn), none. docs/data.md 'End-of-turn tokens'.",
    )
    train_on_eot: Literal["all", "turn", "last", "none"] | None = Field(
        None,
        description="Which end-of-turn tokens (eot_tokens) are trained; same values as train_on_eos, default: "
        "train_on_eos (axolotl).",
    )
    drop_system_message: bool = Field(False, description="Drop system turns from the conversations.")
    chat_template: ChatTemplateName | None = Field(None, description="Per-dataset chat template override.")
    logprobs_field: str | None = Field(None, description="KD: column holding the teacher's top-k log-probs.")
    temperature: float = Field(
        1.0, gt=0, description="KD: temperature the teacher log-probs were generated at (T_gen)."
    )
    logprobs_alignment: Literal["token", "prediction"] = Field(
        "token",
        description="KD: `token` = row i is the distribution over token i (vLLM prompt_logprobs, leading "
        "null row); `prediction` = row t already predicts token t+1.",
    )
    streaming: bool = Field(
        False,
        description="Read the rows lazily through datasets streaming, never all in memory (every datasets "
        "entry or none; needs max_steps; batches are sequence_len long). Eval sets are always loaded in "
        "memory. docs/data.md 'Streaming datasets'.",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_axolotl(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = axolotl.drop_empty(data)
            errors = axolotl.translate_dataset(data, "datasets", cls.model_fields)
            if errors:
                raise ValueError("\n".join(errors))
        return data

    @model_validator(mode="after")
    def _source(self) -> DatasetConfig:
        if not self.path and not self.data_files:
            raise ValueError("give path (hub id, file or directory) or data_files")
        return self
