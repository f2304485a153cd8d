"""Measure the bfloat16-parameter policy (jaxpref/precision.py): training quality and memory.

Quality: the same run under several precision policies, held-out metrics at the same steps.

* ``kd``: the KD demo student (configs/kd.yaml shortened as tests/trainer/test_kd_demo.py: 100 steps of
  8 x 128 packed tokens over the first 500 rows, learning rate 3e-3 from random init); held-out KL
  to the teacher, CE, top-1 agreement on demo/data/kd_eval.
* ``finetune``: SFT of the trained demo/teacher (a real checkpoint, stored in bfloat16) on its own task
  rows at a fine-tuning learning rate (2e-5, constant, 100 steps of 8 x 256 packed tokens); held-out
  CE on demo/data/kd_tasks_eval.jsonl. Adam moves a weight by about the learning rate per step, far
  below half a bfloat16 ulp of weights of size 1e-2, which is where rounding matters.

Policies: ``f32`` (float32 parameters and compute), ``f32+bf16`` (float32 parameters, bfloat16 compute:
axolotl's ``bf16: true``), ``bf16`` (bfloat16 parameters and compute, float32 moments, stochastic
rounding: jaxpref's ``bfloat16: true``), ``bf16-nearest`` (the same, rounding to nearest),
``bf16-pure`` (bfloat16 moments too, everything rounded to nearest: PyTorch's AdamW on a bfloat16 model,
what axolotl's ``bfloat16: true`` runs).

Memory: bytes of the compiled train step (XLA's memory analysis: arguments = parameters, optimizer
state, batch; temporaries = activations and gradients) for a 125M-parameter Llama under each
parameter dtype, full fine-tuning and LoRA; and the ``--dry_run`` plan of Llama-3.2-1B and an 8B model.

  python scripts/bench_bf16_params.py --seeds 0 1       # everything: 20 minutes on 2 CPU cores
  python scripts/bench_bf16_params.py --what kd --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
POLICIES = {
    "f32": {"param_dtype": "float32", "compute_dtype": "float32"},
    "f32+bf16": {"param_dtype": "float32", "compute_dtype": "bfloat16"},
    "bf16": {"param_dtype": "bfloat16", "compute_dtype": "bfloat16"},
    "bf16-nearest": {"param_dtype": "bfloat16", "compute_dtype": "bfloat16"},
    "bf16-pure": {"param_dtype": "bfloat16", "compute_dtype": "bfloat16"},
}
STEPS = 100
KD_SHORT = ["sequence_len=128", f"max_steps={STEPS}", "warmup_steps=10", "datasets.0.split=train[:500]"]
FINETUNE = {
    "base_model": "demo/teacher",
    "chat_template": "chatml",
    "datasets": [{"path": "demo/data/kd_tasks_train.jsonl", "type": "chat_template", "field_messages": "messages"}],
    "test_datasets": [
        {
            "path": "demo/data/kd_tasks_eval.jsonl",
            "type": "chat_template",
            "field_messages": "messages",
            "split": "train",
        }
    ],
    "sequence_len": 256,
    "sample_packing": True,
    "micro_batch_size": 8,
    "max_steps": STEPS,
    "learning_rate": 2e-5,
    "lr_scheduler": "constant",
    "optimizer": "adamw_torch",
    "weight_decay": 0.0,
}


def bf16_moments(tx: Any) -> Any:
    """``tx`` with its state stored in bfloat16 (rounded to nearest after every update), as PyTorch's
    AdamW keeps ``exp_avg``/``exp_avg_sq`` in the parameters' dtype."""
    import jax
    import jax.numpy as jnp
    import optax

    def to_bf16(tree: Any) -> Any:
        return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params: Any) -> Any:
        return to_bf16(tx.init(params))

    def update(updates: Any, state: Any, params: Any = None) -> Any:
        state32 = jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
        new_updates, new_state = tx.update(updates, state32, params)
        return new_updates, to_bf16(new_state)

    return optax.GradientTransformation(init, update)


def _config(what: str, policy: str, seed: int, tmp: str) -> Any:
    from jaxpref.config import load_config, validate_config

    dtypes = [f"{k}={v}" for k, v in POLICIES[policy].items()]
    if what == "kd":
        return load_config(
            REPO / "configs" / "kd.yaml",
            [*KD_SHORT, *dtypes, f"seed={seed}", f"output_dir={tmp}/out", f"dataset_prepared_path={tmp}/prepared"],
        )
    raw = {**FINETUNE, **POLICIES[policy], "seed": seed, "output_dir": f"{tmp}/out"}
    raw["base_model"] = str(REPO / raw["base_model"])
    for key in ("datasets", "test_datasets"):
        raw[key] = [{**d, "path": str(REPO / d["path"])} for d in raw[key]]
    return validate_config(raw)


