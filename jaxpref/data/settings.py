"""What ``jaxpref.data`` reads of a run's config, as one typed value built once per run.

``DataSettings.from_config(cfg)`` takes the validated config's own values (the schema writes every
default once); the pipelines, formats, the tokenizer loader and the prepared-data cache take these
settings, never the config itself. The field names are the config keys (docs/config.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class DataSettings:
    # the data section (config/sections.py DataSection)
    datasets: tuple[Any, ...]  # DatasetConfig entries; () when unset
    test_datasets: tuple[Any, ...]
    val_set_size: float
    sequence_len: int
    sample_packing: bool
    pad_to_sequence_len: bool
    excess_length_strategy: str
    train_on_inputs: bool
    dataset_prepared_path: str | None
    dataset_processes: int
    max_bad_row_fraction: float
    dataset_exact_deduplication: bool
    # batching and order
    micro_batch_size: int  # rows per micro-batch per process
    eval_batch_size: int
    gradient_accumulation_steps: int
    seed: int
    max_steps: int | None  # streaming data needs it
    # which objective's rows
    objective: str | None
    rl: str | None
    reward_model: bool
    kd_trainer: bool
    kd_temperature: float
    kd_temperature_min: float | None
    kd_teacher_model: str | None
    kd_online_server_base_url: str | None
    # rl: grpo (the trl section): completions per prompt, and steps per batch of completions
    num_generations: int | None
    num_iterations: int
    # the tokenizer and its chat template
    tokenizer_config: str | None
    base_model: str | None
    chat_template: str | None
    chat_template_jinja: str | None
    eot_tokens: tuple[str, ...] | None  # None: the default end-of-turn tokens (chat_templates.py)
    special_tokens: Any

    @property
    def target_temperature(self) -> float:
        """The T_kd stored targets are rescaled to (p ** (T_gen / T_kd)): ``kd_temperature``, or 1 when
        ``kd_temperature_min`` schedules it (the train step then rescales by 1 / T(step))."""
        return 1.0 if self.kd_temperature_min is not None else float(self.kd_temperature)

    @property
    def teacher_in_run(self) -> bool:
        """The KD targets come from a teacher during the run (in the step or from a server), not the rows."""
        return bool(self.kd_teacher_model or self.kd_online_server_base_url)

    @property
    def prompts_per_step(self) -> int:
        """rl: grpo: prompts per optimizer step and process (their completions fill the step's micro-batches)."""
        return self.micro_batch_size * self.gradient_accumulation_steps // (self.num_generations or 1)

    @classmethod
    def from_config(cls, cfg: Any) -> DataSettings:
        """The settings of a validated ``JaxprefConfig``."""
        grpo = cfg.trl if cfg.rl == "grpo" else None
        from_trl = {
            "num_generations": grpo.num_generations if grpo else None,
            "num_iterations": grpo.num_iterations if grpo else 1,
        }
        names = [f.name for f in dataclasses.fields(cls) if f.name not in from_trl]
        values = {**{name: getattr(cfg, name) for name in names}, **from_trl}
        values["datasets"] = tuple(values["datasets"] or ())
        values["test_datasets"] = tuple(values["test_datasets"] or ())
        if values["eot_tokens"] is not None:
            values["eot_tokens"] = tuple(values["eot_tokens"])
        return cls(**values)
