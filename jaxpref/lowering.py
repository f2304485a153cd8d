"""``--dry_run --lower_for tpu,cuda``: the config's real train step, lowered for accelerators it is not on.

The step is the one ``python -m jaxpref.train`` runs: the config's objective, LoRA or full model,
reference and teacher companions, its mesh and shardings (on simulated CPU devices when this machine
has fewer), the data pipeline's first micro-batches for shapes. Model and optimizer state are shapes
only (``nnx.eval_shape``): nothing is initialised or read, so a 70B config lowers on a laptop.

Kernels are chosen as on the target platform (``jaxpref.platform.lowering_for``): the fused LM-head
loss is the Pallas kernel (Mosaic on TPU, Triton on GPU) unless ``fused_kernel.impl`` says otherwise,
attention is splash attention on TPU and cuDNN on GPU. A kernel that cannot be built for a platform
is a ``KernelLoweringError`` (exit 2), never a silent fallback. The StableHLO module is what
``jax.export`` produces; XLA compiles it on the target machine.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxpref.batch_keys import KD_TARGETS
from jaxpref.errors import ConfigError

logger = logging.getLogger(__name__)

# custom-call target -> what it is, for the report
KNOWN_TARGETS = {
    "tpu_custom_call": "Pallas Mosaic kernel (TPU)",
    "__gpu$xla.gpu.triton": "Pallas Triton kernel (GPU)",
}
_CUSTOM_CALL = re.compile(r"stablehlo\.custom_call @([\w$.\-]+)\(")
_MOSAIC_NAME = re.compile(r'kernel_name = "([^"]+)"')
_TRITON_NAME = re.compile(r'name = "(\w+)", num_stages')


def parse_platforms(value: str) -> tuple[str, ...]:
    """``"tpu,cuda"`` -> ("tpu", "cuda"); a ConfigError names an unknown platform."""
    names = tuple(p.strip().lower() for p in value.split(",") if p.strip())
    bad = [p for p in names if p not in ("tpu", "cuda")]
    if not names or bad:
        raise ConfigError(f"--lower_for {value!r}: name one or more of tpu, cuda (comma-separated)")
    return tuple(dict.fromkeys(names))


def mesh_devices(cfg: Any, devices: int | None) -> int:
    """Devices the config's mesh needs: ``devices`` if given, else the product of its fixed sizes
    (a -1 axis counts 1), at least 1."""
    if devices:
        return int(devices)
    sizes = cfg.mesh.model_dump() if cfg.mesh is not None else {}
    return math.prod(v for v in sizes.values() if v and v > 0) or 1


def ensure_devices(count: int) -> list[Any]:
    """``count`` devices: the real ones, or simulated CPU devices when there are fewer (only possible
    before JAX has started its backends in this process)."""
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        if jax.device_count() >= count:
            return jax.devices()[:count]
        raise ConfigError(
            f"the mesh needs {count} devices and this process already started JAX with "
            f"{jax.device_count()}; run the lowering in a fresh process (python -m jaxpref.train ... "
            "--dry_run --lower_for ...)."
        )
    jax.config.update("jax_num_cpu_devices", max(count, 1))
    if jax.device_count() < count:  # an accelerator backend with fewer devices than the mesh
        raise ConfigError(
            f"the mesh needs {count} devices; this machine has {jax.device_count()} {jax.default_backend()} "
            "devices. Lower on a CPU-only machine (JAX simulates the devices there) or use --dry_run_devices."
        )
    return jax.devices()[:count]


def abstract_trainer(cfg: Any, mesh: Any) -> tuple[Any, dict[str, jax.ShapeDtypeStruct]]:
    """The config's Trainer with shapes-only state (nothing initialised or read) on ``mesh``, and the
    [accum, micro_batch, ...] shapes of one step's batch from the pipeline's first micro-batches."""
    from flax import nnx

    from jaxpref import lora
    from jaxpref import sharding as shd
    from jaxpref.assembly import build_companions, build_data, build_model, objective_name
    from jaxpref.data import DataSettings, load_tokenizer
    from jaxpref.objectives import build_objective
    from jaxpref.optim import make_optimizer
    from jaxpref.trainer import Trainer

    objective = build_objective(cfg, objective_name(cfg))
    data_settings = DataSettings.from_config(cfg)
    tokenizer = load_tokenizer(data_settings)
    data = build_data(data_settings, tokenizer, objective.data)
    batch = batch_shapes(cfg, objective, data, shd.batch_divisor(mesh))

    def student() -> Any:
        model = build_model(cfg, len(tokenizer), mesh, weights=False)
        if objective.score_head:
            from jaxpref.models.reward import add_score_head

            add_score_head(model, seed=int(cfg.seed) + 2)
        return model

    model = nnx.eval_shape(student)
    companions = nnx.eval_shape(
        lambda: build_companions(cfg, objective.companions, len(tokenizer), mesh, weights=False)
    )
    total_steps = int(cfg.max_steps or 2**31 - 1)
    tx, _ = make_optimizer(cfg, total_steps)
    trainer = Trainer(
        model, objective, tx, mesh=mesh, trainable=lora.trainable_filter(model), rules=cfg.logical_axis_rules,
        seed=cfg.seed, companions=companions,
        step_inputs=objective.schedules(total_steps) if objective.schedules else None,
    )  # fmt: skip
    return trainer, batch


def config_mesh(cfg: Any, devices: int | None = None) -> Any:
    """The config's mesh over ``devices`` devices (default: its fixed sizes), simulated on CPU if need be."""
    from jaxpref import sharding as shd

    count = mesh_devices(cfg, devices)
    return shd.make_mesh(cfg.mesh.model_dump() if cfg.mesh is not None else None, ensure_devices(count))