def quality_worker(what: str, policy: str, seed: int) -> dict:
    """Train ``STEPS`` steps under ``policy``; held-out metrics before and after."""
    import jax

    from jaxpref import lora
    from jaxpref import sharding as shd
    from jaxpref.assembly import build_data, build_model, objective_name
    from jaxpref.data import DataSettings, load_tokenizer
    from jaxpref.objectives import build_objective
    from jaxpref.optim import make_optimizer
    from jaxpref.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(what, policy, seed, tmp)
        objective = build_objective(cfg, objective_name(cfg))
        data_settings = DataSettings.from_config(cfg)
        tokenizer = load_tokenizer(data_settings)
        data = build_data(data_settings, tokenizer, objective.data)
        mesh = shd.make_mesh(None)
        model = build_model(cfg, len(tokenizer), mesh)
        tx, _ = make_optimizer(cfg, STEPS)
        if policy == "bf16-pure":
            tx = bf16_moments(tx)
        rounding = "stochastic" if policy in ("f32", "f32+bf16", "bf16") else "nearest"
        trainer = Trainer(
            model, objective, tx, mesh=mesh, trainable=lora.trainable_filter(model), seed=cfg.seed, rounding=rounding
        )
        before = trainer.evaluate(data.eval_batches())
        batches = data.train_iterator(None)
        t0 = time.perf_counter()
        changed = []
        for _ in range(STEPS):
            old = jax.tree.leaves(trainer.params)[0]
            old = jax.device_get(old)
            stats = trainer.train_step([next(batches)])
            assert stats["finite"], stats
            new = jax.device_get(jax.tree.leaves(trainer.params)[0])
            changed.append(float((old != new).mean()))
        seconds = time.perf_counter() - t0
        after = trainer.evaluate(data.eval_batches())
    return {
        "what": what,
        "policy": policy,
        "seed": seed,
        "before": before,
        "after": after,
        "seconds": seconds,
        "fraction_of_first_array_changed_per_step": sum(changed) / len(changed),
    }


def memory_worker(param_dtype: str, adapter: str | None) -> dict:
    """XLA's memory analysis of the compiled train step of a 125M-parameter Llama (8 x 1024 tokens)."""
    import jax
    import numpy as np

    from jaxpref import lora
    from jaxpref import sharding as shd
    from jaxpref.assembly import build_model
    from jaxpref.config import validate_config
    from jaxpref.objectives import build_objective
    from jaxpref.optim import make_optimizer
    from jaxpref.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "config.json").write_text(json.dumps(MEMORY_MODEL))
        raw = {
            "base_model_config": tmp,
            "random_init_weights": True,
            "tokenizer_config": str(REPO / "demo" / "tiny-llama"),
            "learning_rate": 1e-4,
            "max_steps": 10,
            "micro_batch_size": 4,
            "sequence_len": 1024,
            "param_dtype": param_dtype,
            "compute_dtype": "bfloat16",
            "gradient_checkpointing": True,
            "output_dir": f"{tmp}/out",
        }
        if adapter:
            raw.update(adapter="lora", lora_r=16, lora_alpha=32, lora_target_linear=True)
        cfg = validate_config(raw, require_datasets=False)
        objective = build_objective(cfg, "sft")
        mesh = shd.make_mesh(None)
        model = build_model(cfg, MEMORY_MODEL["vocab_size"], mesh)
        tx, _ = make_optimizer(cfg, 10)
        trainer = Trainer(model, objective, tx, mesh=mesh, trainable=lora.trainable_filter(model))
        del model
        b, t = 4, 1024
        ids = np.zeros((1, b, t), np.int32)
        batch = {
            "input_ids": ids,
            "labels": ids,
            "loss_mask": np.ones((1, b, t), bool),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (1, b, t)).copy(),
            "segment_ids": np.ones((1, b, t), np.int32),
        }
        batch = shd.global_batch(batch, mesh, leading_dims=1)
        compiled = trainer._train_step.lower(
            trainer.params, trainer.frozen, trainer.companions, trainer.opt_state, batch, jax.numpy.int32(0)
        ).compile()
        mem = compiled.memory_analysis()
        count = lambda tree: sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
        return {
            "param_dtype": param_dtype,
            "adapter": adapter or "full",
            "trainable_bytes": count(trainer.params),
            "frozen_bytes": count(trainer.frozen),
            "optimizer_bytes": count(trainer.opt_state),
            "argument_bytes": mem.argument_size_in_bytes,
            "temp_bytes": mem.temp_size_in_bytes,
            "output_bytes": mem.output_size_in_bytes,
            "alias_bytes": mem.alias_size_in_bytes,
        }


