"""Schema validation: defaults, unknown keys, types, ranges, cross-field checks, value mapping."""

from __future__ import annotations

import logging

import pytest

from jaxpref.config import DatasetConfig, JaxprefConfig

from .helpers import MINIMAL, make, problem


def test_minimal_config_resolves_defaults():
    cfg = make()
    assert cfg.optimizer == "adamw" and cfg.lr_scheduler == "cosine"
    assert (cfg.compute_dtype, cfg.param_dtype) == ("float32", "float32")
    assert cfg.remat_policy == "none" and cfg.gradient_checkpointing is False
    assert cfg.eval_batch_size == cfg.micro_batch_size == 1
    assert cfg.pad_to_sequence_len is False and cfg.dataset_processes >= 1
    assert cfg.chat_template == "tokenizer_default"
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (-1, 1, 1)
    assert cfg.fused_kernel.impl == "auto"
    assert cfg.datasets[0].split == "train" and cfg.datasets[0].roles_to_train == ["assistant"]
    assert cfg.sequence_len == 512 and cfg.output_dir == "./model-out" and cfg.seed == 42
    assert cfg.use_tensorboard is True and cfg.max_bad_row_fraction == 0.5


def test_unknown_key_suggests_the_right_one():
    msg = problem(lerning_rate=3e-4)
    assert "unknown key 'lerning_rate' (did you mean 'learning_rate'?)" in msg


def test_unknown_key_without_a_close_match():
    assert "unknown key 'zzz_qqq' (not a jaxpref or axolotl key" in problem(zzz_qqq=1)


def test_nested_unknown_keys_name_their_path():
    msg = problem(mesh={"fdsp": 2}, datasets=[{"path": "a"}, {"pth": "b", "path": "c"}])
    assert "unknown key 'mesh.fdsp' (did you mean 'fsdp'?)" in msg
    assert "unknown key 'datasets[1].pth' (did you mean 'path'?)" in msg
    msg = problem(fused_kernel={"blok_n": 8})
    assert "unknown key 'fused_kernel.blok_n' (did you mean 'block_n'?)" in msg


def test_wrong_types_name_the_key_and_the_value():
    datasets = [{"path": "a"}, {"path": "b", "type": 5}]
    msg = problem(micro_batch_size="two", sample_packing="maybe", datasets=datasets)
    assert "micro_batch_size: expected an integer, got 'two'" in msg
    assert "sample_packing: expected true or false, got 'maybe'" in msg
    assert "datasets[1].type: expected a format name or a user_defined mapping, got 5" in msg
    assert "3 problems" in msg


def test_literals_list_the_allowed_values():
    msg = problem(compute_dtype="float16")
    assert "compute_dtype: must be one of 'float32' or 'bfloat16', got 'float16'" in msg
    assert "rl: must be one of 'dpo', 'ipo', 'orpo', 'kto', 'simpo' or 'grpo', got 'ppo'" in problem(rl="ppo")
    assert "fused_kernel.impl: must be one of" in problem(fused_kernel={"impl": "triton"})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("gradient_accumulation_steps", 0, "gradient_accumulation_steps: must be >= 1, got 0"),
        ("kd_beta", 1.5, "kd_beta: must be <= 1, got 1.5"),
        ("kd_temperature", 0, "kd_temperature: must be > 0, got 0"),
        ("warmup_ratio", 1.0, "warmup_ratio: must be < 1"),
        ("learning_rate", -1, "learning_rate: must be >= 0"),
        ("val_set_size", 1.5, "val_set_size: expected a fraction in [0, 1) or a whole number of rows >= 1"),
        ("val_set_size", -0.1, "val_set_size: expected a fraction"),
        ("eval_steps", -1, "eval_steps: expected a whole number of steps >= 1 or a fraction in (0, 1)"),
        ("save_steps", 1.5, "save_steps: expected a whole number of steps >= 1 or a fraction in (0, 1)"),
        ("evals_per_epoch", -1, "evals_per_epoch: must be >= 0, got -1"),
        ("saves_per_epoch", -1, "saves_per_epoch: must be >= 1, got -1"),
        ("max_bad_row_fraction", 2, "max_bad_row_fraction: must be <= 1"),
    ],
)
def test_ranges(key, value, expected):
    assert expected in problem(**{key: value})


