"""axolotl compatibility: every axolotl key is handled; the seed examples validate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jaxpref.config import DatasetConfig, JaxprefConfig, validate_config
from jaxpref.config import axolotl as ax
from jaxpref.config.axolotl_keys import AXOLOTL_DATASET_KEYS, AXOLOTL_KEYS
from jaxpref.errors import ConfigError

from .helpers import MINIMAL, make

SEED_DIR = Path(__file__).parent / "seed_examples"
SAME_NAME_KEYS = {
    "rl",
    "rl_beta",
    "orpo_alpha",
    "kto_desirable_weight",
    "rl_adapter_ref_model",
    "chat_template",
}

# A complete base config in axolotl style (the seed examples are partial configs added to one).
BASE_YAML = """
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
model_type: AutoModelForCausalLM
tokenizer_type: AutoTokenizer
load_in_8bit: false
load_in_4bit: false
strict: false
chat_template: chatml
datasets:
  - path: mlabonne/orpo-dpo-mix-40k
    type: chatml.intel
    split: train
dataset_prepared_path: last_run_prepared
val_set_size: 0.0
output_dir: ./outputs/out
sequence_len: 1024
sample_packing: false
pad_to_sequence_len: false
adapter: lora
lora_model_dir:
lora_r: 16
lora_alpha: 32
lora_dropout: 0.05
lora_target_linear: true
wandb_project:
wandb_entity:
wandb_watch:
wandb_name:
wandb_log_model:
gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 1
optimizer: adamw_bnb_8bit
lr_scheduler: cosine
learning_rate: 0.0002
train_on_inputs: false
group_by_length: false
bf16: auto
fp16:
tf32: false
gradient_checkpointing: true
early_stopping_patience:
resume_from_checkpoint:
local_rank:
logging_steps: 1
xformers_attention:
flash_attention: true
warmup_steps: 10
evals_per_epoch: 4
saves_per_epoch: 1
debug:
deepspeed:
weight_decay: 0.0
fsdp:
fsdp_config:
special_tokens:
  pad_token: <|endoftext|>
