"""Every configuration key axolotl knows, read from its pydantic schema (data only).

Source: github.com/axolotl-ai-cloud/axolotl at commit 067b021c8b87a9e5e380b9173c704cf7340e30f5 (main):
the fields of ``src/axolotl/utils/schemas/*.py`` (AxolotlInputConfig and the classes it composes; the
RemappedParameters by their aliases), the ``trl:`` section (trl.py: TRLConfig) and every plugin's input
args (``src/axolotl/integrations/*/args.py``, the classes the plugins' ``get_input_args`` name). Keys of
older schemas (commit 1e3ddf72dd06c256a6d5af9d9845211cdcef9ddd and before) that real configs still
carry are kept. Keys of the other nested sections (``vllm:``, ``fsdp_config:``, ``peft:``, ``mora:``,
...) are not listed: the section key itself is.

To refresh: read those files again, update the lists below, and run ``tests/config`` (every key listed
here must be a jaxpref field, mapped, ignored with a reason, or rejected as unsupported).
"""


def _keys(text: str) -> tuple[str, ...]:
    return tuple(text.split())


AXOLOTL_VERSION = "axolotl main @ 067b021c8b87a9e5e380b9173c704cf7340e30f5 (schemas/*.py, integrations/*/args.py)"

# Top-level keys, grouped by the axolotl module that declares them.
AXOLOTL_KEYS_BY_SOURCE: dict[str, tuple[str, ...]] = {
    "config.py: AxolotlInputConfig's own fields": _keys(
        """
        diffusion_lm strict resume_from_checkpoint auto_resume_from_checkpoints
        resize_token_embeddings_to_32x mean_resizing_embeddings shrink_embeddings embeddings_skip_upcast
        reinit_weights trainer_cls rl trl vllm ebft qat quantization export reward_model dynamic_checkpoint
        process_reward_model center_rewards_coefficient num_labels dpo_use_weighting dpo_label_smoothing
        precompute_ref_log_probs dpo_use_liger_kernel dpo_padding_free dpo_loss_type dpo_loss_weights
        datasets test_datasets shuffle_merged_datasets shuffle_before_merging_datasets dataset_prepared_path
        dataset_shard_num dataset_shard_idx skip_prepare_dataset num_dataset_shards_to_save
        pretraining_dataset dataset_processes dataset_num_proc dataset_exact_deduplication
        dataset_keep_in_memory dataloader_pin_memory dataloader_num_workers dataloader_prefetch_factor
        dataloader_drop_last accelerator_config remove_unused_columns push_dataset_to_hub hf_use_auth_token
        device device_map world_size local_rank ddp seed full_determinism ddp_timeout ddp_bucket_cap_mb
        ddp_broadcast_buffers ddp_find_unused_parameters do_causal_lm_eval eval_causal_lm_metrics
        do_bench_eval bench_dataset bench_split metric_for_best_model greater_is_better
        loss_watchdog_threshold loss_watchdog_patience gc_steps torch_empty_cache_steps gc_collect_steps
        bf16 fp16 fp8 fp8_config fp8_enable_fsdp_float8_all_gather bfloat16 float16 tf32 float32
        gradient_checkpointing gradient_checkpointing_kwargs selective_checkpointing activation_offloading
        layer_offloading freeze_mm_modules unfrozen_parameters sequence_len excess_length_strategy
        eval_sequence_len min_sample_len max_prompt_len sample_packing sample_packing_group_size
        sample_packing_bin_size sample_packing_sequentially sample_packing_mp_start_method
        eval_sample_packing pad_to_sequence_len pad_to_multiple_of curriculum_sampling
        multipack_real_batches batch_flattening use_pose pose_split_on_token_ids pose_max_context_len
        pose_num_chunks pretrain_multipack_buffer_size pretrain_multipack_attn
        pretraining_sample_concatenation streaming streaming_multipack_buffer_size xformers_attention
        sdp_attention flex_attention flex_attn_compile_kwargs flash_attention flash_attn_cross_entropy
        flash_attn_fuse_mlp flash_optimum sage_attention eager_attention attn_implementation
        gemma4_hybrid_attn_impl large_head_attention flash_attn_d512 sdpa_varlen fused_attn_kernel
        experts_implementation ple_cpu_offload quantize_moe_experts scaling_softmax scaling_softmax_factor
        scaling_softmax_bias lora_mlp_kernel lora_qkv_kernel lora_o_kernel lora_embedding_kernel
        chunked_cross_entropy chunked_cross_entropy_num_chunks use_eaft eaft_alpha eaft_k use_dft tiled_mlp
        tiled_mlp_num_shards tiled_mlp_use_original_mlp llama4_linearized_experts deepspeed deepcompile
        fsdp_config fsdp_version fp32_norms fp32_norm_classes fsdp_final_state_dict_type val_set_size
        dp_shard_size dp_replicate_size sequence_parallel_degree context_parallel_size heads_k_stride
        ring_attn_func tensor_parallel_size special_tokens tokens added_tokens_overrides torch_compile
        torch_compile_backend torch_compile_mode torch_compile_options max_steps warmup_steps warmup_ratio
        eval_steps evals_per_epoch eval_strategy save_steps saves_per_epoch save_strategy save_total_limit
        save_first_step logging_steps early_stopping_patience load_best_model_at_end save_only_model
        use_tensorboard profiler_steps profiler_steps_start include_tokens_per_second include_tkps
        neftune_noise_alpha orpo_alpha simpo_gamma cpo_alpha kto_desirable_weight kto_undesirable_weight
        rl_beta max_memory gpu_memory_limit low_cpu_mem_usage chat_template chat_template_jinja
        chat_template_kwargs eot_tokens default_system_message fix_untrained_tokens is_preprocess
        preprocess_iterable total_num_tokens total_supervised_tokens sample_packing_eff_est
        axolotl_config_path is_falcon_derived_model is_llama_derived_model is_mistral_derived_model
        is_qwen_derived_model plugins generate_samples num_generation_samples generation_max_new_tokens
        generation_temperature generation_top_p generation_top_k generation_prompt_ratio
        generation_do_sample
        """
    ),
    "model.py: ModelInputConfig, ModelOutputConfig": _keys(
        """
        base_model base_model_config cls_model_config tokenizer_config tokenizer_use_fast tokenizer_legacy
        tokenizer_use_mistral_common tokenizer_type processor_type tokenizer_save_jinja_files
        trust_remote_code experimental_skip_move_to_device use_kernels model_quantization_config
        model_quantization_config_kwargs output_dir hub_model_id hub_strategy hub_revision save_safetensors
        """
    ),
    "training.py: HyperparametersConfig, JaggedLRConfig": _keys(
        """
        gradient_accumulation_steps micro_batch_size batch_size eval_batch_size auto_find_batch_size
        train_on_inputs group_by_length learning_rate embedding_lr embedding_lr_scale weight_decay optimizer
        optim_args optim_target_modules torchdistx_path lr_scheduler lr_scheduler_kwargs lr_quadratic_warmup
        cosine_min_lr_ratio cosine_constant_lr_ratio lr_div_factor lr_groups adam_epsilon adam_epsilon2
        adam_beta1 adam_beta2 adam_beta3 dion_lr dion_momentum dion_rank_fraction dion_rank_multiple_of
        qgalore_rank qgalore_update_proj_gap qgalore_scale qgalore_proj_type qgalore_proj_quant
        qgalore_proj_bits qgalore_proj_group_size qgalore_cos_threshold qgalore_gamma_proj
        qgalore_queue_size max_grad_norm num_epochs jagged_restart_steps jagged_restart_warmup_steps
        jagged_restart_anneal_steps
        """
    ),
    "peft.py: LoraConfig, ReLoRAConfig": _keys(
        """
        load_in_8bit load_in_4bit adapter lora_model_dir lora_r lora_alpha lora_fan_in_fan_out
        lora_target_modules lora_target_parameters lora_target_linear lora_modules_to_save lora_dropout
        peft_layers_to_transform peft_layers_pattern peft peft_use_dora peft_use_rslora
        peft_layer_replication peft_init_lora_weights peft_trainable_token_indices peft_ensure_weight_tying
        peft_autocast_adapter_dtype qlora_sharded_model_loading lora_on_cpu gptq bnb_config_kwargs
        loraplus_lr_ratio loraplus_lr_embedding merge_lora merge_method relora relora_prune_ratio
        relora_prune_method relora_cpu_offload
        """
    ),
    "integrations.py, multimodal.py, deprecated.py (RemappedParameters by alias)": _keys(
        """
        max_packed_sequence_len rope_scaling noisy_embedding_alpha dpo_beta evaluation_strategy
        eval_table_size eval_max_new_tokens dpo_use_logits_to_keep dpo_generate_during_eval dpo_norm_loss
        rpo_alpha s2_attention flash_attn_rms_norm model_config model_kwargs model_type model_revision
        use_mlflow mlflow_tracking_uri mlflow_experiment_name mlflow_run_name hf_mlflow_log_artifacts
        lisa_n_layers lisa_step_interval lisa_layers_attribute use_wandb wandb_name wandb_run_id wandb_mode
        wandb_project wandb_entity wandb_watch wandb_log_model use_comet comet_api_key comet_workspace
        comet_project_name comet_experiment_key comet_mode comet_online comet_experiment_config gradio_title
        gradio_share gradio_server_name gradio_server_port gradio_max_new_tokens gradio_temperature use_ray
        ray_run_name ray_num_workers resources_per_worker use_otel_metrics otel_metrics_host
        otel_metrics_port use_trackio trackio_project_name trackio_run_name trackio_space_id image_size
        image_resize_algorithm
        """
    ),
    "older releases' config.py (removed since, still common in user configs)": _keys(
        """
        flash_attn_fuse_qkv unsloth_cross_entropy_loss unsloth_lora_mlp unsloth_lora_qkv unsloth_lora_o
        unsloth_rms_norm unsloth_rope fsdp diffusion
        """
    ),
    "integrations/kd/args.py: KDArgs, current and older versions (plugin)": _keys(
        """
        kd_trainer kd_ce_alpha kd_alpha kd_temperature kd_beta kd_normalize_topk kd_online_server_base_url
        kd_online_topk kd_online_server kd_online_server_model kd_online_timeout kd_online_max_new_tokens
        kd_temperature_min kd_zscore_base_temp kd_top_k_before_softmax
        """
    ),
    "integrations/cut_cross_entropy/args.py, integrations/liger/args.py (plugins)": _keys(
        """
        cut_cross_entropy cut_cross_entropy_accum_c_fp32 cut_cross_entropy_c_grad_chunk_size liger_rope
        liger_rms_norm liger_rms_norm_gated liger_layer_norm liger_swiglu liger_glu_activation
        liger_cross_entropy liger_fused_linear_cross_entropy liger_use_token_scaling
        """
    ),
    "model.py, peft.py, multimodal.py at 067b021c (added since 1e3ddf72)": _keys(
        """
        processor_kwargs use_onebitllms lora_rank_pattern lora_alpha_pattern role_boundaries
        """
    ),
    "integrations/kernels/args.py: KernelsArgs (plugin)": _keys(
        """
        expert_backend nonexpert_quantization moe_grouped_backend moe_dequant_chunk_size moe_bnb_fast
        use_scattermoe use_sonicmoe use_dsv4_kernels use_glm_dsa_kernels dsv4_fp8_nonexpert_mode
        dsv4_fp8_lora_kernel dsv4_shared_mlp_lora_kernel dsv4_bf16_all dsv4_fp4_grouped_mode
        gemma4_fp8_nonexpert gemma4_nf4_nonexpert nvfp4_merge_aware nvfp4_merge_aware_start_step
        """
    ),
    "integrations/*/args.py: the other plugins (swanlab, lm_eval, llm_compressor, spectrum, grokfast, "
    "mora, densemixer, expert_parallel, hatchery, nemo_gym)": _keys(
        """
        use_swanlab swanlab_project swanlab_experiment_name swanlab_description swanlab_mode
        swanlab_workspace swanlab_api_key swanlab_log_model swanlab_web_host swanlab_api_host
        swanlab_lark_webhook_url swanlab_lark_secret swanlab_log_completions swanlab_completion_log_interval
        swanlab_completion_max_buffer lm_eval_tasks lm_eval_batch_size lm_eval_post_train lm_eval_model
        llmcompressor spectrum_top_fraction spectrum_model_name grokfast_alpha grokfast_lamb mora
        dense_mixer expert_parallel_size expert_parallel_backend expert_parallel_num_nvl_bytes
        expert_parallel_num_rdma_bytes expert_parallel_token_capacity expert_parallel_fallback_on_unsupported
        hatchery nemo_gym_enabled nemo_gym_dir nemo_gym_auto_clone nemo_gym_config_paths nemo_gym_head_port
        nemo_gym_server_timeout nemo_gym_verify_timeout nemo_gym_run_timeout nemo_gym_datasets
        nemo_gym_auto_start nemo_gym_model_name nemo_gym_multi_turn nemo_gym_max_turns
        """
    ),
}

