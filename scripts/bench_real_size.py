"""Benchmark at real sizes: LoRA KD and LoRA DPO steps of the Qwen3-0.6B and Llama-3.2-1B shapes, jaxpref
vs the PyTorch peers (an axolotl-style KD step + peft; TRL ``DPOTrainer`` + peft), on this machine.

The four cells are the four configs of ``configs/real/`` (their LoRA rank, alpha and target modules,
dtypes, remat, sequence_len, micro-batch size and KD/DPO keys are read from the YAML, so the bench and
the shipped configs cannot drift apart):

* KD  (``*_kd_lora.yaml``): one [1, 2048] row, teacher top-32 targets (``bench_kd_step.make_batch``).
  Peer: the axolotl-style KD step of ``scripts/bench_kd_step.py`` (full ``[B, T, V]`` logits, forward KL
  over the teacher's top-k after a full-vocabulary ``log_softmax``), on a peft LoRA model, AdamW over
  the adapters, clip 1.0.
* DPO (``*_dpo_lora.yaml``): one pair, chosen and rejected each 1024 tokens (a 256-token prompt + a
  768-token completion), 2048 tokens per micro-batch. Peer: ``trl.DPOTrainer`` with ``peft_config``
  (reference = the base with the adapter off, as jaxpref's ``rl_adapter_ref_model: false``); the pairs
  go in as text over a one-word-per-id tokenizer (``bench_dpo_step._tokenizer``), so TRL sees the same
  ids (checked on its first batch).

Same weights on both sides: per shape a random-init bfloat16 checkpoint is written once (transformers'
init, from ``configs/models/<shape>/config.json``) and both sides load it. Same dtypes: bfloat16 base
weights and bfloat16 compute (jaxpref ``param_dtype``/``compute_dtype: bfloat16``; PyTorch: the model in
bfloat16 and ``torch.autocast(bfloat16)``, which TRL's ``bf16: true`` default also uses), float32 LoRA
adapters and AdamW state on both (peft's ``autocast_adapter_dtype``). Activation checkpointing on both
(jaxpref ``gradient_checkpointing: true``; transformers ``gradient_checkpointing_enable``).

Each (cell, implementation) runs in its own fresh subprocess, one after the other (``bench_kd_step``'s
``run_worker``, with its malloc settings); peak memory is the process's peak RSS (``ru_maxrss``: for JAX
on CPU all of its memory). jaxpref also reports the compiled train step's XLA memory analysis (arguments,
outputs, temporaries) and its compile time. The markdown table is rewritten to ``--out`` after every
worker, so a long run can be read while it grows; ``--previous`` puts an earlier run's rows (its ``--json``) first.
On a shared machine the load moves wall-clock times (PyTorch's most: its OpenMP threads spin when oversubscribed),
so every row records CPU seconds and the load average too.

  nice -n 19 python scripts/bench_real_size.py --out /tmp/real_size_results.md
  nice -n 19 python scripts/bench_real_size.py --cells qwen3-0.6b-kd --impls jaxpref --steps 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dpo_step as dpo  # noqa: E402  (pairs, pair batch, word-level tokenizer)
import bench_kd_step as kd  # noqa: E402  (KD batch, fresh-process worker runner, machine line)

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"qwen3-0.6b": "Qwen3-0.6B", "llama3.2-1b": "Llama-3.2-1B"}  # name: configs/models/<dir>
# cell: (shape, objective, YAML in configs/real)
CELLS = {
    "qwen3-0.6b-kd": ("qwen3-0.6b", "kd", "qwen3_0.6b_kd_lora.yaml"),
    "qwen3-0.6b-dpo": ("qwen3-0.6b", "dpo", "qwen3_0.6b_dpo_lora.yaml"),
    "llama3.2-1b-kd": ("llama3.2-1b", "kd", "llama3.2_1b_kd_lora.yaml"),
    "llama3.2-1b-dpo": ("llama3.2-1b", "dpo", "llama3.2_1b_dpo_lora.yaml"),
}
PEER = {"kd": "torch", "dpo": "trl"}  # the PyTorch implementation each objective is compared with
PEER_LABEL = {"torch": "PyTorch KD + peft", "trl": "TRL DPOTrainer + peft"}
DPO_PROMPT = 256  # prompt tokens of the DPO pair (of sequence_len per side)
# The YAML keys that define the step (everything else, data and run keys, is the bench's own).
STEP_KEYS = (
    "param_dtype", "compute_dtype", "gradient_checkpointing", "remat_policy", "adapter", "lora_r", "lora_alpha",
    "lora_dropout", "lora_target_modules", "lora_target_linear", "kd_trainer", "kd_alpha", "kd_ce_alpha",
    "kd_temperature", "rl", "rl_beta", "rl_adapter_ref_model", "sequence_len", "micro_batch_size",
    "optimizer", "learning_rate", "weight_decay", "max_grad_norm", "seed", "fused_kernel", "attention_impl",
)  # fmt: skip
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # lora_target_linear


def cell_config(cell: str) -> dict:
    """The step's keys of the cell's YAML (``configs/real/``)."""
    raw = yaml.safe_load((REPO / "configs" / "real" / CELLS[cell][2]).read_text())
    return {k: raw[k] for k in STEP_KEYS if k in raw}


def tokens_per_step(cell: str) -> int:
    c = cell_config(cell)
    sides = 2 if CELLS[cell][1] == "dpo" else 1
    return sides * c["micro_batch_size"] * c["sequence_len"]


def target_modules(c: dict) -> list[str]:
    if c.get("lora_target_linear"):
        return LINEAR
    mods = c["lora_target_modules"]
    return [mods] if isinstance(mods, str) else list(mods)


def peft_config(c: dict):
    from peft import LoraConfig

    return LoraConfig(
        r=c["lora_r"], lora_alpha=c["lora_alpha"], lora_dropout=c.get("lora_dropout", 0.0),
        target_modules=target_modules(c), bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip


def torch_dtype(c: dict):
    import torch

    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[c.get("param_dtype", "float32")]


def kd_batch(c: dict) -> dict[str, np.ndarray]:
    return kd.make_batch(c["micro_batch_size"], c["sequence_len"])


def dpo_pairs(c: dict) -> dict[str, np.ndarray]:
    return dpo.make_pairs(c["micro_batch_size"], c["sequence_len"], DPO_PROMPT)


def rss_now() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def result(args, times: list[float], cpu: list[float], losses: list[float], extra: dict) -> dict:
    """``bench_dpo_step.step_result`` for the cell ``args.config``, with the load average."""
    extra = {"load_avg": os.getloadavg()[0], **extra}
    return dpo.step_result(args, tokens_per_step(args.config), times, cpu, losses, extra)


# ---------------------------------------------------------------------------------------------------------
# Workers (each in its own process).


def _prepare(model_dir: str, shape: str) -> dict:
    """A random-init bfloat16 checkpoint of the shape (transformers' init, seed 0) for both sides."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(REPO / "configs" / "models" / SHAPES[shape])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    return {"params": sum(p.numel() for p in model.parameters())}


def _torch_kd_worker(args: argparse.Namespace) -> dict:
    """The axolotl-style KD step of bench_kd_step.py on a peft LoRA model (bfloat16 autocast, remat)."""
    import torch
    import torch.nn.functional as F
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    c = cell_config(args.config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch_dtype(c), attn_implementation="sdpa")
    if c.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, peft_config(c))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=c["learning_rate"], weight_decay=c.get("weight_decay", 0.0))
    b = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in kd_batch(c).items()}
    temperature, ce_alpha, kd_alpha = c.get("kd_temperature", 1.0), c.get("kd_ce_alpha", 0.0), c.get("kd_alpha", 1.0)
    ce_labels = torch.where(b["loss_mask"], b["labels"].long(), torch.full_like(b["labels"].long(), -100))
    target_ids, mask = b["target_token_ids"].long(), b["target_mask"].float()
    autocast = c.get("compute_dtype") == "bfloat16"

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=b["input_ids"].long(), position_ids=b["positions"].long()).logits  # [B, T, V]
        num_items = float(b["loss_mask"].sum())
        student_lp = torch.log_softmax(logits.float() / temperature, dim=-1)
        student_topk = torch.gather(student_lp, -1, target_ids)
        teacher_lp = b["target_logprobs"].float()
        loss = kd_alpha * (teacher_lp.exp() * (teacher_lp - student_topk) * mask).sum() * temperature**2 / num_items
        if ce_alpha:
            vocab = logits.shape[-1]
            ce = F.cross_entropy(logits.float().view(-1, vocab), ce_labels.view(-1), reduction="sum") / num_items
            loss = loss + ce_alpha * ce
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, c.get("max_grad_norm", 1.0))
        opt.step()
        return float(loss.detach())

    rss_setup = rss_now()
    losses, times, cpu = [], [], []
    for i in range(args.warmup + args.steps):
        c0, t0 = time.process_time(), time.perf_counter()
        losses.append(step())
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    extra = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "rss_after_setup_bytes": rss_setup,
        "trainable_params": sum(p.numel() for p in trainable),
    }  # fmt: skip
    return result(args, times, cpu, losses, extra)


