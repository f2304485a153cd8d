"""Device check: jaxpref's fused LM-head loss and its KD / DPO train steps on one GPU, as one markdown table.

Three parts, each in its own subprocess (so a crash or a timeout in one leaves the others' rows, and
each part's peak device memory is its own):

1. ``fused``: ``jaxpref.pallas.linear_lse.api.linear_logsumexp_gather`` with impl "pallas" (Triton on
   GPU, interpret mode on CPU), "xla_chunked" and "reference". Correctness: values (log-sum-exp at two
   temperatures, gathered logits) and gradients (hidden, LM-head weight) of each fused impl against the
   reference, at a ragged "check" size and at the benchmark size. Measurements at the benchmark size
   (default N=8192, H=4096, V=128256, bfloat16): forward+backward time (median of a few runs after a
   warm-up) and compiled temporaries (``memory_analysis().temp_size_in_bytes``).
2. ``kd``: one KD train step (stored teacher top-k targets in the batch) of the Llama-3.2-1B shape
   (``configs/models/Llama-3.2-1B/config.json``, random init, bfloat16 parameters and compute, full
   activation checkpointing) at 8 x 2048 tokens, through jaxpref's training path: a validated config,
   ``build_objective``, ``build_model``, ``make_optimizer``, ``Trainer.train_step``.
3. ``dpo``: the same for DPO (sigmoid, beta 0.1) with a frozen reference copy (``build_companions``) on
   4 pairs = 8 sequences x 2048 tokens.

Train steps report tokens/s, MFU and peak device memory (``memory_stats()['peak_bytes_in_use']``).
Model FLOPs per step (remat recomputation not counted), with P = matmul weights per token
(``model_flops`` below: every decoder projection plus the LM head; the embedding lookup costs none):

    forward = 2 * P * tokens + 2 * L * n_heads * head_dim * T^2 * rows    (causal: half of QK^T and PV)
    KD step  = 3 * forward                       (forward + backward)
    DPO step = 3 * forward + forward             (policy forward + backward, reference forward)
    MFU      = model FLOPs / step time / the chip's dense bfloat16 peak (H100 SXM and H200: 989e12)

  python scripts/device_check.py                 # on the GPU machine (scripts/device_check.sh installs wheels)
  python scripts/device_check.py --smoke         # CPU, toy sizes, every code path, under a minute
  python scripts/device_check.py --parts fused --out table.md

The table goes to stdout and to ``--out`` (default ``$OUT/device_check.md`` when ``$OUT`` is set); the
exit status is 0 when every correctness row passes and every measurement was taken.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dpo_step  # noqa: E402  (the benchmarks' batch layouts)
import bench_kd_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LLAMA_1B = REPO / "configs" / "models" / "Llama-3.2-1B"
PARTS = ("fused", "kd", "dpo")
FUSED_IMPLS = ("reference", "xla_chunked", "pallas")  # timing order: the reference first gives the targets
CHECKED_IMPLS = ("pallas", "xla_chunked")
TEMPERATURES = (1.0, 2.0)  # the fused loss is checked at two temperatures, as KD with T != 1 uses them
# Tolerances on max |x - ref| / max |ref|: forward values are float32 math on the same bfloat16 inputs;
# gradients come back in bfloat16 (relative rounding 2^-9) after float32 sums in another order.
FORWARD_TOL, GRAD_TOL = 1e-3, 3e-2
DPO_LN2_TOL = 0.05  # |step-0 loss - ln 2|: policy = reference, up to bfloat16 differences between the passes
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12))  # dense, per chip
GIB = 2**30
PASS, FAIL, MEASURED, INFO = "pass", "fail", "measured", "info"

SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# The tiny Llama for --smoke: the 1B config with every size shrunk (same rope scaling, tied embeddings).
SMOKE_MODEL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=512, max_position_embeddings=4096,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Plan: every size and count of a run.


@dataclasses.dataclass(frozen=True)
class FusedSizes:
    """Fused-loss problem: hidden [n, h], weight [h, v], ids [n, k]."""

    n: int
    h: int
    v: int
    k: int

    def label(self) -> str:
        return f"N={self.n} H={self.h} V={self.v} K={self.k}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes, repetitions and time limits of one run (``FULL`` on the GPU, ``SMOKE`` on CPU)."""

    smoke: bool
    fused_check: FusedSizes  # ragged sizes (N, V not multiples of any tile), correctness only
    fused_bench: FusedSizes  # correctness, time and temporaries
    fused_reps: int  # timed forward+backward runs (median reported), after one warm-up
    rows: int  # sequences per train step (DPO: chosen + rejected, so rows / 2 pairs)
    seq_len: int
    prompt_len: int  # DPO prompt tokens per sequence
    top_k: int  # KD teacher entries per position
    train_steps: int  # timed train steps (median reported), after the first (compiling) step
    part_timeout_s: dict[str, float]
    budget_s: float  # all parts together

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        d["fused_check"], d["fused_bench"] = FusedSizes(**d["fused_check"]), FusedSizes(**d["fused_bench"])
        return cls(**d)


