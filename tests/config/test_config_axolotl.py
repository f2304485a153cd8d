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


# A value that turns the feature on, for the keys where true is axolotl's default (no effect).
ENABLING_VALUE = {"peft_init_lora_weights": "gaussian", "model_revision": "v1.0", "min_sample_len": 16}


def test_unsupported_keys_are_errors_only_when_enabled():
    for key in ax.UNSUPPORTED_KEYS:
        assert validate_config({**MINIMAL, key: False}).warnings == ()
        assert validate_config({**MINIMAL, key: None}).warnings == ()
        with pytest.raises(ConfigError, match=key):
            validate_config({**MINIMAL, key: ENABLING_VALUE.get(key, True)})
    for key, defaults in ax.UNSUPPORTED_DEFAULTS.items():
        for value in defaults:
            assert validate_config({**MINIMAL, key: value}).warnings == (), (key, value)


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
    "role_boundaries": "multimodal",
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


def test_train_on_eot_is_its_own_setting():
    # axolotl: train_on_eot defaults to the train_on_eos setting and may differ from it (data/formats/sft.py)
    entries = [{"path": "d", "type": "chat_template"}, {"path": "e", "type": "chat_template", "train_on_eot": "all"}]
    cfg = make(datasets=entries)
    assert [d.train_on_eot for d in cfg.datasets] == [None, "all"] and cfg.warnings == ()


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


# Keys that change the trained model (weights, data, loss or schedule) and were warnings before issue #16's
# second pass: each is an error naming what axolotl does with it (a fragment checked here), and its
# false/empty value (what dumped configs carry) or axolotl's default loads without a warning.
NOW_REJECTED = {
    "neftune_noise_alpha": ("NEFTune", 5),
    "noisy_embedding_alpha": ("neftune_noise_alpha", 5),
    "use_dft": ("predicted probability", True),
    "use_eaft": ("entropy-aware focal training", True),
    "scaling_softmax": ("scalable softmax", True),
    "s2_attention": ("shifted-sparse attention", True),
    "use_pose": ("PoSE", True),
    "max_packed_sequence_len": ("use sample_packing: true", 2048),
    "embedding_lr": ("embedding weights with this learning rate", 1e-5),
    "embedding_lr_scale": ("learning_rate x this scale", 0.1),
    "lr_groups": ("own learning rates", [{"name": "o", "modules": ["o_proj"], "lr": 1e-5}]),
    "loraplus_lr_ratio": ("LoRA+", 16),
    "optim_args": ("extra arguments to the optimizer", {"amsgrad": True}),
    "lr_quadratic_warmup": ("quadratically", True),
    "cosine_constant_lr_ratio": ("holds the minimum learning rate", 0.8),
    "jagged_restart_steps": ("restarts the learning rate", 100),
    "peft_init_lora_weights": ("init_lora_weights", "pissa"),
    "peft_layer_replication": ("repeating layer ranges", [[0, 4], [2, 6]]),
    "peft_trainable_token_indices": ("embedding rows", [5, 6]),
    "load_in_8bit": ("8 bits", True),
    "model_quantization_config": ("quantizes the weights", "Mxfp4Config"),
    "rpo_alpha": ("dpo_loss_type: [sigmoid, sft] with dpo_loss_weights: [1.0, <rpo_alpha>]", 1.0),
    "dpo_norm_loss": ("dpo_loss_type: sigmoid_norm", True),
    "fix_untrained_tokens": ("mean embedding", True),
    "tokens": ("adds these tokens", ["<tool>"]),
    "added_tokens_overrides": ("renames these reserved tokens", {128011: "<tool>"}),
    "shrink_embeddings": ("len(tokenizer)", True),
    "model_revision": ("download the revision", "v1.0"),
    "model_kwargs": ("from_pretrained", {"rope_theta": 1e6}),
    "trainer_cls": ("objective: package.module:builder", "my.module.Trainer"),
    "chat_template_kwargs": ("rendered training text", {"enable_thinking": False}),
    "curriculum_sampling": ("dataset order", True),
    "dataset_shard_num": ("one shard", 4),
    "min_sample_len": ("drops rows shorter", 16),
    "early_stopping_patience": ("stops training", 3),
    "load_best_model_at_end": ("best eval metric", True),
}


@pytest.mark.parametrize("key", sorted(NOW_REJECTED))
def test_keys_that_change_training_are_errors_with_their_reason(key):
    assert key in AXOLOTL_KEYS and key in ax.UNSUPPORTED_KEYS and ax.ignored_reason(key) is None
    fragment, value = NOW_REJECTED[key]
    msg = str(pytest.raises(ConfigError, make, **{key: value}).value)
    assert f"{key}: " in msg and fragment in msg and ("not supported" in msg or "rejects" in msg), msg
    assert "unknown key" not in msg
    for unset in (None, False, *ax.UNSUPPORTED_DEFAULTS.get(key, ())):
        assert make(**{key: unset}).warnings == (), (key, unset)


def test_dumped_defaults_of_training_keys_load():
    # what a dumped axolotl config carries for these keys (their defaults), and their feature's parameters alone
    cfg = make(
        neftune_noise_alpha=None, embedding_lr_scale=None, embedding_lr=None, fix_untrained_tokens=False,
        load_in_8bit=False, rpo_alpha=None, dpo_norm_loss=False, peft_init_lora_weights=True, tokens=[],
        added_tokens_overrides={}, lr_quadratic_warmup=False, curriculum_sampling=None, min_sample_len=2,
        load_best_model_at_end=False, early_stopping_patience=None, model_revision="main", use_eaft=False,
    )
    assert cfg.warnings == ()
    # a rejected feature's parameters alone do nothing in axolotl: one warning each, not an error
    for key, value in (("loraplus_lr_embedding", 1e-6), ("eaft_alpha", 1.0), ("scaling_softmax_factor", 0.43),
                       ("pose_num_chunks", 2), ("jagged_restart_warmup_steps", 10), ("dataset_shard_idx", 1)):
        (warning,) = make(**{key: value}).warnings
        assert warning.startswith(f"ignored: {key} (") and "no effect without" in warning, warning


def test_batch_size_sets_gradient_accumulation_as_axolotl():
    # axolotl: gradient_accumulation_steps = batch_size // micro_batch_size when not set (per device)
    cfg = make(batch_size=32, micro_batch_size=4)
    assert cfg.gradient_accumulation_steps == 8 and cfg.warnings == ()
    assert make(batch_size=8).gradient_accumulation_steps == 8  # micro_batch_size default 1
    cfg = make(batch_size=32, micro_batch_size=4, gradient_accumulation_steps=2)
    assert cfg.gradient_accumulation_steps == 2
    (warning,) = cfg.warnings
    assert warning.startswith("ignored: batch_size (32; gradient_accumulation_steps is set")
    assert make(batch_size=8, micro_batch_size=4, gradient_accumulation_steps=2).warnings == ()
    assert make(batch_size=None).gradient_accumulation_steps == 1
    with pytest.raises(ConfigError, match="batch_size: 2 with micro_batch_size 4"):
        make(batch_size=2, micro_batch_size=4)