def test_val_set_size_is_a_fraction_or_a_count():
    assert make(val_set_size=0.05).val_set_size == 0.05
    cfg = make(val_set_size=100)
    assert cfg.val_set_size == 100 and isinstance(cfg.val_set_size, int)
    assert isinstance(make(eval_steps=0.25).eval_steps, float) and make(eval_steps=50.0).eval_steps == 50


def test_zero_counts_are_unset_as_in_axolotl():
    # axolotl: `if cfg.save_steps:`, `if cfg.saves_per_epoch:`, `cfg.max_steps or total_num_steps`,
    # `save_total_limit if save_total_limit else 4`, `if cfg.eval_batch_size:` (utils/config, builders/base.py)
    zeros = dict(max_steps=0, save_steps=0, saves_per_epoch=0, save_total_limit=0, eval_batch_size=0)
    cfg = make(micro_batch_size=3, **zeros)
    assert (cfg.max_steps, cfg.save_steps, cfg.saves_per_epoch, cfg.save_total_limit) == (None,) * 4
    assert cfg.eval_batch_size == 3 and cfg.warnings == ()
    # 0 next to the other key of the pair is not a conflict: axolotl checks `if a and b`
    assert make(save_steps=0, saves_per_epoch=2).saves_per_epoch == 2
    assert make(save_steps=5, saves_per_epoch=0).save_steps == 5
    # warmup_steps: 0 is meaningful (axolotl: `if cfg.warmup_steps is not None`): no warmup
    assert make(warmup_steps=0).warmup_steps == 0


def test_zero_eval_cadence_means_no_evaluation():
    # axolotl: a zero cadence is not set, and with none set there is no evaluation (eval_strategy "no")
    for zeros in ({"evals_per_epoch": 0}, {"eval_steps": 0}, {"eval_steps": 0, "evals_per_epoch": 0}):
        cfg = make(**zeros)
        assert (cfg.eval_steps, cfg.evals_per_epoch) == (None, 0) and cfg.warnings == ()
    # a cadence > 0 wins over the other key's 0 (axolotl checks `if evals_per_epoch and eval_steps`)
    cfg = make(evals_per_epoch=0, eval_steps=10)
    assert (cfg.eval_steps, cfg.evals_per_epoch) == (10, None)
    cfg = make(eval_steps=0, evals_per_epoch=4)
    assert (cfg.eval_steps, cfg.evals_per_epoch) == (None, 4)
    assert make().evals_per_epoch is None  # not set: jaxpref's default, one evaluation after the last step
    (warning,) = make(evals_per_epoch=0, val_set_size=0.1).warnings
    assert "no evaluation" in warning and "val_set_size rows are still held out" in warning


def test_numbers_written_as_strings_are_numbers():
    # axolotl configs often quote learning rates; YAML 1.1 also reads 1e-4 as a string.
    assert make(learning_rate="1e-4").learning_rate == pytest.approx(1e-4)


def test_missing_required_keys():
    data = dict(MINIMAL)
    del data["learning_rate"], data["base_model"]
    with pytest.raises(Exception) as info:
        JaxprefConfig.model_validate(data)
    assert "learning_rate" in str(info.value)
    msg = problem(base_model=None, datasets=None)
    assert "base_model: required" in msg and "datasets: required for training" in msg


def test_random_init_needs_base_model_config_and_a_tokenizer():
    cfg = make(base_model=None, random_init_weights=True, base_model_config="cfgdir", tokenizer_config="tok")
    assert cfg.base_model is None and cfg.random_init_weights
    msg = problem(base_model=None, random_init_weights=True, base_model_config="c")
    assert "tokenizer_config: required" in msg
    assert make(reinit_weights=True).random_init_weights is True  # axolotl's name