def _trl_dpo_worker(args: argparse.Namespace) -> dict:
    """TRL's DPOTrainer with a peft_config (reference = adapter off), timed by a step callback."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    c = cell_config(args.config)
    torch.manual_seed(0)
    pairs, seq_len = c["micro_batch_size"], c["sequence_len"]
    ids = dpo_pairs(c)
    total = args.warmup + args.steps
    rows = [
        {"prompt": dpo._text(ids["prompt"][i]), "chosen": " " + dpo._text(ids["chosen"][i][:-1]),
         "rejected": " " + dpo._text(ids["rejected"][i][:-1])}
        for i in range(pairs)
    ] * total  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch_dtype(c), attn_implementation="sdpa")
    cfg = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_real_trl_"),
        per_device_train_batch_size=pairs,
        max_length=seq_len,
        learning_rate=c["learning_rate"],
        lr_scheduler_type="constant",
        weight_decay=c.get("weight_decay", 0.0),
        max_grad_norm=c.get("max_grad_norm", 1.0),
        beta=c.get("rl_beta", 0.1),
        gradient_checkpointing=bool(c.get("gradient_checkpointing")),
        bf16=c.get("compute_dtype") == "bfloat16",
        max_steps=total,
        **dpo.TRL_RUN_SETTINGS,
    )
    timer, marks = dpo.step_timer()

    trainer = DPOTrainer(
        model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=dpo._tokenizer(),
        peft_config=peft_config(c), callbacks=[timer],
    )  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    seen = list(batch["input_ids"].shape)
    if seen != [2 * pairs, seq_len]:
        raise SystemExit(f"TRL batch has shape {seen}, expected {[2 * pairs, seq_len]}: the token round trip is off")
    rss_setup = rss_now()
    trainer.train()
    times, cpu = marks["times"][args.warmup :], marks["cpu"][args.warmup :]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    extra = {
        "torch": torch.__version__, "trl_batch_shape": seen, "rss_after_setup_bytes": rss_setup,
        "trainable_params": trainable,
    }  # fmt: skip
    return result(args, times, cpu, marks["losses"], extra)


def _jax_worker(args: argparse.Namespace) -> dict:
    """jaxpref's training path: validated config, build_model (+ LoRA), objective, Trainer.train_step."""
    import jax
    import jax.numpy as jnp

    from jaxpref import lora
    from jaxpref import sharding as shd
    from jaxpref.assembly import build_companions, build_model
    from jaxpref.config import validate_config
    from jaxpref.objectives import build_objective
    from jaxpref.optim import make_optimizer
    from jaxpref.trainer import Trainer, stack_micro_batches

    objective_name = CELLS[args.config][1]
    c = cell_config(args.config)
    raw = {
        **c,
        "base_model": args.model_dir,
        "lr_scheduler": "constant",
        "max_steps": args.warmup + args.steps,
        "output_dir": tempfile.mkdtemp(prefix="bench_real_out_"),
    }
    raw.update(kd.parse_set(args.set))
    cfg = validate_config(raw, require_datasets=False)
    objective = build_objective(cfg, objective_name)
    mesh = shd.make_mesh(None)
    t0 = time.perf_counter()
    model = build_model(cfg, kd.VOCAB, mesh)
    companions = build_companions(cfg, objective.companions, kd.VOCAB, mesh)
    tx, _ = make_optimizer(cfg, cfg.max_steps)
    trainer = Trainer(
        model, objective, tx, mesh=mesh, trainable=lora.trainable_filter(model), rules=cfg.logical_axis_rules,
        seed=cfg.seed, companions=companions,
    )  # fmt: skip
    del model, companions
    load_s = time.perf_counter() - t0
    rss_setup = rss_now()
    mb = kd_batch(c) if objective_name == "kd" else dpo.jaxpref_batch(dpo_pairs(c))

    # Compile ahead of time for the XLA memory analysis; the first train_step reuses the executable.
    extra: dict = {"jax": jax.__version__, "load_s": load_s, "rss_after_setup_bytes": rss_setup}
    try:
        batch = shd.global_batch(stack_micro_batches([mb]), trainer.mesh, leading_dims=1)
        t0 = time.perf_counter()
        compiled = trainer._train_step.lower(
            trainer.params, trainer.frozen, trainer.companions, trainer.opt_state, batch, jnp.int32(trainer.step)
        ).compile()
        extra["compile_s"] = time.perf_counter() - t0
        m = compiled.memory_analysis()
        extra["xla"] = {
            "argument_bytes": m.argument_size_in_bytes,
            "output_bytes": m.output_size_in_bytes,
            "alias_bytes": m.alias_size_in_bytes,
            "temp_bytes": m.temp_size_in_bytes,
        }
        del compiled, batch
    except Exception as exc:  # noqa: BLE001  (a changed Trainer internals only loses the analysis)
        extra["xla_error"] = f"{type(exc).__name__}: {exc}"[:300]
    extra["rss_after_compile_bytes"] = rss_now()

    losses, times, cpu = [], [], []
    for i in range(args.warmup + args.steps):
        c0, t0 = time.process_time(), time.perf_counter()
        losses.append(trainer.train_step([mb])["loss"])
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        else:
            extra.setdefault("warmup_s", []).append(time.perf_counter() - t0)
    n_train, n_frozen = trainer.num_params()
    extra |= {"trainable_params": n_train, "frozen_params": n_frozen, "remat_policy": cfg.remat_policy}
    return result(args, times, cpu, losses, extra)


