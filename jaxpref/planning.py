"""The ``--dry_run`` plan: a config's per-device memory and step count, without weights or data.

Parameters, optimizer state, gradients and companions are exact shard sizes of ``eval_shape``'d state
under the logical-axis rules; activations and the fused loss's working set follow ``jaxpref.memory``.
``jaxpref.lowering.compiled_memory`` is the exact figure for the machine the plan runs on.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpref import lora, memory, models, precision
from jaxpref import sharding as shd
from jaxpref.assembly import DTYPES, lora_config, objective_name, quantization, remat_policy
from jaxpref.errors import ConfigError
from jaxpref.models.nf4 import NF4Weight, parameter_count
from jaxpref.objectives import build_objective
from jaxpref.optim import make_optimizer


def memory_plan(cfg: Any, *, devices: int | None = None, processes: int | None = None) -> dict[str, Any]:
    """Validate the config and report sizes per device for the configured mesh, without weights or data.

    ``devices`` / ``processes``: the machine to plan for (default: the mesh's fixed sizes, else the
    devices of this machine; one process). Parameters, optimizer state and gradients are shard sizes
    of ``eval_shape``'d state under the logical-axis rules; activations follow the formula in
    ``jaxpref.memory`` (docs/scaling.md).
    """
    objective = build_objective(cfg, objective_name(cfg))
    sizes = cfg.mesh.model_dump() if cfg.mesh is not None else {}
    if devices is None:
        fixed = [v for v in sizes.values() if v is not None]
        devices = math.prod(fixed) if fixed and -1 not in fixed else jax.device_count()
    processes = processes or jax.process_count()
    mesh = shd.abstract_mesh(sizes, devices)
    divisor = shd.batch_divisor(mesh)
    if (cfg.micro_batch_size * processes) % divisor:
        raise ConfigError(
            f"micro_batch_size={cfg.micro_batch_size} x {processes} process(es) must be a multiple of the "
            f"{divisor} devices on the mesh's data and fsdp axes."
        )
    rules = cfg.logical_axis_rules
    mcfg = models.load_model_config(cfg.base_model_config or cfg.base_model)
    kwargs = dict(
        dtype=DTYPES[cfg.compute_dtype],
        param_dtype=DTYPES[cfg.param_dtype],
        scan_layers=cfg.scan_layers,
        quantization=quantization(cfg),
    )

    def student() -> Any:
        model = models.from_config(mcfg, seed=0, **kwargs)
        if cfg.adapter == "lora":
            lora.apply_lora(model, lora_config(cfg), rngs=nnx.Rngs(0))
        return model

    abstract = nnx.eval_shape(student)
    trainable = nnx.state(abstract, lora.trainable_filter(abstract))
    params = nnx.state(abstract, nnx.Any(nnx.Param, NF4Weight))  # load_in_4bit: the NF4 arrays, by their bytes
    quantized = nnx.state(abstract, NF4Weight)
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
    total_steps = int(cfg.max_steps) if cfg.max_steps else None
    tx, _ = make_optimizer(cfg, total_steps or 2**31 - 1)  # only the state's shapes are used (no warmup warning)
    opt_state = jax.eval_shape(lambda p: precision.init_optimizer_state(tx, p), trainable)
    # one micro-batch's gradients keep the parameters' dtype; accumulation sums them in float32
    accumulates = cfg.gradient_accumulation_steps > 1
    grads = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32 if accumulates else x.dtype), trainable)

    companion_bytes = 0
    for name in objective.companions:
        if name == "teacher":
            tdtype = DTYPES[cfg.kd_teacher_dtype or cfg.param_dtype]
            tcfg = models.load_model_config(cfg.kd_teacher_model)
            other = nnx.eval_shape(lambda c=tcfg, d=tdtype: models.from_config(c, seed=0, param_dtype=d))
        else:  # "reference": a frozen copy of the base model
            other = nnx.eval_shape(lambda: models.from_config(mcfg, seed=0, **kwargs))
        companion_bytes += shd.per_device_bytes(nnx.state(other, lora.BASE_PARAMS), mesh, rules)

    sides = 2 if objective.data == "preference" else 1  # chosen + rejected in one forward pass
    shapes = dict(
        rows_per_device=cfg.micro_batch_size * processes / divisor * sides,
        sequence_len=cfg.sequence_len,
        hidden_size=mcfg.hidden_size,
        intermediate_size=mcfg.intermediate_size,
        num_layers=mcfg.num_hidden_layers,
        num_heads=mcfg.num_attention_heads,
        num_kv_heads=mcfg.num_key_value_heads,
        head_dim=mcfg.head_dim,
        tensor=mesh.shape["tensor"],
        remat_policy=remat_policy(cfg),
        compute_bytes=jnp.dtype(DTYPES[cfg.compute_dtype]).itemsize,
        extra_norms=2 if mcfg.sandwich_norms else 0,
        split_qkv=not mcfg.fused_projections,
    )
    # Only XLA attention keeps the [heads, T, T] probabilities; the default kernels (blocked on CPU, splash
    # on TPU, cuDNN on GPU in bfloat16) do not. XLA is what attention_impl auto falls back to on a GPU
    # for float32 compute or head_dim > 128: that case is reported beside.
    xla = memory.activation_bytes(**shapes, xla_attention=True)
    act = xla if cfg.attention_impl == "xla" else memory.activation_bytes(**shapes, xla_attention=False)
    loss = memory.loss_bytes(tokens=act.tokens_per_device, hidden_size=mcfg.hidden_size, vocab_size=mcfg.vocab_size)
    parts = {
        "params": shd.per_device_bytes(params, mesh, rules),
        "optimizer": shd.per_device_bytes(opt_state, mesh, rules, like=trainable),
        "gradients": shd.per_device_bytes(grads, mesh, rules),
        "activations": act.bytes,
        "loss": loss,
        "companions": companion_bytes,
    }
    if total_steps is not None:
        steps: int | str = total_steps
    else:
        steps = (
            "unknown before the data is read: num_epochs x micro-batches per epoch / gradient_accumulation_steps, "
            "and the micro-batches per epoch depend on tokenization and packing. Set max_steps, or run "
            "python -m jaxpref.preprocess for the row and token counts."
        )
    report = {
        "objective": objective.name,
        "parameters": parameter_count(nnx.state(abstract)),
        "trainable_parameters": count(trainable),
        "quantized_param_bytes_per_device": shd.per_device_bytes(quantized, mesh, rules),
        "devices": devices,
        "processes": processes,
        "mesh": dict(mesh.shape),
        "param_bytes_per_device": parts["params"],
        "optimizer_bytes_per_device": parts["optimizer"],
        "gradient_bytes_per_device": parts["gradients"],
        "activation_bytes_per_device": parts["activations"],
        "activation_bytes_per_device_xla_attention": xla.bytes,  # attention_impl xla, or GPU float32 auto
        "loss_bytes_per_device": parts["loss"],
        "companion_bytes_per_device": parts["companions"],
        "total_bytes_per_device": sum(parts.values()),
        "per_device": {k: v["human"] for k, v in memory.summarize(parts).items()},
        "activations": {
            "remat_policy": remat_policy(cfg),
            "rows_per_device": act.rows_per_device,
            "tokens_per_device": act.tokens_per_device,
            "attention_impl": cfg.attention_impl,
            "kept_per_token_and_layer": f"{act.elements_per_token_layer:g} x {cfg.compute_dtype}"
            + f" + {act.attention_bytes_per_token_layer:g} B of attention probabilities",
            "formula": "tokens x (layers x kept + one recomputed layer + hidden) x bytes (docs/scaling.md)",
        },
        "steps": steps,
    }
    return report