def lower_train_step(
    cfg: Any, platforms: tuple[str, ...], *, out_dir: str | None = None, devices: int | None = None
) -> dict[str, Any]:
    """Lower the config's train step for each of ``platforms`` ("tpu", "cuda"); returns (and prints)
    per platform the custom calls (kernels) in the module, the device count and the module size, and
    writes ``out_dir/{platform}.mlir`` when ``out_dir`` is given."""
    mesh = config_mesh(cfg, devices)
    trainer, batch = abstract_trainer(cfg, mesh)
    report: dict[str, Any] = {"objective": trainer.objective.name, "devices": mesh.size, "mesh": dict(mesh.shape)}
    report["batch"] = {k: f"{v.dtype}{list(v.shape)}" for k, v in batch.items()}
    for name in platforms:
        exported = trainer.export_train_step(batch, name)
        text = exported.mlir_module()
        report[name] = describe_module(text, exported.nr_devices)
        if out_dir:
            path = Path(out_dir)
            path.mkdir(parents=True, exist_ok=True)
            (path / f"{name}.mlir").write_text(text)
            report[name]["file"] = str(path / f"{name}.mlir")
    return report


def compiled_memory(cfg: Any, devices: int | None = None) -> dict[str, Any]:
    """The config's train step compiled for this machine from shapes (nothing initialised or read):
    XLA's memory analysis per device, in bytes (``arguments``: parameters, optimizer state, companions,
    the batch; ``temporaries``: everything the step allocates; ``outputs`` not aliased to a donated
    argument) and their ``total``."""
    mesh = config_mesh(cfg, devices)
    trainer, batch = abstract_trainer(cfg, mesh)
    analysis = trainer.compile_train_step(batch).memory_analysis()
    parts = {
        "arguments": int(analysis.argument_size_in_bytes),
        "temporaries": int(analysis.temp_size_in_bytes),
        "outputs": int(analysis.output_size_in_bytes - analysis.alias_size_in_bytes),
    }
    return {"platform": jax.devices()[0].platform, "devices": mesh.size, **parts, "total": sum(parts.values())}


def batch_shapes(cfg: Any, objective: Any, data: Any, divisor: int) -> dict[str, jax.ShapeDtypeStruct]:
    """[accum, micro_batch, ...] shapes of one step's stacked micro-batches, from the pipeline's first
    step (global: one process here). Precomputed reference log-probs (``ref_*`` keys, made by a
    reference pass this lowering does not run) are float32 per row."""
    from jaxpref.trainer import stack_micro_batches, take_micro_batches

    accum = cfg.gradient_accumulation_steps
    if objective.data == "prompts":  # GRPO: the rollout builds the step's micro-batches from a prompt batch
        from jaxpref.grpo_rollout import step_shapes

        prompts = next(iter(data.train_iterator(None)))
        return step_shapes(cfg, int(prompts["prompt_lengths"].max()))
    micro = take_micro_batches(data.train_iterator(None), accum)
    if micro is None:
        raise ConfigError("the training data does not fill one optimizer step; add data or lower the batch")
    stacked = stack_micro_batches(micro)
    rows = next(v.shape[1] for v in stacked.values())
    if rows % divisor:
        raise ConfigError(f"micro_batch_size={rows} must be a multiple of the {divisor} devices on the batch axes")
    out = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in stacked.items()}
    for key in objective.batch_keys:
        if key not in out and key.startswith("ref_"):
            out[key] = jax.ShapeDtypeStruct((accum, rows), np.float32)
    if cfg.kd_online_server_base_url:  # targets a teacher server adds on the way (not asked here)
        time_len, k = out["input_ids"].shape[2], cfg.kd_online_topk
        for key, dtype in zip(KD_TARGETS, (np.int32, np.float32, np.bool_)):
            out[key] = jax.ShapeDtypeStruct((accum, rows, time_len, k), dtype)
    missing = [k for k in objective.batch_keys if k not in out]
    if missing:
        raise ConfigError(f"the {objective.name} objective reads batch keys {missing} the data does not provide")
    return out


def describe_module(text: str, num_devices: int) -> dict[str, Any]:
    """Custom calls (with Pallas kernel names), device count and size of an exported StableHLO module."""
    targets = Counter(_CUSTOM_CALL.findall(text))
    kernels = Counter(_MOSAIC_NAME.findall(text)) + Counter(_TRITON_NAME.findall(text))
    return {
        "devices": num_devices,
        "module_bytes": len(text.encode()),
        "custom_calls": {t: targets[t] for t in sorted(targets)},
        "kernels": {k: kernels[k] for k in sorted(kernels)},
    }