# ---------------------------------------------------------------------------------------------------------
# Driver.

GIB = 1024**3


def table(results: list[dict]) -> str:
    headers = [
        "config", "impl", "tokens/step", "s/step", "CPU s/step", "tokens/s", "peak RSS (GiB)",
        "tokens/s vs peer (goal >= 1.0x)", "same in CPU time", "memory vs peer (goal <= 0.5x)",
    ]  # fmt: skip
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    peers = {
        r["config"]: r for r in results if r["impl"] == PEER[CELLS[r["config"]][1]] and "error" not in r
    }  # fmt: skip
    for r in results:
        impl = PEER_LABEL.get(r["impl"], r["impl"])
        if "error" in r:
            lines.append(f"| {r['config']} | {impl} | failed: {r['error'][:160]} |" + " |" * (len(headers) - 3))
            continue
        peer = peers.get(r["config"]) if r["impl"] == "jaxpref" else None
        speed = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if peer else "-"
        cpu = f"{peer['median_cpu_s'] / r['median_cpu_s']:.2f}x" if peer else "-"
        mem = f"{r['peak_rss_bytes'] / peer['peak_rss_bytes']:.2f}x" if peer else "-"
        cells = [
            r["config"], impl, f"{r['tokens_per_step']:,}", f"{r['median_step_s']:.1f}", f"{r['median_cpu_s']:.1f}",
            f"{r['tokens_per_s']:.1f}", f"{r['peak_rss_bytes'] / GIB:.2f}", speed, cpu, mem,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def details(results: list[dict]) -> list[str]:
    """Per worker: setup RSS, step times, first losses, and jaxpref's compiled memory analysis."""
    out = []
    for r in results:
        if "error" in r:
            continue
        line = (
            f"- {r['config']} / {r['impl']}: steps {', '.join(f'{t:.1f}' for t in r['times_s'])} s "
            f"(CPU {', '.join(f'{t:.1f}' for t in r['cpu_s'])} s), RSS after setup "
            f"{r.get('rss_after_setup_bytes', 0) / GIB:.2f} GiB, load average {r['load_avg']:.1f}, losses "
            f"{', '.join(f'{x:.4f}' for x in r['losses'])}, {r.get('trainable_params', 0):,} trainable"
        )
        if "xla" in r:
            x = r["xla"]
            line += (
                f"; XLA step: arguments {x['argument_bytes'] / GIB:.2f} GiB, temporaries {x['temp_bytes'] / GIB:.2f} "
                f"GiB, outputs {x['output_bytes'] / GIB:.2f} GiB (aliased {x['alias_bytes'] / GIB:.2f}); compile "
                f"{r.get('compile_s', 0):.0f} s, first step {r.get('warmup_s', [0])[0]:.1f} s"
            )
        elif "xla_error" in r:
            line += f"; no XLA memory analysis ({r['xla_error']})"
        out.append(line)
    return out


def render(results: list[dict], args: argparse.Namespace, load_start: float) -> str:
    text = [
        f"Machine: {kd.machine()}; load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} now "
        "(the machine is shared: compare CPU s/step when the load is high).",
        "bfloat16 base weights and compute on both sides, float32 LoRA adapters and AdamW state; LoRA and "
        "step settings from configs/real/*.yaml (rank 16, alpha 32, q/k/v/o/gate/up/down); activation "
        "checkpointing on both; KD = 1 x 2048 tokens, teacher top-32; DPO = 1 pair, 1024 tokens per side "
        f"(prompt {DPO_PROMPT}), reference = base with the adapter off. Median of {args.steps} timed steps "
        f"after {args.warmup} warm-up step(s); peak RSS of each fresh process; malloc: {kd.malloc_note(args.malloc)}.",
        "",
        table(results),
        "",
        *details(results),
    ]
    return "\n".join(text) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated, from {list(CELLS)}")
    p.add_argument("--impls", default="peer,jaxpref", help="peer (PyTorch KD / TRL DPO) and/or jaxpref")
    p.add_argument("--steps", type=int, default=2, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation, allocator warm-up)")
    p.add_argument("--set", action="append", help="extra jaxpref config key=value (e.g. remat_policy=dots)")
    p.add_argument("--model-root", default=None, help="keep the random-init checkpoints here (reused when present)")
    p.add_argument("--out", default=None, help="markdown table, rewritten after every worker")
    p.add_argument("--json", default=None, help="raw results, rewritten after every worker")
    p.add_argument("--previous", default=None, help="a --json file of an earlier run: its rows come first")
    p.add_argument("--malloc", default="as-shipped", choices=["as-shipped", "tuned", "default"], help="bench_kd_step's")
    p.add_argument("--worker", default=None, choices=["prepare", "torch", "trl", "jaxpref"], help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.impl = args.worker
        if args.worker == "prepare":
            out = _prepare(args.model_dir, CELLS[args.config][0])
        else:
            out = {"torch": _torch_kd_worker, "trl": _trl_dpo_worker, "jaxpref": _jax_worker}[args.worker](args)
        print(json.dumps(out))
        return

    load_start = os.getloadavg()[0]
    results: list[dict] = json.loads(Path(args.previous).read_text())["results"] if args.previous else []
    root = Path(args.model_root) if args.model_root else Path(tempfile.mkdtemp(prefix="bench_real_"))
    for cell in args.cells.split(","):
        shape, objective, _ = CELLS[cell]
        model_dir = root / shape
        if not (model_dir / "config.json").exists():
            print(f"writing the {shape} checkpoint to {model_dir} ...", file=sys.stderr, flush=True)
            prep = kd.run_worker(__file__, "prepare", cell, str(model_dir), args)
            if "error" in prep:
                sys.exit(f"could not write the {shape} checkpoint: {prep['error']}")
        for impl in args.impls.split(","):
            mode = PEER[objective] if impl == "peer" else impl
            print(f"running {cell} / {mode} ...", file=sys.stderr, flush=True)
            out = kd.run_worker(__file__, mode, cell, str(model_dir), args)
            results.append(out)
            print(f"  {json.dumps({k: v for k, v in out.items() if k != 'losses'})}", file=sys.stderr, flush=True)
            text = render(results, args, load_start)
            if args.out:
                Path(args.out).write_text(text)
            if args.json:
                Path(args.json).write_text(json.dumps({"machine": kd.machine(), "results": results}, indent=1))
    print("\n" + render(results, args, load_start))


if __name__ == "__main__":
    main()
