"""QLoRA vs LoRA on the Llama-3.2-1B shape (random weights): base weight bytes, train-step memory, and the time
the NF4 dequantization costs per step.

Each variant runs in its own fresh process (``--worker lora|qlora``), one after the other: the config is
configs/real/llama3.2_1b_kd_lora.yaml (bfloat16 base, rank-16 LoRA on every projection, remat per block,
one packed row of ``--seq`` tokens, KD loss from a random top-32 target), with ``adapter: qlora`` for QLoRA.
Per variant it reports:

* base weight bytes (``jaxpref.models.quantize.base_weight_bytes``: NF4 arrays and float weights);
* XLA's memory analysis of the compiled step (arguments = parameters + optimizer state + batch; temporaries);
* the process's peak RSS over the timed steps only (VmHWM reset through /proc/self/clear_refs after setup and
  compilation: random initialisation builds the float model before quantizing it, which a checkpoint load does
  not), and over the whole process;
* seconds per step; for QLoRA also the time to dequantize every block weight once (all 16 layers x 7
  projections to bfloat16, jitted, under a layer scan like the forward), which a remat step does about twice
  (the forward, and the forward recomputed in the backward).

  python scripts/bench_qlora.py                 # both variants, --seq 512, 2 timed steps each
  python scripts/bench_qlora.py --seq 2048 --steps 1
  python scripts/bench_qlora.py --variants qlora qlora_emb --compile_only   # + NF4 embedding, memory only

``qlora_emb`` is QLoRA with ``qlora_quantize_embeddings: true`` (the tied embedding / LM head as NF4 too);
``--compile_only`` reports the bytes and XLA's memory analysis without running steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "real" / "llama3.2_1b_kd_lora.yaml"
VARIANTS = ("lora", "qlora", "qlora_emb")
VOCAB = 32000  # batch token ids (the model's vocabulary is 128,256)
GIB = 1024**3


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _config(variant: str, seq: int, steps: int):
    from jaxpref.config import validate_config

    raw = yaml.safe_load(CONFIG.read_text())
    raw.update(
        sequence_len=seq,
        max_steps=steps,
        lr_scheduler="constant",
        warmup_steps=0,
        output_dir=tempfile.mkdtemp(prefix="bench_qlora_"),
        base_model_config=str(REPO / "configs" / "models" / "Llama-3.2-1B"),
        tokenizer_config=str(REPO / "demo" / "tiny-llama"),
    )
    raw.pop("datasets", None)
    raw.pop("test_datasets", None)
    if variant in ("qlora", "qlora_emb"):
        raw["adapter"] = "qlora"
    if variant == "qlora_emb":
        raw["qlora_quantize_embeddings"] = True
    return validate_config(raw, require_datasets=False)


def dequant_seconds(model, repeats: int = 3) -> float:
    """Median seconds to dequantize every block weight once (to the compute dtype), jitted, layer by layer."""
    import jax
    import jax.numpy as jnp

    from jaxpref.models import nf4
    from jaxpref.models.quantize import block_linears

    linears = list(block_linears(model))
    arrays = [lin.nf4_arrays() for lin in linears]
    shapes = [(int(jnp.prod(jnp.array(lin.out_shape))), int(jnp.prod(jnp.array(lin.in_shape)))) for lin in linears]
    dtype = model.dtype

    @jax.jit
    def all_layers(arrays):
        def body(carry, layer):
            # a reduction of each dequantized weight: XLA must produce every value (nothing is dead code)
            sums = [nf4.dequantize(q, s, dtype).astype(jnp.float32).sum() for q, s in zip(layer, shapes)]
            return carry + sum(sums), None

        return jax.lax.scan(body, jnp.float32(0), arrays)[0]

    jax.block_until_ready(all_layers(arrays))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(all_layers(arrays))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(variant: str, seq: int, steps: int, warmup: int, compile_only: bool = False) -> dict:
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(REPO / "scripts"))
    import bench_kd_step as kd

    from jaxpref import lora
    from jaxpref import sharding as shd
    from jaxpref.assembly import build_model
    from jaxpref.models.quantize import base_weight_bytes
    from jaxpref.objectives import build_objective
    from jaxpref.optim import make_optimizer
    from jaxpref.trainer import Trainer, stack_micro_batches

    cfg = _config(variant, seq, warmup + steps)
    objective = build_objective(cfg, "kd")
    mesh = shd.make_mesh(None)
    t0 = time.perf_counter()
    model = build_model(cfg, VOCAB, mesh)
    out: dict = {"variant": variant, "seq": seq, "build_s": time.perf_counter() - t0}
    out["base_bytes"] = base_weight_bytes(model)
    if variant != "lora" and not compile_only:
        out["dequant_all_layers_s"] = dequant_seconds(model)
    tx, _ = make_optimizer(cfg, cfg.max_steps)
    trainer = Trainer(model, objective, tx, mesh=mesh, trainable=lora.trainable_filter(model), seed=cfg.seed)
    del model
    mb = kd.make_batch(1, seq, vocab=VOCAB)
    batch = shd.global_batch(stack_micro_batches([mb]), trainer.mesh, leading_dims=1)
    compiled = trainer._train_step.lower(
        trainer.params, trainer.frozen, trainer.companions, trainer.opt_state, batch, jnp.int32(trainer.step)
    ).compile()
    m = compiled.memory_analysis()
    out["xla_argument_bytes"], out["xla_temp_bytes"] = m.argument_size_in_bytes, m.temp_size_in_bytes
    del compiled, batch
    if compile_only:
        return out
    out["rss_before_steps"] = _status("VmRSS")
    out["peak_reset"] = _reset_peak()
    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        losses.append(float(trainer.train_step([mb])["loss"]))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    out["step_peak_rss"] = _status("VmHWM")
    out["process_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out |= {"s_per_step": statistics.median(times), "losses": losses, "jax": jax.__version__}
    out["load_avg"] = os.getloadavg()[0]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=VARIANTS)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=["lora", "qlora"])
    p.add_argument("--compile_only", action="store_true", help="bytes and XLA memory analysis only, no steps")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.seq, args.steps, args.warmup, args.compile_only)))
        return
    results = {}
    for variant in args.variants:
        print(f"running {variant} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--worker", variant, "--seq", str(args.seq)]
        cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)] + ["--compile_only"] * args.compile_only
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            sys.exit(f"{variant} failed: {done.stderr[-3000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {json.dumps(results[variant])}", file=sys.stderr, flush=True)
    if args.compile_only or set(args.variants) != {"lora", "qlora"}:
        _compare(results, args.seq)
        return
    lo, q = results["lora"], results["qlora"]
    linear_bf16 = lo["base_bytes"]["float"] - q["base_bytes"]["float"]
    whole = sum(q["base_bytes"].values()) / lo["base_bytes"]["float"]
    print(f"Llama-3.2-1B shape, 1 x {args.seq} tokens, bfloat16, rank-16 LoRA on every projection, remat per block")
    print(f"quantized block weights / their bfloat16 bytes: {q['base_bytes']['quantized'] / linear_bf16:.3f}x")
    print(f"whole base model (bfloat16 embedding, norms) / bfloat16: {whole:.3f}x")
    print("| | LoRA (bf16 base) | QLoRA (NF4 base) | ratio |")
    print("|---|---|---|---|")
    rows = [
        ("base weights (GiB)", lambda r: sum(r["base_bytes"].values()) / GIB),
        ("XLA arguments (GiB)", lambda r: r["xla_argument_bytes"] / GIB),
        ("XLA temporaries (GiB)", lambda r: r["xla_temp_bytes"] / GIB),
        ("peak RSS over the steps (GiB)", lambda r: r["step_peak_rss"] / GIB),
        ("peak RSS of the process (GiB)", lambda r: r["process_peak_rss"] / GIB),
        ("s / step", lambda r: r["s_per_step"]),
    ]
    for name, f in rows:
        print(f"| {name} | {f(lo):.2f} | {f(q):.2f} | {f(q) / f(lo):.2f}x |")
    print(f"dequantizing all 16 x 7 block weights once: {q['dequant_all_layers_s']:.2f} s (a remat step does it ~2x)")
    print(f"load average: {lo['load_avg']:.1f} / {q['load_avg']:.1f} (the machine is shared)")


def _compare(results: dict, seq: int) -> None:
    """One column per variant: base weights and XLA's memory analysis (and the steps when they ran)."""
    names = list(results)
    print(f"Llama-3.2-1B shape, 1 x {seq} tokens, bfloat16, rank-16 LoRA on every projection, remat per block")
    print("| | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    rows = [
        ("base weights, NF4 (GiB)", lambda r: r["base_bytes"]["quantized"] / GIB),
        ("base weights, float (GiB)", lambda r: r["base_bytes"]["float"] / GIB),
        ("XLA arguments (GiB)", lambda r: r["xla_argument_bytes"] / GIB),
        ("XLA temporaries (GiB)", lambda r: r["xla_temp_bytes"] / GIB),
        ("XLA arguments + temporaries (GiB)", lambda r: (r["xla_argument_bytes"] + r["xla_temp_bytes"]) / GIB),
        ("peak RSS over the steps (GiB)", lambda r: r["step_peak_rss"] / GIB),
        ("s / step", lambda r: r["s_per_step"]),
    ]
    for name, f in rows:
        if all(_has(f, r) for r in results.values()):
            print(f"| {name} | " + " | ".join(f"{f(results[n]):.3f}" for n in names) + " |")


def _has(f, r: dict) -> bool:
    try:
        f(r)
        return True
    except KeyError:
        return False


if __name__ == "__main__":
    main()
