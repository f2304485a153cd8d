"""How jaxpref reads an axolotl config: which keys map to jaxpref fields, which are ignored with one
warning line each (with the reason), which are rejected, and axolotl's optimizer/scheduler names.

``translate`` runs before schema validation. Keys that are jaxpref fields pass through untouched; keys
nobody knows are left for the schema to reject with a "did you mean" hint.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from jaxpref.config.axolotl_keys import AXOLOTL_TRL_KEYS
from jaxpref.config.notes import warn


def _names(text: str) -> list[str]:
    return text.split()


def _by_reason(groups: dict[str, str]) -> dict[str, str]:
    """``{reason: "key key ..."}`` -> ``{key: reason}``."""
    out: dict[str, str] = {}
    for reason, keys in groups.items():
        for key in keys.split():
            assert key not in out, f"{key} listed twice"
            out[key] = reason
    return out


# Accepted, no effect, one warning line each (when set to anything but false/empty).
IGNORED_KEYS: dict[str, str] = _by_reason(
    {
        "a CUDA attention switch; jaxpref picks attention per backend, see docs/design.md": """
            flash_attention sdp_attention xformers_attention flex_attention
            flex_attn_compile_kwargs sage_attention eager_attention attn_implementation flash_optimum
            gemma4_hybrid_attn_impl large_head_attention flash_attn_d512 sdpa_varlen heads_k_stride
            ring_attn_func""",
        "a CUDA/Triton kernel patch; jaxpref's fused LM-head kernel is chosen by fused_kernel": """
            flash_attn_cross_entropy flash_attn_rms_norm flash_attn_fuse_qkv flash_attn_fuse_mlp
            fused_attn_kernel lora_mlp_kernel lora_qkv_kernel lora_o_kernel lora_embedding_kernel
            chunked_cross_entropy chunked_cross_entropy_num_chunks cut_cross_entropy tiled_mlp
            tiled_mlp_num_shards tiled_mlp_use_original_mlp dpo_use_liger_kernel use_kernels
            experts_implementation llama4_linearized_experts batch_flattening""",
        "torch.compile; the jaxpref train step is always compiled with jax.jit": """
            torch_compile torch_compile_backend torch_compile_mode torch_compile_options deepcompile""",
        "a CUDA matmul switch; JAX's matmul precision is set with JAX_DEFAULT_MATMUL_PRECISION": "tf32",
        "FP8 training is not implemented; compute_dtype sets the precision": """
            fp8 fp8_config fp8_enable_fsdp_float8_all_gather fp32_norms fp32_norm_classes""",
        "a torch distributed setting; jaxpref shards over the mesh (data, fsdp, tensor) on every host": """
            deepspeed fsdp fsdp_config fsdp_version fsdp_final_state_dict_type ddp world_size local_rank
            dp_shard_size dp_replicate_size tensor_parallel_size context_parallel_size
            sequence_parallel_degree accelerator_config use_ray ray_run_name ray_num_workers
            resources_per_worker""",
        "torch device placement; JAX places arrays by the mesh and its sharding rules": """
            device device_map max_memory gpu_memory_limit low_cpu_mem_usage experimental_skip_move_to_device
            ple_cpu_offload layer_offloading activation_offloading lora_on_cpu""",
        "a torch checkpointing option; use gradient_checkpointing or remat_policy": """
            gradient_checkpointing_kwargs selective_checkpointing""",
        "a HF Trainer column filter; jaxpref's formatters read only the columns they need": ("remove_unused_columns"),
        "an axolotl packing/sampling tuning knob; jaxpref packs with sample_packing alone": """
            sample_packing_group_size sample_packing_bin_size sample_packing_sequentially
            sample_packing_mp_start_method sample_packing_eff_est eval_sample_packing pad_to_multiple_of
            multipack_real_batches pretrain_multipack_buffer_size pretrain_multipack_attn
            pretraining_sample_concatenation streaming_multipack_buffer_size group_by_length""",
        "an axolotl dataset-preparation option, not implemented": """
            skip_prepare_dataset num_dataset_shards_to_save
            push_dataset_to_hub hf_use_auth_token dataset_keep_in_memory
            shuffle_before_merging_datasets is_preprocess preprocess_iterable total_num_tokens
            total_supervised_tokens eval_sequence_len max_prompt_len""",
        "jaxpref shuffles the merged training data with seed": "shuffle_merged_datasets",
        "not implemented; jaxpref logs to TensorBoard, metrics.jsonl and W&B": """
            use_mlflow mlflow_tracking_uri mlflow_experiment_name mlflow_run_name hf_mlflow_log_artifacts
            use_comet comet_api_key comet_workspace comet_project_name comet_experiment_key comet_mode
            comet_online comet_experiment_config use_trackio trackio_project_name trackio_run_name
            trackio_space_id use_otel_metrics otel_metrics_host otel_metrics_port include_tokens_per_second
            include_tkps profiler_steps profiler_steps_start use_swanlab""",
        "W&B gradient watching and model upload are not implemented": "wandb_watch wandb_log_model",
        "a Gradio inference-UI setting": """
            gradio_title gradio_share gradio_server_name gradio_server_port gradio_max_new_tokens
            gradio_temperature""",
        "pushing to the Hugging Face Hub is not implemented; upload output_dir yourself": """
            hub_model_id hub_strategy hub_revision""",
        "jaxpref always writes safetensors": "save_safetensors",
        "jaxpref evaluates on eval_steps/evals_per_epoch and checkpoints on save_steps/saves_per_epoch": """
            eval_strategy evaluation_strategy save_strategy save_first_step save_only_model
            metric_for_best_model greater_is_better""",
        "generation and benchmark evals during training are not implemented": """
            do_causal_lm_eval eval_causal_lm_metrics do_bench_eval bench_dataset bench_split eval_table_size
            eval_max_new_tokens generate_samples num_generation_samples""",
        "a torch memory/watchdog option; the non-finite guard is skip_nonfinite_steps": """
            loss_watchdog_threshold loss_watchdog_patience gc_steps torch_empty_cache_steps gc_collect_steps
            full_determinism""",
        "jaxpref runs its own JAX model code (Llama family), never a checkpoint's Python code": """
            trust_remote_code cls_model_config model_type is_falcon_derived_model
            is_llama_derived_model is_mistral_derived_model is_qwen_derived_model axolotl_config_path""",
        "jaxpref loads the tokenizer with transformers AutoTokenizer defaults": """
            tokenizer_use_fast tokenizer_legacy tokenizer_use_mistral_common tokenizer_type processor_type
            tokenizer_save_jinja_files processor_kwargs""",
        "axolotl substitutes it for 'You are a helpful assistant.' in its chatml template, which (like jaxpref's) "
        "has no default system message, so it has no effect; put a system turn in the data instead": (
            "default_system_message"
        ),
        "axolotl resizes the embeddings only when the tokenizer outgrows them (added tokens, which jaxpref "
        "rejects: tokens, added_tokens_overrides), so this has no effect": """
            resize_token_embeddings_to_32x mean_resizing_embeddings""",
        "an embedding dtype option; compute_dtype and param_dtype set the precision": "embeddings_skip_upcast",
        "a bitsandbytes/quantization option with no effect in jaxpref (QLoRA loading is always layer by "
        "layer), without load_in_8bit or model_quantization_config (rejected), or a post-training export "
        "setting": """
            qlora_sharded_model_loading model_quantization_config_kwargs quantize_moe_experts
            quantization export""",
        "names the layer list LISA samples from (axolotl's default model.layers); LISA itself (lisa_n_layers, "
        "lisa_step_interval) is rejected": "lisa_layers_attribute",
        "merging LoRA is a separate step after training (export), not a training option": """
            merge_lora merge_method""",
        "a PEFT option with no effect on jaxpref's models (PEFT's fan_in_fan_out is for GPT-2's Conv1D; the "
        "layer pattern needs peft_layers_to_transform, rejected), or an adapter dtype/tying detail": """
            lora_fan_in_fan_out peft_layers_pattern peft_ensure_weight_tying peft_autocast_adapter_dtype""",
        "read only by optimizers jaxpref rejects by name (CAME's third beta and second epsilon, GaLore/APOLLO's "
        "target modules), by no axolotl trainer (lr_div_factor), or at load time (torchdistx)": """
            optim_target_modules torchdistx_path adam_beta3 adam_epsilon2 lr_div_factor""",
        "LoRA+'s learning rate for embedding adapters; no effect without loraplus_lr_ratio (rejected), as in "
        "axolotl, whose default is 1e-6": "loraplus_lr_embedding",
        "the batch of an optimizer step is micro_batch_size x gradient_accumulation_steps x data-parallel "
        "devices; HF's halving of the batch after an out-of-memory error is not implemented": "auto_find_batch_size",
        "a parameter of a rejected feature; no effect without it (as in axolotl): eaft_* need use_eaft, "
        "scaling_softmax_* need scaling_softmax, dataset_shard_idx needs dataset_shard_num": """
            eaft_alpha eaft_k scaling_softmax_factor scaling_softmax_bias dataset_shard_idx""",
        "a multimodal or sequence-classification option; jaxpref's models are text-only causal LMs (a reward "
        "model's head has one output, as TRL's RewardTrainer requires)": """
            freeze_mm_modules image_size image_resize_algorithm role_boundaries num_labels""",
        "an RL extra that does not change DPO/IPO/ORPO/KTO/SimPO training (vLLM/EBFT generation settings, "
        "logits slicing, generation during eval, checkpoint triggers)": """
            vllm ebft dpo_use_logits_to_keep dpo_generate_during_eval dynamic_checkpoint""",
        "a generation length; the teacher server only scores the rows of the dataset": "kd_online_max_new_tokens",
        "an MoE or model-specific CUDA kernel option (axolotl's kernels, DenseMixer plugins); jaxpref's models "
        "(Llama family) have no experts": """
            expert_backend moe_grouped_backend moe_dequant_chunk_size moe_bnb_fast use_scattermoe use_sonicmoe
            use_dsv4_kernels use_glm_dsa_kernels dsv4_fp8_nonexpert_mode dsv4_fp8_lora_kernel
            dsv4_shared_mlp_lora_kernel dsv4_bf16_all dense_mixer""",
        "no effect, as in TRL 1.16 (which turns padding_free off and pads): pairs are padded to the batch's "
        "longest row and the padding is masked out of attention and the loss, so the loss equals the padding-free "
        "one": "dpo_padding_free",
    }
)

# Families of keys (current and future ones) ignored the same way.
IGNORED_PREFIXES: dict[str, str] = {
    "liger_": "a Liger Triton kernel patch; jaxpref's fused LM-head kernel is chosen by fused_kernel",
    "unsloth_": "an Unsloth Triton kernel patch; jaxpref's fused LM-head kernel is chosen by fused_kernel",
    "cut_cross_entropy_": "a cut-cross-entropy option; jaxpref's fused LM-head kernel is set by fused_kernel",
    "ddp_": "a torch DDP setting; jaxpref shards over the mesh (data, fsdp, tensor)",
    "dataloader_": "a torch DataLoader setting; jaxpref's Grain pipeline sets its own workers",
    "generation_": "generation during training is not implemented",
    "dion_": "an optimizer jaxpref does not implement",
    "qgalore_": "an optimizer jaxpref does not implement",
    "jagged_restart_": "a parameter of jagged LR restarts; no effect without jagged_restart_steps (rejected)",
    "relora_": "a ReLoRA parameter; no effect without relora (rejected)",
    "pose_": "a PoSE parameter; no effect without use_pose (rejected)",
    "swanlab_": "not implemented; jaxpref logs to TensorBoard, metrics.jsonl and W&B",
    "lm_eval_": "benchmark evals with lm-eval-harness are not run by jaxpref; run them on the exported model",
    "expert_parallel_": "MoE expert parallelism; jaxpref's models (Llama family) have no experts",
    "nemo_gym_": "NeMo Gym environment rewards for online RL (GRPO), which jaxpref does not implement",
}

# Rejected with an error when set to anything but false/empty (or a value of UNSUPPORTED_DEFAULTS): ignoring
# them would silently train a different model than the one asked for (other weights, data, loss or schedule).
UNSUPPORTED_KEYS: dict[str, str] = {
    "gptq": "GPTQ-quantized models are not supported yet",
    "peft_use_dora": "DoRA is not supported yet; use plain LoRA",
    "peft_use_rslora": "rank-stabilised LoRA scaling is not supported yet; use plain LoRA",
    "peft_layers_to_transform": "LoRA on a subset of layers is not supported yet",
    "lora_target_parameters": "LoRA on raw parameters (MoE experts) is not supported yet",
    "unfrozen_parameters": "partial freezing by regex is not supported yet",
    "relora": "ReLoRA is not supported yet",
    "lisa_n_layers": "LISA (training a random subset of layers, resampled every lisa_step_interval steps) is not "
    "supported yet; remove the lisa_* keys to train every layer",
    "lisa_step_interval": "LISA (training a random subset of layers, resampled every lisa_step_interval steps) is "
    "not supported yet; remove the lisa_* keys to train every layer",
    "pretraining_dataset": "streaming pretraining datasets are not supported yet; use datasets",
    "process_reward_model": "process reward models are not supported yet",
    "model_config": "overriding the model's config.json is not supported; edit config.json instead",
    "rope_scaling": "set rope_scaling in the model's config.json",
    "qat": "quantization-aware training is not supported yet",
    "diffusion_lm": "diffusion LM training is not supported",
    "diffusion": "diffusion LM training is not supported",
    "use_onebitllms": "1.58-bit (BitNet) training with onebitllms is not supported",
    "lora_rank_pattern": "per-module LoRA ranks (PEFT rank_pattern) are not supported yet; use one lora_r",
    "lora_alpha_pattern": "per-module LoRA alphas (PEFT alpha_pattern) are not supported yet; use one lora_alpha",
    "liger_use_token_scaling": "scaling each token's loss by its predicted probability (Liger's token scaling) is "
    "not supported; remove it for the plain cross-entropy",
    "spectrum_top_fraction": "Spectrum (training only the layers with the highest signal-to-noise ratio) is not "
    "supported yet; remove the spectrum_* keys and its plugin to train every layer",
    "spectrum_model_name": "Spectrum (training only the layers with the highest signal-to-noise ratio) is not "
    "supported yet; remove the spectrum_* keys and its plugin to train every layer",
    "grokfast_alpha": "Grokfast gradient filtering is not supported; remove the grokfast_* keys and its plugin",
    "grokfast_lamb": "Grokfast gradient filtering is not supported; remove the grokfast_* keys and its plugin",
    "mora": "MoRA adapters are not supported; use adapter: lora",
    "llmcompressor": "sparse fine-tuning with LLM Compressor recipes is not supported",
    "hatchery": "training on a remote Tinker/Hatchery service is not supported; jaxpref trains locally",
    "nonexpert_quantization": "quantized (fp8/nf4) weights are not supported; jaxpref trains at param_dtype",
    "gemma4_fp8_nonexpert": "quantized (fp8/nf4) weights are not supported; jaxpref trains at param_dtype",
    "gemma4_nf4_nonexpert": "quantized (fp8/nf4) weights are not supported; jaxpref trains at param_dtype",
    "dsv4_fp4_grouped_mode": "fp4 MoE experts are not supported; jaxpref's models have no experts",
    "nvfp4_merge_aware": "NVFP4 fake-quantized LoRA training is not supported; jaxpref trains at param_dtype",
    "nvfp4_merge_aware_start_step": "NVFP4 fake-quantized LoRA training is not supported; jaxpref trains at "
    "param_dtype",
    # Keys that change the trained model (weights, data, loss, schedule) and were warnings before.
    "load_in_8bit": "axolotl loads the base weights in 8 bits (bitsandbytes) and trains LoRA on them; quantized "
    "loading is not supported; remove it to train on the unquantized weights (param_dtype: bfloat16 halves memory)",
    "model_quantization_config": "axolotl quantizes the weights at load (Mxfp4Config/FineGrainedFP8Config); "
    "quantized weights are not supported; remove it to train at param_dtype",
    "neftune_noise_alpha": "NEFTune: axolotl (TRL/transformers) adds uniform noise of scale alpha/sqrt(length x "
    "hidden) to the input embeddings during training; not supported; remove it to train without noise",
    "noisy_embedding_alpha": "axolotl's old name for neftune_noise_alpha (NEFTune: noise added to the input "
    "embeddings during training); not supported; remove it to train without noise",
    "use_dft": "DFT (dynamic fine-tuning: each token's cross-entropy scaled by its predicted probability) is not "
    "supported; remove it for the plain cross-entropy",
    "use_eaft": "axolotl replaces the cross-entropy with EAFT (entropy-aware focal training: each token's loss "
    "weighted by the entropy of the model's top eaft_k predictions, to the power eaft_alpha); not supported; "
    "remove use_eaft (and eaft_*) for the plain cross-entropy",
    "scaling_softmax": "axolotl patches attention to scalable softmax (SSMax: logits scaled by a learned "
    "scaling_softmax_factor x log(length) + scaling_softmax_bias), which adds trained parameters; not supported; "
    "remove the scaling_softmax* keys for standard attention",
    "s2_attention": "shifted-sparse attention (LongLoRA's S2-Attn) trains with a different attention pattern; "
    "not supported (axolotl no longer supports it either); remove it",
    "use_pose": "axolotl trains with PoSE (position ids skipped to simulate pose_max_context_len); not supported; "
    "remove use_pose (and pose_*) to train with contiguous positions",
    "max_packed_sequence_len": "axolotl's removed packing length (axolotl now rejects it too); use sample_packing: "
    "true, which packs to sequence_len",
    "embedding_lr": "axolotl trains the embedding weights with this learning rate instead of learning_rate; "
    "per-group learning rates are not supported; remove it (every weight trains at learning_rate)",
    "embedding_lr_scale": "axolotl trains the embedding weights at learning_rate x this scale; per-group learning "
    "rates are not supported; remove it (every weight trains at learning_rate)",
    "lr_groups": "axolotl trains the listed modules with their own learning rates; per-group learning rates are "
    "not supported; remove it (every weight trains at learning_rate)",
    "loraplus_lr_ratio": "LoRA+: axolotl (PEFT's create_loraplus_optimizer) trains LoRA's B matrices at "
    "learning_rate x this ratio (and embedding adapters at loraplus_lr_embedding); not supported; remove it "
    "(A and B train at learning_rate)",
    "optim_args": "axolotl passes these as extra arguments to the optimizer; not supported; remove them and use "
    "jaxpref's optimizer keys (adam_beta1, adam_beta2, adam_epsilon, weight_decay)",
    "lr_quadratic_warmup": "axolotl's cosine schedule then warms up quadratically; not supported (warmup is "
    "linear); remove it",
    "cosine_constant_lr_ratio": "axolotl's cosine schedule (with cosine_min_lr_ratio) then holds the minimum "
    "learning rate from this fraction of the steps on; not supported; remove it for cosine decay to "
    "cosine_min_lr_ratio at the last step",
    "jagged_restart_steps": "axolotl restarts the learning rate every jagged_restart_steps steps (with "
    "jagged_restart_warmup_steps of warmup and jagged_restart_anneal_steps of annealing); not supported; remove "
    "the jagged_restart_* keys for one schedule over the run",
    "peft_init_lora_weights": "axolotl passes it to PEFT's init_lora_weights (gaussian, pissa, olora, eva, ...: "
    "other initial adapter weights); not supported; remove it for PEFT's default (true: A Kaiming-uniform, B zero)",
    "peft_layer_replication": "PEFT's layer_replication builds a deeper model by repeating layer ranges; not "
    "supported; remove it",
    "peft_trainable_token_indices": "PEFT's trainable tokens train these embedding rows next to LoRA; not "
    "supported; remove it (or train the whole embedding with lora_modules_to_save: [embed_tokens])",
    "rpo_alpha": "RPO adds rpo_alpha x the NLL of the chosen completion to the DPO loss (axolotl passed it to TRL, "
    "which has since dropped it; axolotl now rejects it); write it as dpo_loss_type: [sigmoid, sft] with "
    "dpo_loss_weights: [1.0, <rpo_alpha>] (TRL's form of RPO)",
    "dpo_norm_loss": "axolotl's length-normalised DPO (log-probs averaged over the completion tokens; axolotl now "
    "rejects it); use dpo_loss_type: sigmoid_norm, TRL's length-normalised sigmoid loss",
    "fix_untrained_tokens": "axolotl overwrites the embedding rows of tokens the base model never trained (or of "
    "the listed ids) with the mean embedding before training; not supported; remove it",
    "tokens": "axolotl adds these tokens to the tokenizer and new rows to the embeddings; adding tokens is not "
    "supported; remove it (use tokens the tokenizer already has, e.g. via special_tokens)",
    "added_tokens_overrides": "axolotl renames these reserved tokens of the tokenizer, which changes how the data "
    "is tokenized; not supported; remove it",
    "shrink_embeddings": "axolotl cuts the embedding and LM head down to len(tokenizer) rows, which changes the "
    "softmax over the vocabulary; not supported; remove it to train with the checkpoint's vocabulary",
    "model_revision": "axolotl downloads this revision of base_model; hub revisions are not supported (ignoring "
    "it would train other weights); download the revision and point base_model at its directory",
    "model_kwargs": "axolotl passes these to from_pretrained, where keys of config.json override the model's "
    "config; not supported; put config changes in config.json and remove it",
    "trainer_cls": "a custom torch Trainer class replaces axolotl's training loop; not supported (torch code "
    "cannot run in jaxpref); remove it (jaxpref's own extension point is objective: package.module:builder)",
    "chat_template_kwargs": "axolotl passes these as variables to the chat template (e.g. enable_thinking), which "
    "changes the rendered training text; not supported; remove them, or write a chat_template_jinja that "
    "renders what you want without them",
    "curriculum_sampling": "axolotl then trains on the rows in dataset order (no shuffling); not supported (jaxpref "
    "always shuffles with seed); remove it",
    "dataset_shard_num": "axolotl trains on one shard (dataset_shard_idx) of dataset_shard_num; not supported; "
    "remove both keys, or cut the dataset yourself",
    "min_sample_len": "axolotl drops rows shorter than this many tokens (default 2); not supported; remove it or "
    "filter the dataset yourself",
    "early_stopping_patience": "axolotl stops training once the eval loss has not improved for this many "
    "evaluations; early stopping is not supported; remove it (and pick a checkpoint by its eval metrics)",
    "load_best_model_at_end": "axolotl ends with the checkpoint of the best eval metric instead of the last "
    "step's weights; not supported (jaxpref's output is the last step); remove it and pick a checkpoint by its "
    "eval metrics",
}

# Values of UNSUPPORTED_KEYS that are axolotl's defaults (no effect), accepted like false/empty.
UNSUPPORTED_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "peft_init_lora_weights": (True,),  # PEFT's default init
    "model_revision": ("main",),
    "min_sample_len": (1, 2),  # axolotl keeps rows of >= 2 tokens (min_sample_len or 2)
}


def unsupported_value(key: str, value: Any) -> bool:
    """Whether ``value`` of an UNSUPPORTED_KEYS key asks for the unsupported feature (not false/empty and not
    axolotl's default)."""
    if not value:
        return False
    defaults = UNSUPPORTED_DEFAULTS.get(key, ())
    return not any(value == d and type(value) is type(d) for d in defaults)


# Axolotl keys with a JAX meaning, mapped onto jaxpref fields (see ``_MAPPERS`` below).
MAPPED_KEYS: dict[str, str] = {
    "bf16": "true/auto/full -> compute_dtype: bfloat16; false -> float32 (compute_dtype, if given, wins)",
    "fp16": "true -> compute_dtype: bfloat16, with a warning (float16 training is not implemented)",
    "bfloat16": "true -> param_dtype and compute_dtype bfloat16 (axolotl's no-AMP bfloat16)",
    "float16": "true -> param_dtype and compute_dtype bfloat16, with a warning",
    "float32": "true -> param_dtype and compute_dtype float32",
    "strict": "no effect: key=value overrides are always allowed",
    "dpo_beta": "-> rl_beta (axolotl's deprecated name)",
    "kd_top_k_before_softmax": "-> kd_normalize_topk (also readable as cfg.kd_top_k_before_softmax)",
    "dataset_num_proc": "-> dataset_processes",
    "reinit_weights": "-> random_init_weights",
    "batch_size": "per-device rows per optimizer step: without gradient_accumulation_steps, sets it to batch_size // "
    "micro_batch_size (axolotl's normalize_config); with it, batch_size is not used (a warning if it differs from "
    "micro_batch_size x gradient_accumulation_steps)",
    "use_wandb": "false -> wandb_mode: disabled; true -> no effect (W&B is on when wandb_project is set)",
    "lr_scheduler_kwargs": "min_lr_rate -> cosine_min_lr_ratio; other keys are ignored with a warning",
    "streaming": "true -> streaming: true on every datasets/test_datasets entry that does not set it",
    "auto_resume_from_checkpoints": "true -> resume_from_checkpoint: auto",
    "plugins": "not loaded: their keys are handled one by one (one warning); a plugin that changes what trains even "
    "without keys (Spectrum, Grokfast, MoRA, Diffusion, LLMCompressor, Hatchery) is an error",
    "bnb_config_kwargs": "bnb_4bit_quant_type, bnb_4bit_use_double_quant, bnb_4bit_compute_dtype and "
    "bnb_4bit_quant_storage -> the top-level keys of those names; other keys (llm_int8_*) are ignored with a "
    "warning",
    "peft": "loftq_config: an error when enabled (loftq_bits, default 4, not 0), as LoftQ init is not supported "
    "yet; other keys are ignored with a warning",
}

# axolotl plugins (by class name) that change what trains as soon as they are listed: their keys all have
# defaults (spectrum_top_fraction 0.5, grokfast_alpha 0.98, mora.use_mora true, diffusion: {...}).
UNSUPPORTED_PLUGINS: dict[str, str] = {
    "SpectrumPlugin": "Spectrum (training only the layers with the highest signal-to-noise ratio) is not supported yet",
    "GrokfastPlugin": "Grokfast gradient filtering is not supported",
    "MoraPlugin": "MoRA adapters are not supported; use adapter: lora",
    "DiffusionPlugin": "diffusion LM training is not supported",
    "LLMCompressorPlugin": "sparse fine-tuning with LLM Compressor recipes is not supported",
    "HatcheryPlugin": "training on a remote Tinker/Hatchery service is not supported; jaxpref trains locally",
}

# Keys of the ``peft:`` section (schemas/peft.py: PeftConfig) rejected when enabled.
PEFT_UNSUPPORTED_KEYS: dict[str, str] = {
    "loftq_config": "LoftQ initialisation of LoRA (quantised base weights, adapters initialised from the "
    "quantisation error) is not supported yet; remove it to train plain LoRA (B initialised to zero)",
}

# Keys of the ``trl:`` section with a jaxpref field; the rest of axolotl's TRLConfig is ignored with a warning.
TRL_MAPPED_KEYS: dict[str, str] = {"beta": "rl_beta"}
TRL_IGNORED_REASON = "a GRPO/EBFT (online RL) setting; axolotl's DPO/IPO/ORPO/KTO/SimPO trainers do not read it"
# rl: grpo: trl keys that choose how or where completions are produced, or what is printed, but not what
# trains; ignored with a warning.
GRPO_IGNORED_TRL_KEYS: dict[str, str] = _by_reason(
    {
        "jaxpref samples with its own JAX sampler on the training devices (no vLLM server or colocated vLLM)": """
            use_vllm vllm_mode vllm_server_host vllm_server_port vllm_server_timeout vllm_enable_sleep_mode
            vllm_sync_interval vllm_lora_sync vllm_importance_sampling_correction vllm_importance_sampling_mode
            vllm_importance_sampling_cap vllm_guided_decoding_regex vllm_device vllm_gpu_memory_utilization
            vllm_max_model_len""",
        "a PyTorch kernel choice; jaxpref's log-probs come from its fused LM-head kernel": "use_liger_loss",
        "a TRL printing/worker setting; jaxpref logs completions with log_completions": """
            num_completions_to_print reward_num_workers async_prefetch prefetch_depth use_data_producer""",
        "jaxpref samples one optimizer step's completions at once (micro_batch_size x "
        "gradient_accumulation_steps rows)": "generation_batch_size",
    }
)
# rl: grpo: trl keys that would change what trains and that jaxpref does not implement: an error when set.
GRPO_UNSUPPORTED_TRL_KEYS: dict[str, str] = _by_reason(
    {
        "syncing the reference model to the policy (TR-DPO style) is not supported": """
            sync_ref_model ref_model_mixup_alpha ref_model_sync_steps""",
        "jaxpref's sampler has temperature, top_p and top_k only": """
            min_p generation_kwargs""",
        "custom rollouts, replay buffers, rerolls and streaming partial batches are not supported": """
            rollout_func replay_buffer_size replay_recompute_logps reroll_start_fraction reroll_max_groups
            skip_zero_advantage_batches streaming_partial_batch streaming_min_groups off_policy_mask_threshold
            steps_per_generation top_entropy_quantile chat_template_kwargs""",
    }
)
GRPO_DEFAULT_VALUES = {"repetition_penalty": 1.0, "top_entropy_quantile": 1.0, "steps_per_generation": 1}

# Keys of one datasets/test_datasets entry.
IGNORED_DATASET_KEYS: dict[str, str] = _by_reason(
    {
        "axolotl dataset sharding/preprocessing, not implemented": """
            shards shards_idx preprocess_shards input_transform trust_remote_code skip""",
        "a legacy axolotl prompt-format key; use type and field_messages": """
            conversation input_format field_human field_model""",
        "per-dataset jinja templates are not supported; set chat_template_jinja at the top level": (
            "chat_template_jinja"
        ),
        "tool calls and reasoning traces are not rendered by jaxpref's formatters yet": """
            field_tools field_thinking template_thinking_key split_thinking""",
        "per-turn/per-span training flags are not implemented; use roles_to_train": """
            message_field_training message_field_training_detail""",
        "a pretraining/stepwise/synthetic dataset option, not supported": """
            text_column step_separator max_completion_length train_on_last_step_only length
            sequence_length min_input_id max_input_id seed""",
    }
)
MAPPED_DATASET_KEYS: dict[str, str] = {
    "message_field_role": "-> message_property_mappings.role (axolotl's deprecated name)",
    "message_field_content": "-> message_property_mappings.content (axolotl's deprecated name)",
}

# axolotl/transformers optimizer names -> jaxpref's optax optimizer.
OPTIMIZERS: dict[str, str] = {
    **dict.fromkeys(
        _names(
            "adamw adamw_torch adamw_torch_fused adamw_hf adamw_apex_fused adamw_anyprecision "
            "adamw_torch_xla adamw_torch_npu_fused optimi_adamw flash_adamw"
        ),
        "adamw",
    ),
    **dict.fromkeys(_names("adam flash_adam"), "adam"),
    "adafactor": "adafactor",
    **dict.fromkeys(_names("sgd flash_sgd"), "sgd"),
    **dict.fromkeys(_names("lion lion_32bit flash_lion"), "lion"),
}
# 8-bit, 4-bit and paged variants: full-precision optimizer states instead, with a warning.
LOW_PRECISION_OPTIMIZERS: dict[str, str] = {
    **dict.fromkeys(
        _names(
            "adamw_8bit adamw_bnb_8bit paged_adamw_8bit paged_adamw_32bit adamw_torch_4bit adamw_torch_8bit "
            "ao_adamw_4bit ao_adamw_8bit ao_adamw_fp8"
        ),
        "adamw",
    ),
    **dict.fromkeys(_names("lion_8bit paged_lion_8bit paged_lion_32bit"), "lion"),
}

# axolotl/transformers scheduler names -> cosine | linear | constant (warmup applies to all three).
LR_SCHEDULERS: dict[str, str] = {
    "cosine": "cosine",
    "cosine_with_min_lr": "cosine",
    "cosine_warmup_with_min_lr": "cosine",
    "linear": "linear",
    "constant": "constant",
    "constant_with_warmup": "constant",
}


def normalize_optimizer(name: str) -> str:
    """The optax optimizer for an axolotl/jaxpref optimizer name (ValueError listing known names)."""
    key = name.strip().lower()
    if key in OPTIMIZERS:
        return OPTIMIZERS[key]
    if key in LOW_PRECISION_OPTIMIZERS:
        optax_name = LOW_PRECISION_OPTIMIZERS[key]
        warn(
            f"optimizer: {name} -> {optax_name} with full-precision states "
            "(8-bit/4-bit/paged optimizers are not implemented in JAX)"
        )
        return optax_name
    known = sorted(set(OPTIMIZERS.values())) + sorted(set(OPTIMIZERS) - set(OPTIMIZERS.values()))
    raise ValueError(
        f"unknown optimizer {name!r}; use one of {', '.join(known)} "
        f"(or an 8-bit/paged variant: {', '.join(sorted(LOW_PRECISION_OPTIMIZERS))})"
    )


def normalize_lr_scheduler(name: str) -> str:
    """cosine | linear | constant for an axolotl/jaxpref scheduler name (ValueError listing names)."""
    key = name.strip().lower()
    if key in LR_SCHEDULERS:
        return LR_SCHEDULERS[key]
    raise ValueError(f"unknown lr_scheduler {name!r}; use one of {', '.join(LR_SCHEDULERS)}")


def ignored_reason(key: str) -> str | None:
    """Why a top-level axolotl key is ignored, or None if it is not an ignored key."""
    if key in UNSUPPORTED_KEYS or key in MAPPED_KEYS:  # a prefix does not reach these
        return None
    if key in IGNORED_KEYS:
        return IGNORED_KEYS[key]
    for prefix, reason in IGNORED_PREFIXES.items():
        if key.startswith(prefix):
            return reason
    return None


def drop_empty(value: Any) -> Any:
    """Remove mapping entries whose value is None (``key:`` with nothing after it means unset)."""
    if isinstance(value, dict):
        return {k: drop_empty(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_empty(v) if isinstance(v, dict) else v for v in value]
    return value


def translate(data: dict[str, Any], own_fields: Collection[str], dataset_fields: Collection[str]) -> list[str]:
    """Rewrite axolotl keys in ``data`` (in place) into jaxpref fields; return the errors found.

    Ignored keys are removed with one warning each; keys that are neither jaxpref fields nor axolotl
    keys are left in place for the schema to reject.
    """
    errors: list[str] = []
    if "trl" in data:
        _trl(data, "trl", errors)
    _qlora(data, errors)
    for key in [k for k in data if k not in own_fields]:
        if key in _MAPPERS:
            _MAPPERS[key](data, key, errors)
        elif key in UNSUPPORTED_KEYS:
            value = data.pop(key)
            if unsupported_value(key, value):
                errors.append(f"{key}: {UNSUPPORTED_KEYS[key]}")
        elif (reason := ignored_reason(key)) is not None:
            _pop_and_warn(data, key, f"ignored: {key} ({reason})")
    _map_precision(data, errors)
    for list_name in ("datasets", "test_datasets"):
        entries = data.get(list_name)
        if isinstance(entries, list):
            for i, entry in enumerate(entries):
                if isinstance(entry, dict):
                    errors += translate_dataset(entry, list_name, dataset_fields, where=f"{list_name}[{i}]")
    return errors


def translate_dataset(
    entry: dict[str, Any], list_name: str, dataset_fields: Collection[str], where: str | None = None
) -> list[str]:
    """Rewrite axolotl keys of one dataset entry in place (warnings for ignored keys); return the errors
    found (``where`` names the entry in them)."""
    errors: list[str] = []
    for key in [k for k in entry if k not in dataset_fields]:
        if key in MAPPED_DATASET_KEYS:
            prop = "role" if key == "message_field_role" else "content"
            mappings = entry.setdefault("message_property_mappings", {})
            value = entry.pop(key)
            if isinstance(mappings, dict):
                mappings.setdefault(prop, value)
        elif key in IGNORED_DATASET_KEYS:
            _pop_and_warn(entry, key, f"ignored: {list_name}[].{key} ({IGNORED_DATASET_KEYS[key]})")
    return errors


def _pop_and_warn(data: dict[str, Any], key: str, message: str) -> None:
    """Remove an ignored key; warn unless its value is false/empty (then nothing is being ignored)."""
    if data.pop(key):
        warn(message)


Mapper = Callable[[dict[str, Any], str, list[str]], None]

_PRECISION_KEYS = ("bf16", "fp16", "bfloat16", "float16", "float32")


def _rename(dst: str) -> Mapper:
    def mapper(data: dict[str, Any], key: str, errors: list[str]) -> None:
        value = data.pop(key)
        if dst in data and data[dst] != value:
            errors.append(f"{key} ({value!r}) and {dst} ({data[dst]!r}) disagree; {key} is axolotl's name for {dst}")
        else:
            data[dst] = value

    return mapper


def _keep_for_precision(data: dict[str, Any], key: str, errors: list[str]) -> None:
    """Precision flags are read together by ``_map_precision``."""


def _drop(data: dict[str, Any], key: str, errors: list[str]) -> None:
    data.pop(key)


def _batch_size(data: dict[str, Any], key: str, errors: list[str]) -> None:
    """axolotl derives ``gradient_accumulation_steps = batch_size // micro_batch_size`` when the former is not set
    (utils/config: normalize_config; batch_size is per device, multiplied by the world size afterwards)."""
    batch = data.pop(key)
    if not batch:
        return
    micro = data.get("micro_batch_size", 1)
    if isinstance(batch, bool) or not isinstance(batch, int) or isinstance(micro, bool) or not isinstance(micro, int):
        errors.append(f"batch_size: expected an integer (rows per optimizer step per device), got {batch!r}")
        return
    accumulation = data.get("gradient_accumulation_steps")
    if accumulation is None:
        if micro < 1 or batch < micro:
            errors.append(
                f"batch_size: {batch} with micro_batch_size {micro}: axolotl sets gradient_accumulation_steps to "
                f"batch_size // micro_batch_size = {batch // micro if micro >= 1 else 0}; make batch_size a "
                "multiple of micro_batch_size, or set gradient_accumulation_steps"
            )
            return
        if batch % micro:
            warn(
                f"batch_size: {batch} is not a multiple of micro_batch_size {micro}; gradient_accumulation_steps = "
                f"{batch // micro} (as axolotl), {micro * (batch // micro)} rows per step per device"
            )
        data["gradient_accumulation_steps"] = batch // micro
    elif isinstance(accumulation, int) and batch != micro * accumulation:
        warn(
            f"ignored: batch_size ({batch}; gradient_accumulation_steps is set, so a step is micro_batch_size x "
            f"gradient_accumulation_steps = {micro * accumulation} rows per device, as in axolotl)"
        )


def _qlora(data: dict[str, Any], errors: list[str]) -> None:
    """``adapter: qlora`` -> ``adapter: lora`` + ``load_in_4bit: true`` (axolotl requires load_in_4bit with qlora)."""
    value = data.get("adapter")
    if not (isinstance(value, str) and value.strip().lower() == "qlora"):
        return
    if data.get("load_in_4bit", True) is not True:
        errors.append(
            f"adapter: qlora with load_in_4bit: {data['load_in_4bit']!r}: qlora trains LoRA on a 4-bit base and needs "
            "load_in_4bit: true (axolotl requires it too); remove load_in_4bit, or use adapter: lora"
        )
        return
    data["adapter"], data["load_in_4bit"] = "lora", True


_BNB_4BIT_KEYS = (
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "bnb_4bit_compute_dtype",
    "bnb_4bit_quant_storage",
)


def _bnb_config_kwargs(data: dict[str, Any], key: str, errors: list[str]) -> None:
    kwargs = data.pop(key)
    if not kwargs:
        return
    if not isinstance(kwargs, dict):
        errors.append(f"bnb_config_kwargs: expected a mapping, got {kwargs!r}")
        return
    for name, value in kwargs.items():
        if name in _BNB_4BIT_KEYS:
            if name in data and data[name] != value:
                errors.append(f"bnb_config_kwargs.{name} ({value!r}) and {name} ({data[name]!r}) disagree; keep one")
            data[name] = value
        else:
            warn(f"ignored: bnb_config_kwargs.{name} (only {', '.join(_BNB_4BIT_KEYS)} have a jaxpref meaning)")


def _use_wandb(data: dict[str, Any], key: str, errors: list[str]) -> None:
    if data.pop(key) is False:
        data.setdefault("wandb_mode", "disabled")


def _lr_scheduler_kwargs(data: dict[str, Any], key: str, errors: list[str]) -> None:
    kwargs = data.pop(key)
    if not isinstance(kwargs, dict):
        errors.append(f"lr_scheduler_kwargs: expected a mapping, got {kwargs!r}")
        return
    for name, value in kwargs.items():
        if name == "min_lr_rate":
            data.setdefault("cosine_min_lr_ratio", value)
        else:
            warn(f"ignored: lr_scheduler_kwargs.{name} (only min_lr_rate has a jaxpref equivalent)")


def _streaming(data: dict[str, Any], key: str, errors: list[str]) -> None:
    if not data.pop(key):
        return
    for list_name in ("datasets", "test_datasets"):
        for entry in data.get(list_name) or []:
            if isinstance(entry, dict):
                entry.setdefault("streaming", True)


def _auto_resume(data: dict[str, Any], key: str, errors: list[str]) -> None:
    if data.pop(key):
        data.setdefault("resume_from_checkpoint", "auto")


def _plugins(data: dict[str, Any], key: str, errors: list[str]) -> None:
    plugins = data.pop(key)
    if not plugins:
        return
    if not isinstance(plugins, list):
        errors.append(f"plugins: expected a list of plugin classes (axolotl.integrations...Plugin), got {plugins!r}")
        return
    found = len(errors)
    for plugin in plugins:
        why = UNSUPPORTED_PLUGINS.get(str(plugin).rsplit(".", 1)[-1])
        if why:
            errors.append(f"plugins: {plugin}: {why}; remove it from plugins")
    if len(errors) == found:
        warn("ignored: plugins (axolotl plugins do not load in jaxpref; their keys are handled one by one)")


def _peft(data: dict[str, Any], key: str, errors: list[str]) -> None:
    """axolotl's nested ``peft:`` section: ``loftq_config`` turns on LoftQ when its loftq_bits (default 4) is
    not 0 (loaders/adapter.py)."""
    section = data.pop(key)
    if not section:
        return
    if not isinstance(section, dict):
        errors.append(f"peft: expected a mapping (axolotl's peft section: loftq_config), got {section!r}")
        return
    for name, value in section.items():
        if name == "loftq_config":
            bits = value.get("loftq_bits", 4) if isinstance(value, dict) else value
            if bits:
                errors.append(f"peft.loftq_config: {PEFT_UNSUPPORTED_KEYS[name]}")
        elif value:
            warn(f"ignored: peft.{name} (not a key of axolotl's peft section)")


def _trl(data: dict[str, Any], key: str, errors: list[str]) -> None:
    """axolotl's nested ``trl:`` section. With ``rl: grpo`` it stays as the typed ``trl`` section (its
    keys are TRL's GRPOConfig's): generation-backend keys are dropped with a warning, keys that would
    change training and are not implemented are errors, unknown keys are left for the schema. Otherwise
    ``beta`` is TRL's beta, which axolotl takes before rl_beta and orpo_alpha (core/builders/rl.py), and the
    other keys configure GRPO/EBFT only (dropped with a warning)."""
    section = data.get(key)
    if not section:
        data.pop(key, None)
        return
    if not isinstance(section, dict):
        errors.append(f"trl: expected a mapping (axolotl's TRL section, e.g. trl: {{beta: 0.1}}), got {section!r}")
        data.pop(key)
        return
    if "grpo" in (data.get("rl"), data.get("objective")):
        _trl_grpo(section, errors)
        return
    data.pop(key)
    for name, value in section.items():
        if name in TRL_MAPPED_KEYS:
            dst = TRL_MAPPED_KEYS[name]
            if value is None:
                continue
            if dst in data and data[dst] != value:
                errors.append(
                    f"trl.{name} ({value!r}) and {dst} ({data[dst]!r}) disagree; axolotl would use trl.{name} "
                    f"(TRL's {name}); keep one of them"
                )
            else:
                data[dst] = value
        elif not value:  # false/empty: nothing is being ignored
            continue
        elif name in AXOLOTL_TRL_KEYS:
            warn(f"ignored: trl.{name} ({TRL_IGNORED_REASON})")
        else:
            warn(f"ignored: trl.{name} (not a key of axolotl's trl section)")


def _trl_grpo(section: dict[str, Any], errors: list[str]) -> None:
    """``rl: grpo``'s ``trl`` section in place: see :func:`_trl`."""
    for name in list(section):
        value = section[name]
        if name in GRPO_DEFAULT_VALUES and value in (None, GRPO_DEFAULT_VALUES[name]):
            section.pop(name)
        elif name in GRPO_IGNORED_TRL_KEYS:
            section.pop(name)
            if value:
                warn(f"ignored: trl.{name} ({GRPO_IGNORED_TRL_KEYS[name]})")
        elif name in GRPO_UNSUPPORTED_TRL_KEYS or name in GRPO_DEFAULT_VALUES:
            section.pop(name)
            if value or name in GRPO_DEFAULT_VALUES:
                reason = GRPO_UNSUPPORTED_TRL_KEYS.get(name, "only its default is supported")
                errors.append(f"trl.{name}: {value!r}: {reason}; remove it")


_MAPPERS: dict[str, Mapper] = {
    **dict.fromkeys(_PRECISION_KEYS, _keep_for_precision),
    "strict": _drop,
    "dpo_beta": _rename("rl_beta"),
    "kd_top_k_before_softmax": _rename("kd_normalize_topk"),
    "dataset_num_proc": _rename("dataset_processes"),
    "reinit_weights": _rename("random_init_weights"),
    "batch_size": _batch_size,
    "use_wandb": _use_wandb,
    "lr_scheduler_kwargs": _lr_scheduler_kwargs,
    "streaming": _streaming,
    "auto_resume_from_checkpoints": _auto_resume,
    "plugins": _plugins,
    "peft": _peft,
    "bnb_config_kwargs": _bnb_config_kwargs,
}
assert set(_MAPPERS) == set(MAPPED_KEYS)


def _map_precision(data: dict[str, Any], errors: list[str]) -> None:
    """bf16/fp16/bfloat16/float16/float32 -> compute_dtype/param_dtype; explicit jaxpref keys win."""
    flags = {k: data.pop(k) for k in _PRECISION_KEYS if k in data}
    for key, value in flags.items():
        allowed = (True, False, "auto", "full") if key == "bf16" else (True, False)
        if value not in allowed or (value in (0, 1) and not isinstance(value, bool)):
            names = "true, false or auto" if key == "bf16" else "true or false"
            errors.append(f"{key}: expected {names}, got {value!r}")
            return
    compute = param = None
    if flags.get("float32"):
        compute = param = "float32"
    if flags.get("bfloat16") or flags.get("float16"):
        compute = param = "bfloat16"
    if flags.get("float16"):
        warn("float16: float16 training is not implemented; using bfloat16 parameters and compute")
    if flags.get("bf16") in (True, "auto", "full"):
        compute = compute or "bfloat16"
    elif flags.get("bf16") is False:
        compute = compute or "float32"
    if flags.get("fp16"):
        warn("fp16: float16 training is not implemented; using bfloat16 compute (compute_dtype)")
        compute = "bfloat16"
    if compute is not None:
        data.setdefault("compute_dtype", compute)
    if param is not None:
        data.setdefault("param_dtype", param)