"""


def _handled(key: str) -> bool:
    return (
        key in JaxprefConfig.model_fields
        or key in ax.MAPPED_KEYS
        or key in ax.UNSUPPORTED_KEYS
        or ax.ignored_reason(key) is not None
    )


def test_every_axolotl_key_is_handled():
    assert len(AXOLOTL_KEYS) > 400
    unhandled = sorted(k for k in AXOLOTL_KEYS if not _handled(k))
    assert unhandled == []


def test_every_axolotl_dataset_key_is_handled():
    fields = DatasetConfig.model_fields
    unhandled = sorted(
        k
        for k in AXOLOTL_DATASET_KEYS
        if k not in fields and k not in ax.IGNORED_DATASET_KEYS and k not in ax.MAPPED_DATASET_KEYS
    )
    assert unhandled == []


def test_handling_categories_do_not_overlap():
    fields = set(JaxprefConfig.model_fields)
    for table in (ax.MAPPED_KEYS, ax.UNSUPPORTED_KEYS, ax.IGNORED_KEYS):
        assert not fields & set(table)
    assert not set(ax.MAPPED_KEYS) & set(ax.IGNORED_KEYS)
    assert not set(ax.UNSUPPORTED_KEYS) & set(ax.IGNORED_KEYS)
    assert not set(DatasetConfig.model_fields) & set(ax.IGNORED_DATASET_KEYS)


def test_every_ignored_key_is_accepted_with_exactly_one_warning():
    ignored = sorted(k for k in AXOLOTL_KEYS if k not in JaxprefConfig.model_fields and ax.ignored_reason(k))
    cfg = validate_config({**MINIMAL, **dict.fromkeys(ignored, True)})
    assert len(cfg.warnings) == len(ignored)
    for key in ignored:
        assert sum(w.startswith(f"ignored: {key} (") for w in cfg.warnings) == 1, key


def test_ignored_keys_set_to_false_do_not_warn():
    ignored = [k for k in AXOLOTL_KEYS if k not in JaxprefConfig.model_fields and ax.ignored_reason(k)]
    assert validate_config({**MINIMAL, **dict.fromkeys(ignored, False)}).warnings == ()


def test_unsupported_keys_are_errors_only_when_enabled():
    for key in ax.UNSUPPORTED_KEYS:
        assert validate_config({**MINIMAL, key: False}).warnings == ()
        with pytest.raises(ConfigError, match=key):
            validate_config({**MINIMAL, key: True})


def test_mapped_keys():
    cfg = make(
        bf16=True,
        strict=False,
        dpo_beta=0.2,
        dataset_num_proc=3,
        use_wandb=False,
        streaming=True,
        auto_resume_from_checkpoints=True,
        kd_top_k_before_softmax=True,
    )
    assert cfg.compute_dtype == "bfloat16" and cfg.rl_beta == 0.2 and cfg.dataset_processes == 3
    assert cfg.wandb_mode == "disabled" and cfg.datasets[0].streaming is True
    assert cfg.resume_from_checkpoint == "auto" and cfg.kd_normalize_topk is True
    assert cfg.warnings == ()


# Keys of axolotl 067b021c's schema and plugin args (kernels, swanlab, lm_eval, expert_parallel, nemo_gym,
# densemixer, liger, model.py, multimodal.py) that the older catalogue lacked, so that they were unknown keys.
NEW_IGNORED = {
    "use_scattermoe": "MoE or model-specific CUDA kernel",
    "use_sonicmoe": "MoE or model-specific CUDA kernel",
    "expert_backend": "MoE or model-specific CUDA kernel",
    "dense_mixer": "MoE or model-specific CUDA kernel",
    "use_swanlab": "jaxpref logs to TensorBoard",
    "swanlab_project": "jaxpref logs to TensorBoard",
    "lm_eval_tasks": "lm-eval-harness",
    "expert_parallel_size": "MoE expert parallelism",
    "nemo_gym_enabled": "NeMo Gym",
    "liger_rms_norm_gated": "Liger Triton kernel",
    "processor_kwargs": "AutoTokenizer defaults",
    "role_boundaries": "training-method extra",
}
NEW_REJECTED = {
    "use_onebitllms": "1.58-bit",
    "lora_rank_pattern": "per-module LoRA ranks",
    "lora_alpha_pattern": "per-module LoRA alphas",
    "liger_use_token_scaling": "token scaling",
    "spectrum_top_fraction": "Spectrum",
    "grokfast_alpha": "Grokfast",
    "mora": "MoRA",
    "llmcompressor": "LLM Compressor",
    "hatchery": "remote Tinker/Hatchery",
    "gemma4_nf4_nonexpert": "quantized",
    "nvfp4_merge_aware": "NVFP4",
}


@pytest.mark.parametrize("key", sorted(NEW_IGNORED))
def test_refreshed_catalogue_keys_are_ignored_with_their_reason(key):
    assert key in AXOLOTL_KEYS
    (warning,) = make(**{key: True}).warnings
    assert warning.startswith(f"ignored: {key} (") and NEW_IGNORED[key] in warning


@pytest.mark.parametrize("key", sorted(NEW_REJECTED))
def test_refreshed_catalogue_keys_that_change_training_are_errors(key):
    assert key in AXOLOTL_KEYS
    msg = str(pytest.raises(ConfigError, make, **{key: True}).value)
    assert f"{key}: " in msg and NEW_REJECTED[key] in msg and "unknown key" not in msg


def test_plugins_that_change_training_without_keys_are_errors():
    base = "axolotl.integrations."
    cfg = make(plugins=[base + "liger.LigerPlugin", base + "cut_cross_entropy.CutCrossEntropyPlugin"])
    (warning,) = cfg.warnings
    assert warning.startswith("ignored: plugins (axolotl plugins do not load in jaxpref;")
    for plugin in ("spectrum.SpectrumPlugin", "grokfast.GrokfastPlugin", "mora.MoraPlugin", "hatchery.HatcheryPlugin"):
        with pytest.raises(ConfigError, match=f"plugins: {base + plugin}: .*remove it from plugins"):
            make(plugins=[base + "liger.LigerPlugin", base + plugin])


def test_train_on_eot_is_accepted_only_as_train_on_eos():
    # axolotl: train_on_eot defaults to the train_on_eos setting
    same = [{"path": "d", "type": "chat_template", "train_on_eos": "all", "train_on_eot": "all"}]
    assert make(datasets=same).datasets[0].train_on_eos == "all" and make(datasets=same).warnings == ()
    default = [{"path": "d", "type": "chat_template", "train_on_eot": "turn"}]  # train_on_eos default: turn
    assert make(datasets=default).warnings == ()
    other = [{"path": "d", "type": "chat_template"}, {"path": "e", "type": "chat_template", "train_on_eot": "all"}]
    with pytest.raises(ConfigError, match=r"datasets\[1\].train_on_eot: 'all' differs from train_on_eos \('turn'\)"):
        make(datasets=other)


def test_training_changing_keys_are_errors_not_warnings():
    # LISA trains a random subset of layers (axolotl: on when lisa_n_layers and lisa_step_interval are set)
    msg = str(pytest.raises(ConfigError, make, lisa_n_layers=4, lisa_step_interval=20).value)
    assert "lisa_n_layers: LISA" in msg and "lisa_step_interval: LISA" in msg and "remove the lisa_* keys" in msg
    (warning,) = make(lisa_layers_attribute="model.layers").warnings  # axolotl's default; alone it does nothing
    assert warning.startswith("ignored: lisa_layers_attribute (")
    # LoftQ: on when peft.loftq_config.loftq_bits (default 4) is not 0 (axolotl loaders/adapter.py)
    for loftq in ({"loftq_bits": 4}, {}):
        with pytest.raises(ConfigError, match=r"peft.loftq_config: LoftQ .* not supported yet; remove it"):
            make(peft={"loftq_config": loftq})
    assert make(peft={"loftq_config": {"loftq_bits": 0}}).warnings == ()
    assert make(peft={"loftq_config": None}).warnings == () and make(peft={}).warnings == ()
    assert make(peft={"other": 1}).warnings == ("ignored: peft.other (not a key of axolotl's peft section)",)


def test_trl_section_maps_beta_and_names_every_other_key():
    cfg = make(rl="dpo", trl={"beta": 0.05, "use_vllm": True, "max_completion_length": 256, "num_generations": 0,
                              "top_k": None, "no_such_key": 1})
    assert cfg.rl_beta == 0.05
    assert cfg.warnings == (
        f"ignored: trl.use_vllm ({ax.TRL_IGNORED_REASON})",
        f"ignored: trl.max_completion_length ({ax.TRL_IGNORED_REASON})",
        "ignored: trl.no_such_key (not a key of axolotl's trl section)",
    )
    assert make(trl={}).warnings == () and make(trl=None).rl_beta == 0.1
    with pytest.raises(ConfigError, match="trl: expected a mapping"):
        make(trl=True)


def test_base_config_validates_with_warnings():
    cfg = validate_config(yaml.safe_load(BASE_YAML))
    assert cfg.adapter == "lora" and cfg.optimizer == "adamw" and cfg.compute_dtype == "bfloat16"
    assert cfg.special_tokens.pad_token == "<|endoftext|>" and cfg.remat_policy == "full"
    assert any(w.startswith("ignored: flash_attention") for w in cfg.warnings)
    assert any("adamw_bnb_8bit -> adamw" in w for w in cfg.warnings)


@pytest.mark.parametrize("example", sorted(p.name for p in SEED_DIR.glob("*.yaml")))
def test_seed_examples_validate_on_a_base_config(example):
    base = yaml.safe_load(BASE_YAML)
    seed = yaml.safe_load((SEED_DIR / example).read_text())
    cfg = validate_config({**base, **seed}, config_path=SEED_DIR / example)
    same_name = {
        "rl",
        "rl_beta",
        "orpo_alpha",
        "kto_desirable_weight",
        "rl_adapter_ref_model",
        "chat_template",
    }
    for key in set(seed) & same_name:
        assert getattr(cfg, key) == seed[key]
    if "datasets" in seed:
        assert [d.type for d in cfg.datasets] == [d["type"] for d in seed["datasets"]]
        assert [d.split for d in cfg.datasets] == [d.get("split", "train") for d in seed["datasets"]]


def test_seed_examples_are_copies_of_the_shared_ones():
    shared = Path(__file__).parents[3] / "shared" / "seed-examples"
    if not shared.is_dir():
        pytest.skip("no ../shared checkout next to the repository")
    for path in shared.glob("*.yaml"):
        assert (SEED_DIR / path.name).read_text() == path.read_text(), path.name