FULL = Plan(
    smoke=False,
    fused_check=FusedSizes(n=1000, h=576, v=50257, k=32),
    fused_bench=FusedSizes(n=8192, h=4096, v=128256, k=32),
    fused_reps=5,
    rows=8,
    seq_len=2048,
    prompt_len=512,
    top_k=32,
    train_steps=3,
    part_timeout_s={"fused": 200, "kd": 150, "dpo": 170},
    budget_s=420,
)
SMOKE = Plan(
    smoke=True,
    fused_check=FusedSizes(n=40, h=32, v=300, k=5),
    fused_bench=FusedSizes(n=64, h=32, v=512, k=8),
    fused_reps=2,
    rows=2,
    seq_len=32,
    prompt_len=8,
    top_k=8,
    train_steps=1,
    part_timeout_s={"fused": 240, "kd": 240, "dpo": 240},  # generous: a loaded CI machine, not a measurement
    budget_s=600,
)


# ---------------------------------------------------------------------------------------------------------
# Row names: the table's first column. Workers fill them; the driver lists any a part did not fill.


def fused_check_row(impl: str, where: str) -> str:
    return f"fused loss correct: {impl} vs reference, {where} size"


def fused_time_row(impl: str) -> str:
    return f"fused loss fwd+bwd: {impl}"


def expected_rows(part: str) -> list[tuple[str, str]]:
    """(row name, kind) of every row ``part`` writes; kind is "check" (pass/fail) or "measure"."""
    if part == "fused":
        checks = [(fused_check_row(i, w), "check") for w in ("check", "bench") for i in CHECKED_IMPLS]
        return checks + [(fused_time_row(i), "measure") for i in FUSED_IMPLS]
    name = part.upper()
    final = "DPO step-0 loss = ln 2 (policy = reference)" if part == "dpo" else "KD loss and gradient finite"
    return [
        (f"{name} train step", "measure"),
        (final, "check"),
        (f"{name} fused kernel without fallback", "check"),
    ]


# ---------------------------------------------------------------------------------------------------------
# FLOPs and peaks (pure functions: the test checks them without JAX).


def model_dims(config: dict[str, Any]) -> dict[str, int]:
    """Layers L, hidden H, heads, kv heads, head_dim D, intermediate I, vocabulary V of a config.json."""
    heads = config["num_attention_heads"]
    return {
        "layers": config["num_hidden_layers"],
        "hidden": config["hidden_size"],
        "heads": heads,
        "kv_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
        "intermediate": config["intermediate_size"],
        "vocab": config["vocab_size"],
    }