def test_datasets_optional_when_not_training():
    data = {k: v for k, v in MINIMAL.items() if k != "datasets"}
    cfg = JaxprefConfig.model_validate(data, context={"require_datasets": False})
    assert cfg.datasets is None


def test_dataset_entry_needs_a_source_and_accepts_string_data_files():
    assert "datasets[0]: give path" in problem(datasets=[{"type": "chatml"}])
    ds = make(datasets=[{"data_files": "a.jsonl", "ds_type": "json"}]).datasets[0]
    assert ds.data_files == ["a.jsonl"]
    assert DatasetConfig(path="x", message_field_role="from").message_property_mappings == {"role": "from"}


def test_cross_field_exclusions():
    assert "warmup_steps and warmup_ratio" in problem(warmup_steps=10, warmup_ratio=0.1)
    assert "eval_steps and evals_per_epoch" in problem(eval_steps=10, evals_per_epoch=2)
    assert "save_steps and saves_per_epoch" in problem(save_steps=10, saves_per_epoch=2)
    assert "rl and kd_trainer: choose one training objective" in problem(rl="dpo", kd_trainer=True)
    assert "val_set_size and test_datasets" in problem(val_set_size=0.1, test_datasets=[{"path": "t"}])
    assert "chat_template: jinja needs chat_template_jinja" in problem(chat_template="jinja")


def test_mesh_sizes():
    assert "at most one axis may be -1" in problem(mesh={"fsdp": -1, "tensor": -1})
    assert "axis sizes must be positive or -1" in problem(mesh={"tensor": 0})
    mesh = make(mesh={"fsdp": -1}).mesh
    assert (mesh.data, mesh.fsdp, mesh.tensor) == (1, -1, 1)
    assert make(mesh={"fsdp": 2}).mesh.data == -1


def test_logical_axis_rules():
    cfg = make(logical_axis_rules=[["embed", "fsdp"], ["vocab", None], ["batch", ["data", "fsdp"]]])
    assert cfg.logical_axis_rules == [("embed", "fsdp"), ("vocab", None), ("batch", ("data", "fsdp"))]
    assert "mesh axes are data, fsdp, tensor" in problem(logical_axis_rules=[["embed", "model"]])
    assert "expected a list of [logical_name" in problem(logical_axis_rules={"embed": "fsdp"})


def test_objective_names():
    assert make(objective="sft").objective == "sft"
    assert make(objective="my_pkg.losses:build").objective == "my_pkg.losses:build"
    assert "expected a registered objective name" in problem(objective="not a name!")


def test_lora():
    cfg = make(adapter="lora", lora_target_modules="q_proj", lora_r=16, lora_alpha=32)
    assert cfg.lora_target_modules == ["q_proj"] and cfg.lora_alpha == 32.0
    assert "adapter: lora needs lora_target_modules" in problem(adapter="lora")
    assert "adapter: must be lora" in problem(adapter="llama-adapter")


def test_lora_keys_without_adapter_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="jaxpref.config"):
        cfg = make(lora_r=32, lora_alpha=16)
    assert cfg.adapter is None
    assert cfg.warnings == ("ignored: lora_r, lora_alpha (adapter is not lora: full fine-tuning)",)
    assert caplog.messages == list(cfg.warnings)


def test_precision_mapping():
    assert (make(bf16=True).compute_dtype, make(bf16=True).param_dtype) == ("bfloat16", "float32")
    assert make(bf16="auto").compute_dtype == "bfloat16"
    assert make(bf16=False).compute_dtype == "float32"
    cfg = make(fp16=True)
    assert cfg.compute_dtype == "bfloat16" and any("fp16" in w for w in cfg.warnings)
    cfg = make(bfloat16=True)
    assert (cfg.compute_dtype, cfg.param_dtype) == ("bfloat16", "bfloat16")
    cfg = make(float16=True)
    assert (cfg.compute_dtype, cfg.param_dtype) == ("bfloat16", "bfloat16")
    assert any("float16" in w for w in cfg.warnings)
    cfg = make(tf32=True)
    assert (cfg.compute_dtype, cfg.param_dtype) == ("float32", "float32") and any("tf32" in w for w in cfg.warnings)
    cfg = make(bf16=True, compute_dtype="float32", param_dtype="bfloat16")  # jaxpref's own keys win
    assert (cfg.compute_dtype, cfg.param_dtype) == ("float32", "bfloat16")
    assert "bf16: expected true, false or auto, got 'yes please'" in problem(bf16="yes please")