AXOLOTL_KEYS: frozenset[str] = frozenset(k for keys in AXOLOTL_KEYS_BY_SOURCE.values() for k in keys)

# Keys of one ``datasets:`` / ``test_datasets:`` entry (datasets.py: SFTDataset, DPODataset, KTODataset,
# StepwiseSupervisedDataset, PretrainingDataset, SyntheticDataset).
AXOLOTL_DATASET_KEYS: frozenset[str] = frozenset(
    _keys(
        """
        path split type input_transform shards shards_idx preprocess_shards conversation chat_template
        chat_template_jinja data_files input_format name ds_type field field_human field_model
        field_messages field_tools field_thinking template_thinking_key message_field_role
        message_field_content message_property_mappings message_field_training message_field_training_detail
        split_thinking logprobs_field temperature roles_to_train train_on_eos train_on_eot roles
        drop_system_message field_chosen field_rejected
        trust_remote_code revision text_column skip step_separator max_completion_length
        train_on_last_step_only length sequence_length min_input_id max_input_id seed
        """
    )
)

# Keys of the nested ``trl:`` section (schemas/trl.py: TRLConfig).
AXOLOTL_TRL_KEYS: frozenset[str] = frozenset(
    _keys(
        """
        beta max_completion_length use_vllm vllm_mode vllm_server_host vllm_server_port vllm_server_timeout
        vllm_guided_decoding_regex reward_funcs reward_weights generation_batch_size num_generations
        log_completions num_completions_to_print importance_sampling_level sync_ref_model
        ref_model_mixup_alpha ref_model_sync_steps scale_rewards temperature top_p top_k min_p
        repetition_penalty generation_kwargs chat_template_kwargs num_iterations epsilon epsilon_high
        use_liger_loss loss_type mask_truncated_completions vllm_enable_sleep_mode rollout_func
        multi_objective_aggregation use_data_producer async_prefetch prefetch_depth vllm_sync_interval
        streaming_partial_batch streaming_min_groups vllm_importance_sampling_correction
        vllm_importance_sampling_mode vllm_importance_sampling_cap off_policy_mask_threshold
        use_bias_correction_kl reward_num_workers replay_buffer_size replay_recompute_logps
        reroll_start_fraction reroll_max_groups skip_zero_advantage_batches vllm_lora_sync
        """
    )
)