def matmul_params(config: dict[str, Any]) -> int:
    """P: weights multiplied per token: per layer q, k, v, o, gate, up, down, plus the LM head [H, V]."""
    d = model_dims(config)
    h, q, kv = d["hidden"], d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * d["intermediate"]
    return d["layers"] * per_layer + h * d["vocab"]


def model_flops(config: dict[str, Any], rows: int, seq_len: int, *, reference_forward: bool) -> float:
    """Model FLOPs of one train step on ``rows`` x ``seq_len`` tokens (formula in the module docstring)."""
    d = model_dims(config)
    tokens = rows * seq_len
    attention = 2.0 * d["layers"] * d["heads"] * d["head_dim"] * seq_len**2 * rows  # causal half, QK^T + PV
    forward = 2.0 * matmul_params(config) * tokens + attention
    return 3.0 * forward + (forward if reference_forward else 0.0)


def peak_flops(device_kind: str) -> float | None:
    """Dense bfloat16 FLOP/s of one chip by its ``device_kind``; None when unknown (CPU, other GPUs)."""
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None


def rel_err(x: Any, ref: Any) -> float:
    """max |x - ref| / max |ref| (float32), for arrays of one shape."""
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(x - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def human_bytes(n: float) -> str:
    """Bytes in GiB, MiB or KiB (two decimals), whichever unit keeps the number at least 1."""
    for unit, size in (("GiB", GIB), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 2**10:.2f} KiB"


# ---------------------------------------------------------------------------------------------------------
# Worker side: results go to a JSON file, rewritten after every row (a timeout keeps what came before).


class Sink:
    """The result file of one part: {"machine": {...}, "rows": [...], "notes": [...], "error": str|None}."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {"machine": None, "rows": [], "notes": [], "error": None}

    def flush(self) -> None:
        """Rewrite the result file (atomically: a reader never sees half of it)."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        tmp.replace(self.path)

    def machine(self, info: dict[str, Any]) -> dict[str, Any]:
        self.data["machine"] = info
        self.flush()
        return info

    def row(self, name: str, setting: str, result: str, status: str, **raw: Any) -> None:
        """One table row; ``raw`` numbers go to the JSON output only."""
        print(f"[device_check] {name}: {result} ({status})", flush=True)
        self.data["rows"].append({"name": name, "setting": setting, "result": result, "status": status, "raw": raw})
        self.flush()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.flush()

    def error(self, text: str) -> None:
        self.data["error"] = text
        self.flush()


def machine_info() -> dict[str, Any]:
    """Device kind, platform and library versions of this process (initialises the JAX backend)."""
    import platform
    from importlib import metadata

    import jax

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "-"

    dev = jax.devices()[0]
    return {
        "device_kind": dev.device_kind,
        "platform": dev.platform,
        "devices": jax.device_count(),
        "python": platform.python_version(),
        **{pkg: version(pkg) for pkg in ("jax", "jaxlib", "flax", "optax", "pydantic")},
    }


def peak_device_bytes() -> tuple[int | None, str]:
    """(bytes, what they are): the device allocator's peak, or the process's peak RSS where it has none."""
    import resource

    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "peak device memory"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS (no device allocator stats)"


def timed(fn: Callable[[], Any], reps: int) -> list[float]:
    """Wall seconds of ``reps`` calls of ``fn`` (which must block until its result is ready)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# ---- part 1: the fused LM-head loss ---------------------------------------------------------------------


def fused_inputs(sizes: FusedSizes, seed: int = 0) -> tuple[Any, ...]:
    """(hidden [N, H] bf16, weight [H, V] bf16 ~ N(0, 1/H), ids int32 [N, K] in [0, V),
    lse cotangent [len(TEMPERATURES), N] f32, gathered cotangent [N, K] f32), on the default device."""
    import jax
    import jax.numpy as jnp

    k = jax.random.split(jax.random.key(seed), 5)
    n, h, v = sizes.n, sizes.h, sizes.v
    hidden = jax.random.normal(k[0], (n, h), jnp.bfloat16)
    weight = (jax.random.normal(k[1], (h, v), jnp.float32) * h**-0.5).astype(jnp.bfloat16)
    ids = jax.random.randint(k[2], (n, sizes.k), 0, v, jnp.int32)
    ct_lse = jax.random.uniform(k[3], (len(TEMPERATURES), n), jnp.float32) / n
    ct_gathered = jax.random.normal(k[4], (n, sizes.k), jnp.float32) / n
    return jax.block_until_ready((hidden, weight, ids, ct_lse, ct_gathered))


def fused_value_and_grad(impl: str) -> Callable[..., Any]:
    """jit of (hidden, weight, ids, ct_lse, ct_gathered) -> ((loss, (lse, gathered)), (d_hidden, d_weight)).

    loss = sum(ct_lse * lse) + sum(ct_gathered * gathered): a scalar whose gradient sends fixed random
    cotangents through both outputs of ``linear_logsumexp_gather``.
    """
    import jax
    import jax.numpy as jnp

    from jaxpref.pallas.linear_lse.api import linear_logsumexp_gather

    def loss(hidden, weight, ids, ct_lse, ct_gathered):
        lse, gathered = linear_logsumexp_gather(hidden, weight, ids, temperatures=TEMPERATURES, impl=impl)
        return jnp.sum(ct_lse * lse) + jnp.sum(ct_gathered * gathered), (lse, gathered)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def fused_outputs(out: Any) -> dict[str, Any]:
    """Named arrays of a ``fused_value_and_grad`` result."""
    (loss, (lse, gathered)), (d_hidden, d_weight) = out
    return {"loss": loss, "lse": lse, "gathered": gathered, "d_hidden": d_hidden, "d_weight": d_weight}


def device_rel_err(x: Any, ref: Any) -> float:
    """``rel_err`` computed on the device (a [H, V] gradient stays there; only the scalar comes back)."""
    import jax.numpy as jnp

    x, ref = jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)
    return float(jnp.max(jnp.abs(x - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))


def compare_fused(out: dict[str, Any], ref: dict[str, Any]) -> tuple[dict[str, float], bool]:
    """Relative errors per output and whether all are within FORWARD_TOL / GRAD_TOL."""
    errs = {name: device_rel_err(out[name], ref[name]) for name in ref}
    ok = all(e <= (GRAD_TOL if name.startswith("d_") else FORWARD_TOL) for name, e in errs.items())
    return errs, ok


def check_row(sink: Sink, impl: str, where: str, sizes: FusedSizes, out: dict, ref: dict) -> None:
    errs, ok = compare_fused(out, ref)
    result = ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + " (max rel. error)"
    sink.row(fused_check_row(impl, where), f"{sizes.label()} bf16", result, PASS if ok else FAIL, errors=errs)


def run_fused(plan: Plan, sink: Sink, model_dir: str) -> None:
    """Part 1: correctness at the check size, then time, temporaries and correctness at the bench size."""
    import jax

    del model_dir
    check = fused_inputs(plan.fused_check)
    ref = fused_outputs(fused_value_and_grad("reference")(*check))
    for impl in CHECKED_IMPLS:
        check_row(sink, impl, "check", plan.fused_check, fused_outputs(fused_value_and_grad(impl)(*check)), ref)
    del check, ref

    sizes = plan.fused_bench
    bench = fused_inputs(sizes, seed=1)
    logits_bytes = sizes.n * sizes.v * 4
    sink.note(
        f"Fused loss: {sizes.label()}, bfloat16 inputs, temperatures {TEMPERATURES}; [N, V] float32 logits "
        f"would be {human_bytes(logits_bytes)}. Times: forward+backward (value_and_grad w.r.t. hidden and weight), "
        f"median of {plan.fused_reps} after one warm-up. Tolerances: values {FORWARD_TOL:g}, gradients "
        f"{GRAD_TOL:g} (max |x - ref| / max |ref|)."
    )
    ref = None
    for impl in FUSED_IMPLS:
        t0 = time.perf_counter()
        compiled = fused_value_and_grad(impl).lower(*bench).compile()
        compile_s = time.perf_counter() - t0
        temp = compiled.memory_analysis().temp_size_in_bytes
        out = fused_outputs(jax.block_until_ready(compiled(*bench)))  # warm-up; also the compared result
        times = timed(lambda c=compiled: jax.block_until_ready(c(*bench)), plan.fused_reps)
        med = statistics.median(times)
        result = f"{med * 1e3:.2f} ms; temporaries {human_bytes(temp)} ({temp / logits_bytes:.2f} x [N, V] f32)"
        sink.row(
            fused_time_row(impl), f"{sizes.label()} bf16", result, MEASURED,
            median_s=med, times_s=times, temp_bytes=temp, compile_s=compile_s,
        )  # fmt: skip
        if impl == "reference":
            ref = out
        else:
            check_row(sink, impl, "bench", sizes, out, ref)
        del compiled, out


# ---- parts 2 and 3: train steps -----------------------------------------------------------------------


def kd_batch(rows: int, seq_len: int, vocab: int, top_k: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A KD micro-batch in jaxpref's layout: ``bench_kd_step.make_batch`` (teacher top-k targets)."""
    return bench_kd_step.make_batch(rows, seq_len, seed, vocab=vocab, top_k=top_k)


def dpo_batch(pairs: int, seq_len: int, prompt_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A DPO pair batch in jaxpref's layout: ``bench_dpo_step``'s (a shared prompt of ``prompt_len``
    tokens, chosen/rejected completions ending in EOS, loss on the completions' predictions)."""
    return bench_dpo_step.jaxpref_batch(bench_dpo_step.make_pairs(pairs, seq_len, prompt_len, seed, vocab=vocab))


def train_config(plan: Plan, objective: str, model_dir: str, output_dir: str) -> dict[str, Any]:
    """The raw jaxpref config of a train-step part (validated by ``jaxpref.config.validate_config``)."""
    common = {
        "base_model": model_dir,
        "random_init_weights": True,
        "param_dtype": "bfloat16",
        "compute_dtype": "bfloat16",
        "gradient_checkpointing": True,
        "sequence_len": plan.seq_len,
        "optimizer": "adamw",
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "lr_scheduler": "constant",
        "max_steps": 1 + plan.train_steps,
        "output_dir": output_dir,
        "use_tensorboard": False,
    }
    if objective == "kd":
        kd = {"kd_trainer": True, "kd_alpha": 1.0, "kd_ce_alpha": 0.5, "kd_temperature": 1.0}
        return {**common, **kd, "micro_batch_size": plan.rows, "learning_rate": 1e-5}
    return {**common, "rl": "dpo", "rl_beta": 0.1, "micro_batch_size": plan.rows // 2, "learning_rate": 1e-6}


def build_trainer(raw: dict[str, Any], objective: str) -> tuple[Any, Any]:
    """(jaxpref Trainer at step 0, validated config), built as ``jaxpref.train`` builds it."""
    from jaxpref import sharding as shd
    from jaxpref.assembly import build_companions, build_model
    from jaxpref.config import validate_config
    from jaxpref.models import load_model_config
    from jaxpref.objectives import build_objective
    from jaxpref.optim import make_optimizer
    from jaxpref.trainer import Trainer

    cfg = validate_config(raw, require_datasets=False)
    vocab = load_model_config(cfg.base_model).vocab_size
    obj = build_objective(cfg, objective)
    mesh = shd.make_mesh(None)
    model = build_model(cfg, vocab, mesh)
    companions = build_companions(cfg, obj.companions, vocab, mesh)
    tx, _ = make_optimizer(cfg, cfg.max_steps)
    trainer = Trainer(
        model, obj, tx, mesh=mesh, rules=cfg.logical_axis_rules, seed=cfg.seed, companions=companions
    )  # fmt: skip
    return trainer, cfg


def run_train(plan: Plan, sink: Sink, model_dir: str, objective: str) -> None:
    """Parts 2 and 3: build the trainer, one compiling step, ``plan.train_steps`` timed steps, then rows."""
    import jax

    config = json.loads((Path(model_dir) / "config.json").read_text())
    dims = model_dims(config)
    raw = train_config(plan, objective, model_dir, tempfile.mkdtemp(prefix=f"device_check_{objective}_"))
    t0 = time.perf_counter()
    trainer, cfg = build_trainer(raw, objective)
    build_s = time.perf_counter() - t0
    if objective == "kd":
        batch = kd_batch(plan.rows, plan.seq_len, dims["vocab"], plan.top_k)
    else:
        batch = dpo_batch(plan.rows // 2, plan.seq_len, plan.prompt_len, dims["vocab"])

    with warnings.catch_warnings(record=True) as caught:  # the fused kernel warns when it falls back
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        stats = [trainer.train_step([batch])]
        first_s = time.perf_counter() - t0
    times = timed(lambda: stats.append(trainer.train_step([batch])), plan.train_steps)
    med = statistics.median(times)

    name = objective.upper()
    tokens = plan.rows * plan.seq_len
    flops = model_flops(config, plan.rows, plan.seq_len, reference_forward=objective == "dpo")
    peak = peak_flops(jax.devices()[0].device_kind)
    mem, mem_what = peak_device_bytes()
    n_train, n_frozen = trainer.num_params()
    mfu = f"MFU {flops / med / peak:.1%}" if peak else "MFU n/a (no bf16 peak known for this device)"
    shape = "x".join(str(x) for x in (dims["layers"], dims["hidden"], dims["vocab"]))
    pairs = f"{plan.rows // 2} pairs = " if objective == "dpo" else ""
    setting = (
        f"{Path(model_dir).name} (L x H x V = {shape}), {pairs}{plan.rows} x {plan.seq_len} tokens, bf16, "
        f"remat {cfg.remat_policy}, fused_kernel.impl {cfg.fused_kernel.impl}, "
        f"attention {getattr(cfg, 'attention_impl', 'auto')}"
    )
    result = (
        f"{tokens / med:,.0f} tokens/s; {mfu}; step {med:.3f} s (first {first_s:.1f} s); {mem_what} {human_bytes(mem)}"
    )
    sink.row(
        f"{name} train step", setting, result, MEASURED,
        tokens_per_s=tokens / med, model_flops=flops, median_s=med, times_s=times, first_step_s=first_s,
        build_s=build_s, peak_bytes=mem, trainable_params=n_train, frozen_model_params=n_frozen,
    )  # fmt: skip

    losses = [s["loss"] for s in stats]
    norms = [s["grad_norm"] for s in stats]
    finite = all(math.isfinite(x) for x in losses + norms)
    loss_text = (
        "losses " + ", ".join(f"{x:.4f}" for x in losses) + "; grad norms " + ", ".join(f"{x:.3g}" for x in norms)
    )
    if objective == "kd":
        sink.row("KD loss and gradient finite", f"{plan.train_steps + 1} steps", loss_text, PASS if finite else FAIL)
    else:
        gap = abs(losses[0] - math.log(2))
        ok = finite and gap <= DPO_LN2_TOL
        sink.row(
            "DPO step-0 loss = ln 2 (policy = reference)", f"tolerance {DPO_LN2_TOL}",
            f"|loss - ln 2| = {gap:.2e}; {loss_text}", PASS if ok else FAIL, gap=gap,
        )  # fmt: skip
    fallbacks = sorted({str(w.message) for w in caught if "unavailable" in str(w.message)})
    sink.row(
        f"{name} fused kernel without fallback", f"backend {jax.default_backend()}",
        "; ".join(fallbacks) or "no fallback warning", FAIL if fallbacks else PASS,
    )  # fmt: skip
    companions = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.companions))
    frozen = f", {companions:,} in the frozen reference copy" if companions else ""
    sink.note(
        f"{name}: {n_train:,} trainable parameters{frozen}; P = {matmul_params(config):,} matmul weights per "
        f"token; model FLOPs per step {flops:.3e}."
    )


WORKERS: dict[str, Callable[[Plan, Sink, str], None]] = {
    "fused": run_fused,
    "kd": lambda plan, sink, model_dir: run_train(plan, sink, model_dir, "kd"),
    "dpo": lambda plan, sink, model_dir: run_train(plan, sink, model_dir, "dpo"),
}
# Packages that the GPU machine lacks unless carried (scripts/device_check.sh): which ones this run imports.
CARRIED_CANDIDATES = ("pydantic", "pydantic_core", "annotated_types", "typing_inspection", "grain", "datasets",
                      "tensorboardX")  # fmt: skip


def worker_main(part: str, plan: Plan, model_dir: str, result: Path) -> int:
    """Run one part in this process, writing its rows to ``result``; exit status 0 unless it raised."""
    sink = Sink(result)
    try:
        info = sink.machine(machine_info())
        if not plan.smoke and info["platform"] == "cpu":
            raise RuntimeError("the full sizes need a GPU (or TPU); on CPU run with --smoke")
        WORKERS[part](plan, sink, model_dir)
    except BaseException as e:  # the driver reports it in the table, the traceback goes to stderr
        traceback.print_exc()
        sink.error(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300])
        return 1
    finally:
        sink.data["imported"] = [m for m in CARRIED_CANDIDATES if m in sys.modules]
        sink.flush()
    return 0


# ---------------------------------------------------------------------------------------------------------
# Driver: run the parts one after the other, then one table.


def write_smoke_model(directory: Path) -> Path:
    """A config.json of a tiny Llama (SMOKE_MODEL over the Llama-3.2-1B config) in ``directory``."""
    config = json.loads((LLAMA_1B / "config.json").read_text()) | SMOKE_MODEL
    config["bos_token_id"], config["eos_token_id"] = 1, 2
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory


def run_part(part: str, plan: Plan, model_dir: Path, workdir: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``part`` in a fresh Python process; its result dict (``Sink.data``), with "error" set on failure."""
    result = workdir / f"{part}.json"
    cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--worker", part]
    cmd += ["--plan", json.dumps(dataclasses.asdict(plan)), "--model-dir", str(model_dir), "--result", str(result)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if plan.smoke:  # one CPU device; XLA's CPU back end at low optimisation compiles these toys ~1.5x faster
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = SMOKE_XLA_FLAGS
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    print(f"[device_check] part {part} (limit {timeout_s:.0f} s)", flush=True)
    t0 = time.perf_counter()
    error = None
    try:
        rc = subprocess.run(cmd, env=env, timeout=timeout_s).returncode
        if rc:
            error = f"worker exited with status {rc}"
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout_s:.0f} s"
    data = json.loads(result.read_text()) if result.exists() else {"machine": None, "rows": [], "notes": []}
    data["error"] = data.get("error") or error
    data["seconds"] = time.perf_counter() - t0
    return data


def assemble_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """Every part's expected rows in order (missing ones as failures naming the part's error), then extras."""
    rows: list[dict[str, str]] = []
    for part, data in results.items():
        got = {r["name"]: r for r in data["rows"]}
        for name, _kind in expected_rows(part):
            if name in got:
                rows.append(got.pop(name))
            else:
                why = f"not measured: part {part}: {data.get('error') or 'row not produced'}"
                rows.append({"name": name, "setting": "", "result": why, "status": FAIL})
        rows.extend(got.values())
    return rows


def machine_line(results: dict[str, dict[str, Any]]) -> str:
    """The first machine description any part reported."""
    info = next((d["machine"] for d in results.values() if d.get("machine")), None)
    if info is None:
        return "unknown (no part started JAX)"
    versions = ", ".join(f"{k} {info[k]}" for k in ("jax", "jaxlib", "flax", "optax", "pydantic", "python"))
    return f"{info['device_kind']} ({info['platform']}, {info['devices']} device(s)); {versions}"


def render_table(results: dict[str, dict[str, Any]], plan: Plan) -> str:
    """The markdown report: one table (machine row first), then notes."""

    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| check | setting | result | status |",
        "| --- | --- | --- | --- |",
        f"| machine | {'smoke (CPU, toy sizes)' if plan.smoke else 'device run'} | {cell(machine_line(results))} "
        f"| {INFO} |",
    ]
    for r in assemble_rows(results):
        lines.append(f"| {cell(r['name'])} | {cell(r['setting'])} | {cell(r['result'])} | {r['status']} |")
    notes = [n for d in results.values() for n in d.get("notes", [])]
    notes.append(
        "MFU = model FLOPs / step time / dense bf16 peak (H100 SXM, H200: 989e12 FLOP/s); model FLOPs = 3 x "
        "forward (+ 1 x forward for DPO's reference), forward = 2 P tokens + 2 L n_heads head_dim T^2 rows "
        "(causal attention), remat recomputation not counted."
    )
    imported = sorted({m for d in results.values() for m in d.get("imported", [])})
    notes.append("Carried-wheel candidates imported by this run: " + (", ".join(imported) or "none") + ".")
    seconds = ", ".join(f"{p} {d['seconds']:.0f} s" for p, d in results.items())
    notes.append(f"Wall time per part (start-up and compilation included): {seconds}.")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def all_passed(results: dict[str, dict[str, Any]]) -> bool:
    """True when every expected row is present with status pass (checks) or measured (measurements)."""
    rows = {r["name"]: r["status"] for r in assemble_rows(results)}
    want = {name: PASS if kind == "check" else MEASURED for part in results for name, kind in expected_rows(part)}
    return all(rows.get(name) == status for name, status in want.items())


def default_path(name: str) -> str | None:
    out = os.environ.get("OUT")
    return str(Path(out) / name) if out else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, toy sizes (a tiny Llama written to a temp dir)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--out", default=default_path("device_check.md"), help="markdown table (default $OUT/...)")
    p.add_argument("--json", default=default_path("device_check.json"), help="raw results (default $OUT/...)")
    p.add_argument("--model-dir", default=None, help="config.json directory (default: Llama-3.2-1B; smoke: tiny)")
    p.add_argument("--budget-s", type=float, default=None, help="time for all parts together (default: plan's)")
    p.add_argument("--worker", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, Plan.from_json(args.plan), args.model_dir, Path(args.result))
    plan = SMOKE if args.smoke else FULL
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; choose from {PARTS}")
    deadline = time.monotonic() + (args.budget_s or plan.budget_s)
    with tempfile.TemporaryDirectory(prefix="device_check_") as tmp:
        workdir = Path(tmp)
        if args.model_dir:
            model_dir = Path(args.model_dir).resolve()
        else:
            model_dir = write_smoke_model(workdir / "tiny-llama") if plan.smoke else LLAMA_1B
        results = {}
        for part in parts:
            timeout = min(plan.part_timeout_s[part], deadline - time.monotonic())
            if timeout < 5:
                results[part] = {"machine": None, "rows": [], "notes": [], "error": "skipped: time budget spent",
                                 "seconds": 0.0}  # fmt: skip
                continue
            results[part] = run_part(part, plan, model_dir, workdir, timeout)
    text = render_table(results, plan)
    print("\n" + text, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"plan": dataclasses.asdict(plan), "results": results}, indent=1))
    return 0 if all_passed(results) else 1


if __name__ == "__main__":
    sys.exit(main())