@pytest.mark.parametrize(
    ("name", "optax_name", "warns"),
    [
        ("adamw_torch", "adamw", False),
        ("adamw_torch_fused", "adamw", False),
        ("adamw_hf", "adamw", False),
        ("adamw_apex_fused", "adamw", False),
        ("adamw_anyprecision", "adamw", False),
        ("adamw_8bit", "adamw", True),
        ("adamw_bnb_8bit", "adamw", True),
        ("paged_adamw_8bit", "adamw", True),
        ("paged_adamw_32bit", "adamw", True),
        ("adafactor", "adafactor", False),
        ("sgd", "sgd", False),
        ("lion", "lion", False),
        ("lion_8bit", "lion", True),
        ("adam", "adam", False),
    ],
)
def test_optimizer_names(name, optax_name, warns):
    cfg = make(optimizer=name)
    assert cfg.optimizer == optax_name
    assert any("full-precision states" in w for w in cfg.warnings) == warns


def test_unknown_optimizer_lists_known_names():
    msg = problem(optimizer="adamw_foo")
    assert "optimizer: unknown optimizer 'adamw_foo'" in msg
    assert "adamw_torch_fused" in msg and "adafactor" in msg


@pytest.mark.parametrize(
    ("name", "schedule"),
    [
        ("cosine", "cosine"),
        ("linear", "linear"),
        ("constant", "constant"),
        ("constant_with_warmup", "constant"),
        ("cosine_with_min_lr", "cosine"),
    ],
)
def test_lr_scheduler_names(name, schedule):
    assert make(lr_scheduler=name).lr_scheduler == schedule