# A 125M-parameter Llama (GPT-2-small sized, 32k vocabulary).
MEMORY_MODEL = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
}


def plan_worker(param_dtype: str, adapter: str | None) -> dict:
    """The ``--dry_run`` plan of Llama-3.2-1B (shipped config) on one device."""
    import io
    from contextlib import redirect_stdout

    from jaxpref.config import validate_config
    from jaxpref.train import dry_run

    with tempfile.TemporaryDirectory() as tmp:
        raw = {
            "base_model": str(REPO / "configs" / "models" / "Llama-3.2-1B"),
            "random_init_weights": True,
            "tokenizer_config": str(REPO / "demo" / "tiny-llama"),
            "learning_rate": 1e-4,
            "max_steps": 10,
            "micro_batch_size": 1,
            "sequence_len": 4096,
            "param_dtype": param_dtype,
            "compute_dtype": "bfloat16",
            "gradient_checkpointing": True,
            "output_dir": f"{tmp}/out",
            "mesh": {"data": 1},
        }
        if adapter:
            raw.update(adapter="lora", lora_r=16, lora_alpha=32, lora_target_linear=True)
        cfg = validate_config(raw, require_datasets=False)
        with redirect_stdout(io.StringIO()):
            report = dry_run(cfg, devices=1)
    keys = (
        "param_bytes_per_device",
        "optimizer_bytes_per_device",
        "gradient_bytes_per_device",
        "total_bytes_per_device",
    )
    return {"param_dtype": param_dtype, "adapter": adapter or "full", **{k: report[k] for k in keys}}


def _in_subprocess(kind: str, *args: Any) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", kind, *map(str, args)], capture_output=True, text=True, cwd=REPO
    )
    if out.returncode:
        raise SystemExit(f"worker {kind} {args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--what", nargs="*", default=["kd", "finetune", "memory"], choices=["kd", "finetune", "memory"])
    p.add_argument("--policies", nargs="*", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--seeds", nargs="*", type=int, default=[0])
    p.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "quality":
            result = quality_worker(rest[0], rest[1], int(rest[2]))
        elif kind == "memory":
            result = memory_worker(rest[0], None if rest[1] == "full" else rest[1])
        else:
            result = plan_worker(rest[0], None if rest[1] == "full" else rest[1])
        print(json.dumps(result))
        return

    cpu = platform.processor() or platform.machine()
    print(f"machine: {platform.platform()}, {cpu}, python {platform.python_version()}")
    for what in [w for w in args.what if w != "memory"]:
        metric = "kd_loss" if what == "kd" else "loss"
        print(f"\n## {what}: held-out {metric} after {STEPS} steps (each run a fresh process)\n")
        print("| policy | seed | before | after | top-1 / - | changed per step | train s |")
        print("|---|---|---|---|---|---|---|")
        for seed in args.seeds:
            for policy in args.policies:
                r = _in_subprocess("quality", what, policy, seed)
                top1 = r["after"].get("top1_agreement")
                print(
                    f"| {policy} | {seed} | {r['before'][metric]:.4f} | {r['after'][metric]:.4f} | "
                    f"{'' if top1 is None else f'{top1:.3f}'} | {r['fraction_of_first_array_changed_per_step']:.3f} | "
                    f"{r['seconds']:.0f} |",
                    flush=True,
                )
    if "memory" in args.what:
        _size_table(
            "memory: compiled train step, 125M Llama, 4 x 1024 tokens, bf16 compute, remat",
            "memory",
            {
                "trainable": "trainable_bytes",
                "frozen": "frozen_bytes",
                "optimizer": "optimizer_bytes",
                "XLA arguments": "argument_bytes",
                "XLA temporaries": "temp_bytes",
            },
        )
        _size_table(
            "plan: --dry_run of Llama-3.2-1B on one device, 1 x 4096 tokens",
            "plan",
            {
                "parameters": "param_bytes_per_device",
                "optimizer": "optimizer_bytes_per_device",
                "gradients": "gradient_bytes_per_device",
                "total (with activations)": "total_bytes_per_device",
            },
        )


def _size_table(title: str, worker: str, columns: dict[str, str]) -> None:
    """One row per (tuning, parameter dtype) from ``worker``: the ``columns`` (header -> key), in GiB."""
    print(f"\n## {title} (GiB)\n")
    print("| parameters | tuning | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for adapter in ("full", "lora"):
        for dtype in ("float32", "bfloat16"):
            r = _in_subprocess(worker, dtype, adapter)
            print(f"| {dtype} | {adapter} | " + " | ".join(_gib(r[k]) for k in columns.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