def test_unknown_lr_scheduler_and_scheduler_kwargs():
    assert "unknown lr_scheduler 'polynomial'; use one of cosine" in problem(lr_scheduler="polynomial")
    cfg = make(lr_scheduler="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1, "power": 2})
    assert cfg.cosine_min_lr_ratio == 0.1
    assert cfg.warnings == ("ignored: lr_scheduler_kwargs.power (only min_lr_rate has a jaxpref equivalent)",)


def test_qlora_keys():
    from jaxpref.assembly import quantization
    from jaxpref.models.nf4 import NF4Config

    cfg = make(adapter="qlora", lora_target_linear=True)
    assert (cfg.adapter, cfg.load_in_4bit, cfg.bnb_4bit_quant_type, cfg.bnb_4bit_use_double_quant) == (
        "lora",
        True,
        "nf4",
        True,
    )
    assert quantization(cfg) == NF4Config(double_quant=True) and quantization(make()) is None
    assert make(adapter="QLoRA", load_in_4bit=True, lora_target_linear=True).load_in_4bit
    assert make(adapter="lora", load_in_4bit=True, lora_target_linear=True).load_in_4bit  # lora on a 4-bit base
    cfg = make(
        adapter="qlora",
        lora_target_linear=True,
        bnb_config_kwargs={"bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": "torch.bfloat16"},
    )
    assert quantization(cfg) == NF4Config(double_quant=False) and cfg.compute_dtype == "bfloat16"
    assert make(adapter="qlora", lora_target_linear=True, bnb_4bit_compute_dtype="bf16").compute_dtype == "bfloat16"
    assert make(load_in_4bit=False).adapter is None  # false is fine


def test_qlora_errors_and_warnings():
    assert "adapter: qlora with load_in_4bit: False" in problem(adapter="qlora", load_in_4bit=False)
    assert "load_in_4bit: true stores the frozen base in 4 bits" in problem(load_in_4bit=True)
    assert "fp4 is not supported" in problem(adapter="qlora", lora_target_linear=True, bnb_4bit_quant_type="fp4")
    assert "bnb_4bit_compute_dtype (bfloat16) and compute_dtype (float32) disagree" in problem(
        adapter="qlora", lora_target_linear=True, compute_dtype="float32", bnb_4bit_compute_dtype="bfloat16"
    )
    assert "disagree" in problem(
        adapter="qlora",
        lora_target_linear=True,
        bnb_4bit_use_double_quant=True,
        bnb_config_kwargs={"bnb_4bit_use_double_quant": False},
    )
    cfg = make(adapter="qlora", lora_target_linear=True, bnb_config_kwargs={"llm_int8_threshold": 6.0})
    assert "ignored: bnb_config_kwargs.llm_int8_threshold" in cfg.warnings[0]
    cfg = make(adapter="qlora", lora_target_linear=True, bnb_4bit_quant_storage="bfloat16")
    assert "bnb_4bit_quant_storage: bfloat16 has no effect" in cfg.warnings[0]
    cfg = make(bnb_4bit_use_double_quant=False)
    assert cfg.warnings == (
        "ignored: bnb_4bit_use_double_quant (no effect without load_in_4bit: true / adapter: qlora)",
    )


def test_qlora_quantize_embeddings():
    from jaxpref.assembly import quantization
    from jaxpref.models.nf4 import NF4Config

    cfg = make(adapter="qlora", lora_target_linear=True, qlora_quantize_embeddings=True)
    assert quantization(cfg) == NF4Config(quantize_embeddings=True)
    assert quantization(make(adapter="qlora", lora_target_linear=True)) == NF4Config(quantize_embeddings=False)
    assert "qlora_quantize_embeddings: true stores the embedding as NF4" in problem(
        adapter="lora", lora_target_linear=True, qlora_quantize_embeddings=True
    )
    assert "with lora_modules_to_save ['embed_tokens', 'lm_head']" in problem(
        adapter="qlora", lora_target_linear=True, qlora_quantize_embeddings=True,
        lora_modules_to_save=["lm_head", "embed_tokens"],
    )  # fmt: skip


def test_gradient_checkpointing_variants():
    cfg = make(gradient_checkpointing="offload")
    assert cfg.gradient_checkpointing is True and cfg.remat_policy == "full"
    assert any("activation offloading is not implemented" in w for w in cfg.warnings)
    cfg = make(remat_policy="dots")
    assert cfg.gradient_checkpointing is True and cfg.remat_policy == "dots"
    cfg = make(gradient_checkpointing=False, remat_policy="full")
    assert cfg.gradient_checkpointing is True and cfg.remat_policy == "full"


def test_remat_policy_none_contradicts_gradient_checkpointing():
    """It used to turn checkpointing off without a word."""
    msg = problem(gradient_checkpointing=True, remat_policy="none")
    assert "gradient_checkpointing: true and remat_policy: none contradict each other; remove one" in msg
    assert make(gradient_checkpointing=False, remat_policy="none").remat_policy == "none"


@pytest.mark.parametrize("objective", [{"rl": "dpo"}, {"rl": "orpo"}, {"reward_model": True}])
def test_train_on_inputs_with_a_preference_objective_warns(objective):
    """Preference losses never score the prompt (TRL's neither): the key has no effect, and says so."""
    cfg = make(train_on_inputs=True, **objective)
    name = f"rl: {objective['rl']}" if "rl" in objective else "reward_model"
    assert any(w.startswith(f"train_on_inputs has no effect with {name}") for w in cfg.warnings), cfg.warnings
    assert not make(train_on_inputs=True).warnings


def test_kto_needs_two_rows_per_micro_batch():
    msg = problem(rl="kto", micro_batch_size=1)
    assert "rl: kto with micro_batch_size 1" in msg and "set micro_batch_size >= 2" in msg
    assert make(rl="kto", micro_batch_size=2).rl == "kto"
    assert make(rl="kto", micro_batch_size=1, precompute_ref_log_probs=True).rl == "kto"  # fixed partners


def test_dpo_loss_type_is_a_list_as_trls_loss_type():
    assert make(rl="dpo").dpo_loss_type == ["sigmoid"]  # TRL's default
    assert make(rl="dpo", dpo_loss_type="hinge").dpo_loss_type == ["hinge"]
    assert make(rl="dpo", dpo_loss_type=["ipo"]).dpo_loss_type == ["ipo"]
    assert make(rl="ipo").dpo_loss_type == ["ipo"]  # rl: ipo is DPO with the ipo loss
    mpo = make(rl="dpo", dpo_loss_type=["sigmoid", "bco_pair", "sft"], dpo_loss_weights=[0.8, 0.2, 1.0])
    assert mpo.dpo_loss_type == ["sigmoid", "bco_pair", "sft"] and mpo.dpo_loss_weights == [0.8, 0.2, 1.0]
    assert make(rl="dpo", dpo_loss_type=["sigmoid", "sft"]).dpo_loss_weights is None  # 1.0 each, in dpo_loss
    assert "unknown DPO loss 'sigmod'" in problem(rl="dpo", dpo_loss_type="sigmod")
    assert "unknown DPO loss 'sftt'" in problem(rl="dpo", dpo_loss_type=["sigmoid", "sftt"])
    assert "give at least one DPO loss type" in problem(rl="dpo", dpo_loss_type=[])


def test_dpo_loss_weights_one_per_loss_type():
    msg = problem(rl="dpo", dpo_loss_type=["sigmoid", "bco_pair", "sft"], dpo_loss_weights=[0.8, 0.2])
    assert "dpo_loss_weights has 2 entries for the 3 of dpo_loss_type [sigmoid, bco_pair, sft]" in msg
    assert "one weight per loss type" in msg
    assert "has 2 entries for the 1 of dpo_loss_type sigmoid" in problem(rl="dpo", dpo_loss_weights=[1.0, 2.0])
    assert "must be a finite number >= 0" in problem(rl="dpo", dpo_loss_type=["sigmoid"], dpo_loss_weights=[-1.0])
    assert "rl: ipo trains the ipo loss alone" in problem(rl="ipo", dpo_loss_weights=[2.0])


def test_dpo_use_weighting():
    assert make(rl="dpo", dpo_use_weighting=True).dpo_use_weighting is True
    assert make(rl="ipo", dpo_use_weighting=True).dpo_use_weighting is True
    msg = problem(rl="dpo", dpo_use_weighting=True, dpo_loss_type=["sigmoid", "aot"], dpo_label_smoothing=0.1)
    assert "dpo_use_weighting (WPO) does not work with dpo_loss_type aot" in msg
    msg = problem(rl="dpo", dpo_use_weighting=True, dpo_loss_type=["sigmoid", "bco_pair", "sft"])
    assert "dpo_use_weighting (WPO) with dpo_loss_type sft: TRL 1.16 fails" in msg


def test_dpo_keys_warn_without_dpo(caplog):
    with caplog.at_level(logging.WARNING, logger="jaxpref.config"):
        make(rl="orpo", dpo_loss_type=["sigmoid"], dpo_loss_weights=[1.0], dpo_use_weighting=True)
    for key in ("dpo_loss_type", "dpo_loss_weights", "dpo_use_weighting"):
        assert f"{key} has no effect with rl: orpo" in caplog.text


@pytest.mark.parametrize("name", ["aot_unpaired", "sigmoid_norm", "discopop"])
def test_dpo_loss_type_accepts_every_loss_the_library_implements(name):
    assert make(rl="dpo", dpo_loss_type=name, dpo_label_smoothing=0.1).dpo_loss_type == [name]


def test_dpo_loss_type_rejects_names_trl_does_not_have():
    assert "unknown DPO loss 'aot_pair'" in problem(rl="dpo", dpo_loss_type="aot_pair")


def test_kd_keys_and_alias():
    cfg = make(kd_trainer=True, kd_top_k_before_softmax=True, kd_zscore_base_temp=2.0)
    assert cfg.kd_normalize_topk is True and cfg.kd_top_k_before_softmax is True
    assert "kd_top_k_before_softmax (True) and kd_normalize_topk (False) disagree" in problem(
        kd_top_k_before_softmax=True, kd_normalize_topk=False
    )
    assert make(dpo_beta=0.3).rl_beta == 0.3


def test_chat_template_jinja_implies_jinja():
    assert make(chat_template_jinja="{{ messages }}").chat_template == "jinja"
    cfg = make(chat_template="chatml", chat_template_jinja="{{ messages }}")
    assert cfg.chat_template == "chatml" and any("chat_template_jinja is not used" in w for w in cfg.warnings)


def test_direct_construction_translates_axolotl_keys():
    cfg = JaxprefConfig(**MINIMAL, bf16=True, flash_attention=True, optimizer="adamw_torch_fused")
    assert cfg.compute_dtype == "bfloat16" and cfg.optimizer == "adamw"
    assert cfg.model_dump()["compute_dtype"] == "bfloat16"


def test_rl_beta_must_be_positive():
    """beta 0 would reach IPO's 1 / (2 beta) and make DPO's loss flat: a config error naming the key."""
    for beta in (0, -0.1):
        assert "rl_beta" in problem(rl="ipo", rl_beta=beta)
    assert make(rl="dpo", rl_beta=0.01).rl_beta == 0.01


def test_objective_and_the_objective_keys_are_one_answer():
    """``objective: dpo`` alone sets ``rl`` (so the preference data is built), ``objective: kd`` sets
    ``kd_trainer``, ``objective: reward`` sets ``reward_model``; a built-in objective that disagrees with
    those keys is a config error naming both; a plugin objective leaves them alone."""
    assert make(objective="dpo").rl == "dpo" and make(objective="simpo").rl == "simpo"
    assert make(objective="kd").kd_trainer and make(objective="reward").reward_model
    assert make(objective="ipo", rl="ipo").rl == "ipo"
    assert "objective: sft and rl: dpo ask for different objectives" in problem(objective="sft", rl="dpo")
    assert "objective: dpo and kd_trainer: true" in problem(objective="dpo", kd_trainer=True)
    assert make(objective="my_pkg.objectives:build", rl="dpo").rl == "dpo"


def test_eot_tokens_train_on_eot_and_the_new_template_names_are_keys():
    cfg = make(eot_tokens="<|end|>", chat_template="phi_3", datasets=[{"path": "d", "train_on_eot": "last"}])
    assert cfg.eot_tokens == ["<|end|>"] and cfg.datasets[0].train_on_eot == "last"
    assert not any("eot_tokens" in w for w in cfg.warnings)  # no longer "ignored"
    assert make().eot_tokens is None and make().datasets[0].train_on_eot is None  # default: train_on_eos
    for name in ("gemma", "qwen_25", "mistral_v3_tekken", "phi_3", "phi_35"):
        assert make(chat_template=name).chat_template == name
    assert "train_on_eot" in problem(datasets=[{"path": "d", "train_on_eot": "first"}])


def test_exact_deduplication_is_a_key_and_refuses_streaming():
    cfg = make(dataset_exact_deduplication=True)
    assert cfg.dataset_exact_deduplication and not any("deduplication" in w for w in cfg.warnings)
    assert make().dataset_exact_deduplication is False
    msg = problem(dataset_exact_deduplication=True, max_steps=10, datasets=[{"path": "d", "streaming": True}])
    assert "dataset_exact_deduplication: not available for streaming datasets (datasets[0] stream)" in msg
    # axolotl's top-level `streaming: true` sets it on every entry: the same error.
    assert "not available for streaming" in problem(dataset_exact_deduplication=True, max_steps=10, streaming=True)
