"""Benchmark: one KD train step (forward, top-k KD loss, backward, AdamW), jaxpref vs a PyTorch reference.

jaxpref runs its real training path: a validated config (``kd_trainer: true``), the model from the
checkpoint, ``objectives.build_objective(cfg, "kd")`` with stored teacher targets, AdamW from
``jaxpref.optim`` and ``jaxpref.trainer.Trainer.train_step``. The reference does what axolotl's KD
trainer does in PyTorch: transformers ``LlamaForCausalLM`` full float32 logits ``[B, T, V]``, forward KL
over the teacher's top-k (student ``log_softmax(logits / T)`` over the whole vocabulary, gathered at
the teacher ids, ``sum p_t (log p_t - log q) * T^2 / N``) plus ``kd_ce_alpha`` x token cross-entropy,
``torch.optim.AdamW`` with the HF Trainer's gradient clipping (1.0), as jaxpref.

Both start from the same weights (a random-init checkpoint written once per config) and train on the
same random batch, so their first-step losses agree (printed as a check). Each (config,
implementation) runs in its own fresh subprocess, one after the other, so peak RSS
(``ru_maxrss``, which for JAX on CPU is all of its memory) is per implementation.

  python scripts/bench_kd_step.py                        # small and large, both implementations
  python scripts/bench_kd_step.py --configs small --steps 5 --out kd_table.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxpref.cli import MALLOC_TUNABLES, NO_MALLOC_TUNING

# name: (layers, batch, seq_len)
CONFIGS = {"small": (4, 4, 256), "large": (8, 8, 1024)}
# jaxpref config keys per benchmark config (the reference runs as it is). The large config is the memory
# test: activation checkpointing per block keeps only each block's input for the backward.
JAXPREF_SETTINGS = {"small": {}, "large": {"gradient_checkpointing": True}}
HIDDEN, HEADS, KV_HEADS, INTERMEDIATE, VOCAB, TOP_K = 512, 8, 4, 1536, 32000, 32
KD = dict(kd_alpha=1.0, kd_ce_alpha=0.5, kd_temperature=1.0)
LR = 1e-4
MAX_GRAD_NORM = 1.0


def _model_config(layers: int) -> dict:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def parse_set(items: list[str] | None) -> dict:
    """``--set key=value`` items as jaxpref config keys (values parsed as YAML)."""
    import yaml

    return {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in items or ())}


def make_batch(
    batch: int, seq_len: int, seed: int = 0, *, vocab: int = VOCAB, top_k: int = TOP_K
) -> dict[str, np.ndarray]:
    """A KD micro-batch in jaxpref's layout (prediction-aligned, docs/design.md "Batches").

    Distinct teacher ids per position (``base + j * 7919 mod V``), teacher log-probs a log-softmax of
    random logits sorted high to low; every position trainable except the last of each row.
    """
    if top_k > vocab or vocab % 7919 == 0:
        raise ValueError(f"top_k={top_k} distinct ids need V >= K and V not a multiple of 7919 (V={vocab})")
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (batch, seq_len), dtype=np.int32)
    labels = np.concatenate([ids[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
    loss_mask = np.ones((batch, seq_len), bool)
    loss_mask[:, -1] = False
    base = rng.integers(0, vocab, (batch, seq_len, 1))
    target_ids = ((base + np.arange(top_k) * 7919) % vocab).astype(np.int32)
    logits = np.sort(rng.normal(size=(batch, seq_len, top_k)) * 2.0, axis=-1)[..., ::-1]
    logits = logits - logits.max(-1, keepdims=True)
    target_logprobs = (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)
    target_mask = np.broadcast_to(loss_mask[..., None], target_ids.shape).copy()
    target_ids = np.where(target_mask, target_ids, 0).astype(np.int32)
    target_logprobs = np.where(target_mask, target_logprobs, 0.0).astype(np.float32)
    return {
        "input_ids": ids,
        "labels": labels,
        "loss_mask": loss_mask,
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
        "segment_ids": np.ones((batch, seq_len), np.int32),
        "target_token_ids": target_ids,
        "target_logprobs": target_logprobs,
        "target_mask": target_mask,
    }


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------------------
# Workers (each in its own process).


def _prepare(model_dir: str, layers: int) -> dict:
    """Write a random-init float32 checkpoint (transformers' initialisation) for both workers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**_model_config(layers)))
    model.save_pretrained(model_dir)
    return {"params": sum(p.numel() for p in model.parameters())}


def _torch_worker(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    layers, batch, seq_len = CONFIGS[args.config]
    model = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    b = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in make_batch(batch, seq_len).items()}
    temperature, ce_alpha = KD["kd_temperature"], KD["kd_ce_alpha"]
    ce_labels = torch.where(b["loss_mask"], b["labels"].long(), torch.full_like(b["labels"].long(), -100))
    target_ids = b["target_token_ids"].long()
    mask = b["target_mask"].float()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=b["input_ids"].long(), position_ids=b["positions"].long()).logits  # [B, T, V]
        num_items = float(b["loss_mask"].sum())
        # axolotl's topk_logprob forward_kl: log_softmax over the full vocabulary at T, gathered at the ids.
        student_lp = torch.log_softmax(logits.float() / temperature, dim=-1)
        student_topk = torch.gather(student_lp, -1, target_ids)
        teacher_lp = b["target_logprobs"].float()
        kd = (teacher_lp.exp() * (teacher_lp - student_topk) * mask).sum() * temperature**2 / num_items
        loss = KD["kd_alpha"] * kd
        if ce_alpha:
            ce = F.cross_entropy(logits.float().view(-1, VOCAB), ce_labels.view(-1), reduction="sum") / num_items
            loss = loss + ce_alpha * ce
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)  # the HF Trainer default
        opt.step()
        return float(loss.detach())

    return _timed(step, args, batch * seq_len, {"torch": torch.__version__, "threads": torch.get_num_threads()})


def _jax_worker(args: argparse.Namespace) -> dict:
    import jax

    from jaxpref import sharding as shd
    from jaxpref.assembly import build_model
    from jaxpref.config import validate_config
    from jaxpref.objectives import build_objective
    from jaxpref.optim import make_optimizer
    from jaxpref.trainer import Trainer

    layers, batch, seq_len = CONFIGS[args.config]
    raw = {
        "base_model": args.model_dir,
        "kd_trainer": True,
        **KD,
        "micro_batch_size": batch,
        "sequence_len": seq_len,
        "optimizer": "adamw_torch",
        "learning_rate": LR,
        "weight_decay": 0.0,
        "max_grad_norm": MAX_GRAD_NORM,
        "lr_scheduler": "constant",
        "max_steps": args.warmup + args.steps,
        "output_dir": tempfile.mkdtemp(prefix="bench_kd_out_"),
        **JAXPREF_SETTINGS[args.config],
    }
    raw.update(parse_set(args.set))
    cfg = validate_config(raw, require_datasets=False)
    objective = build_objective(cfg, "kd")
    mesh = shd.make_mesh(None)
    model = build_model(cfg, VOCAB, mesh)
    tx, _ = make_optimizer(cfg, cfg.max_steps)
    trainer = Trainer(model, objective, tx, mesh=mesh, rules=cfg.logical_axis_rules, seed=cfg.seed)
    del model
    mb = make_batch(batch, seq_len)

    def step() -> float:
        return trainer.train_step([mb])["loss"]

    extra = {"jax": jax.__version__, "remat_policy": cfg.remat_policy, "fused_kernel": cfg.fused_kernel.model_dump()}
    return _timed(step, args, batch * seq_len, extra)


def weight_shapes(layers: int) -> list[tuple[int, int]]:
    """[in, out] of every weight matmul of the model: per layer q, k, v, o, gate, up, down; the LM head."""
    kv = KV_HEADS * (HIDDEN // HEADS)
    per_layer = [(HIDDEN, HIDDEN), (HIDDEN, kv), (HIDDEN, kv), (HIDDEN, HIDDEN)]
    per_layer += [(HIDDEN, INTERMEDIATE), (HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN)]
    return per_layer * layers + [(HIDDEN, VOCAB)]


def gemm_bound_worker(layers: int, train_tokens: int, forward_tokens: int, steps: int) -> dict:
    """Seconds per step spent in the weight matmuls alone, at this machine's float32 GEMM speed.

    A train step needs, per weight [a, b] and n trained tokens, three GEMMs (forward x @ W, input
    gradient dy @ W^T, weight gradient x^T @ dy; 6 n a b FLOPs), plus one forward GEMM per
    forward-only token (a frozen reference). Attention's T x T products, norms, softmax, the optimizer
    and all memory traffic are left out, so no implementation of the step can beat this time on this
    machine: ``tokens / time`` is an upper bound on tokens/s. The GEMMs run back to back in JAX (XLA)
    and in PyTorch; the faster of the two counts.
    """
    import jax
    import jax.numpy as jnp
    import torch

    shapes = weight_shapes(layers)
    flops = sum(2 * a * b * (3 * train_tokens + forward_tokens) for a, b in shapes)
    key = jax.random.key(0)

    def arrays(n, pick):
        return [jax.random.normal(jax.random.fold_in(key, i), (n, pick(a, b))) for i, (a, b) in enumerate(shapes)]

    ws = [jax.random.normal(jax.random.fold_in(key, 1000 + i), s) for i, s in enumerate(shapes)]
    xs, dys = arrays(train_tokens, lambda a, b: a), arrays(train_tokens, lambda a, b: b)
    xfs = arrays(forward_tokens, lambda a, b: a) if forward_tokens else None

    @jax.jit
    def run_jax(ws, xs, dys, xfs):
        out = []
        for i, (w, x, dy) in enumerate(zip(ws, xs, dys)):
            out += [jnp.sum(x @ w), jnp.sum(dy @ w.T), jnp.sum(x.T @ dy)]
            if xfs is not None:
                out.append(jnp.sum(xfs[i] @ w))
        return sum(out)

    def time_it(fn) -> float:
        fn()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    t_jax = time_it(lambda: run_jax(ws, xs, dys, xfs).block_until_ready())
    tw, tx, tdy = ([torch.from_numpy(np.array(a)) for a in group] for group in (ws, xs, dys))
    txf = [torch.from_numpy(np.array(x)) for x in xfs] if xfs else None

    def run_torch():
        with torch.no_grad():
            for i, (w, x, dy) in enumerate(zip(tw, tx, tdy)):
                x @ w, dy @ w.T, x.T @ dy
                if txf is not None:
                    txf[i] @ w

    t_torch = time_it(run_torch)
    best = min(t_jax, t_torch)
    return {
        "gemm_flops": flops,
        "gemm_s_jax": t_jax,
        "gemm_s_torch": t_torch,
        "gemm_s": best,
        "gemm_gflops_per_s": flops / best / 1e9,
        "tokens_per_s_bound": train_tokens / best,
    }


def _timed(step, args: argparse.Namespace, tokens: int, extra: dict) -> dict:
    rss_setup = rss_bytes()
    losses, warm = [], []
    for _ in range(args.warmup):
        t0 = time.perf_counter()
        losses.append(step())
        warm.append(time.perf_counter() - t0)
    times, cpu = [], []
    for _ in range(args.steps):
        c0, t0 = time.process_time(), time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    med = statistics.median(times)
    return {
        "config": args.config,
        "impl": args.impl,
        "tokens_per_step": tokens,
        "warmup_s": warm,
        "times_s": times,
        "median_step_s": med,
        "cpu_s": cpu,
        "median_cpu_s": statistics.median(cpu),
        "tokens_per_s": tokens / med,
        "peak_rss_bytes": rss_bytes(),
        "rss_after_setup_bytes": rss_setup,
        "losses": losses,
        **extra,
    }


# ---------------------------------------------------------------------------------------------------------
# Driver.


def run_worker(script: str, mode: str, config: str, model_dir: str, args: argparse.Namespace) -> dict:
    """Run ``script --worker mode`` in a fresh process; its last stdout line is the JSON result."""
    cmd = [sys.executable, script, "--worker", mode, "--config", config, "--model-dir", model_dir]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    for item in getattr(args, "set", None) or ():
        cmd += ["--set", item]
    for item in getattr(args, "trl_set", None) or ():  # bench_grpo_step.py: GRPOConfig keys
        cmd += ["--trl-set", item]
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", NO_MALLOC_TUNING)}
    malloc = getattr(args, "malloc", "as-shipped")
    if malloc == "tuned" or (malloc == "as-shipped" and mode.startswith("jaxpref")):
        env["GLIBC_TUNABLES"] = MALLOC_TUNABLES  # what the jaxpref commands run with (jaxpref/cli.py)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return {"config": config, "impl": mode, "error": " | ".join(tail)}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_configs(script: str, args: argparse.Namespace, prefix: str) -> tuple[list[dict], list[dict]]:
    """Per config: write its checkpoint, run each implementation, then the matmul bound, one process at a
    time (never two measured processes at once). Returns (results, bounds)."""
    results, bounds = [], []
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        for config in args.configs.split(","):
            model_dir = str(Path(tmp) / config)
            prep = run_worker(script, "prepare", config, model_dir, args)
            if "error" in prep:
                sys.exit(f"could not write the {config} checkpoint: {prep['error']}")
            modes = args.impls.split(",") + ([] if args.no_bound else ["gemm"])
            for mode in modes:
                label = "matmul bound" if mode == "gemm" else mode
                print(f"running {config} / {label} ...", file=sys.stderr, flush=True)
                out = run_worker(script, mode, config, model_dir, args)
                (bounds if mode == "gemm" else results).append(out)
                print(f"  {json.dumps({k: v for k, v in out.items() if k != 'losses'})}", file=sys.stderr, flush=True)
    return results, bounds


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM"


def comparison_table(
    results: list[dict], reference: str, label: str, name: Callable[[dict], str], columns: list[tuple[str, Callable]]
) -> str:
    """Markdown table: config, impl, ``columns`` (header, cell function), peak memory, and the ratios of
    tokens/s and memory to the ``reference`` implementation's row of the same config."""
    headers = [
        "config",
        "impl",
        *(h for h, _ in columns),
        "peak memory (GiB)",
        f"tokens/s vs {label}",
        f"memory vs {label}",
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    refs = {r["config"]: r for r in results if r["impl"] == reference and "error" not in r}
    for r in results:
        cells = [name(r), r["impl"]]
        if "error" in r:
            cells.append(f"failed: {r['error'][:100]} |" + " |" * (len(headers) - 4))
        else:
            ref = refs.get(r["config"])
            speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
            mem = f"{r['peak_rss_bytes'] / ref['peak_rss_bytes']:.2f}x" if ref else "-"
            cells += [fn(r) for _, fn in columns] + [f"{r['peak_rss_bytes'] / 1024**3:.2f}", speed, mem]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    def name(r: dict) -> str:
        layers, batch, seq_len = CONFIGS[r["config"]]
        return f"{r['config']} ({layers} layers, {batch} x {seq_len})"

    columns = [("tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}"), ("step (s)", lambda r: f"{r['median_step_s']:.3f}")]
    return comparison_table(results, "torch", "torch", name, columns)


def malloc_note(mode: str) -> str:
    tuned = f"GLIBC_TUNABLES={MALLOC_TUNABLES}"
    return {
        "as-shipped": f"as shipped (jaxpref {tuned}, as its commands set it; the reference with glibc defaults)",
        "tuned": f"{tuned} for both",
        "default": "glibc defaults for both",
    }[mode]


def bound_lines(bounds: list[dict], results: list[dict], reference: str) -> list[str]:
    """One line per config: the weight-GEMM bound on tokens/s and what it is as a multiple of ``reference``."""
    lines = []
    for b in bounds:
        if "error" in b:
            lines.append(f"- {b['config']}: matmul bound not measured ({b['error'][:100]})")
            continue
        ref = next(
            (r for r in results if r["config"] == b["config"] and r["impl"] == reference and "error" not in r), None
        )
        ratio = f" = {b['tokens_per_s_bound'] / ref['tokens_per_s']:.2f}x {reference}" if ref else ""
        lines.append(
            f"- {b['config']}: weight GEMMs alone take {b['gemm_s']:.3f} s per step "
            f"({b['gemm_flops'] / 1e9:.0f} GFLOP at {b['gemm_gflops_per_s']:.0f} GFLOP/s; XLA "
            f"{b['gemm_s_jax']:.3f} s, PyTorch {b['gemm_s_torch']:.3f} s): at most "
            f"{b['tokens_per_s_bound']:,.0f} tokens/s{ratio}"
        )
    if lines:
        lines.insert(
            0, "Matmul bound (no implementation of the step can be faster on this machine; see gemm_bound_worker):"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="small,large")
    p.add_argument("--impls", default="torch,jaxpref")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator warm-up)")
    p.add_argument("--set", action="append", help="extra jaxpref config key=value (e.g. remat_policy=full)")
    p.add_argument("--out", default=None, help="write the markdown table (and machine line) here")
    p.add_argument("--json", default=None, help="write the raw results here")
    p.add_argument(
        "--malloc",
        default="as-shipped",
        choices=["as-shipped", "tuned", "default"],
        help="glibc malloc settings: 'as-shipped' = each as its users run it (jaxpref with the GLIBC_TUNABLES "
        "its commands set, PyTorch with glibc's defaults); 'tuned' / 'default' = that setting for both",
    )
    p.add_argument("--no-bound", action="store_true", help="skip the matmul-bound measurement")
    p.add_argument("--worker", default=None, choices=["prepare", "torch", "jaxpref", "gemm"], help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.impl = args.worker
        layers, batch, seq_len = CONFIGS[args.config]
        if args.worker == "gemm":
            out = {"config": args.config, **gemm_bound_worker(layers, batch * seq_len, 0, args.steps)}
        elif args.worker == "prepare":
            out = _prepare(args.model_dir, layers)
        else:
            out = {"torch": _torch_worker, "jaxpref": _jax_worker}[args.worker](args)
        print(json.dumps(out))
        return

    load_start = os.getloadavg()
    results, bounds = run_configs(__file__, args, prefix="bench_kd_")
    load_end = os.getloadavg()
    text = [
        f"Machine: {machine()}; load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end.",
        f"float32, V={VOCAB}, d={HIDDEN}, {HEADS} heads / {KV_HEADS} kv heads, top-{TOP_K}, "
        f"kd_alpha={KD['kd_alpha']}, kd_ce_alpha={KD['kd_ce_alpha']}, T={KD['kd_temperature']}; median of "
        f"{args.steps} steps after {args.warmup} warm-up steps; peak memory = peak RSS of the process; "
        f"jaxpref settings: {JAXPREF_SETTINGS} {args.set or ''}; malloc: {malloc_note(args.malloc)}.",
        "",
        table(results),
    ]
    if bounds:
        text += ["", *bound_lines(bounds, results, "torch")]
    checks = []
    for config in args.configs.split(","):
        first = {r["impl"]: r["losses"][0] for r in results if r["config"] == config and "error" not in r}
        if len(first) > 1:
            checks.append(f"{config}: " + ", ".join(f"{k} {v:.5f}" for k, v in first.items()))
    if checks:
        text += ["", "First-step loss (same weights, same batch): " + "; ".join(checks)]
    print("\n" + "\n".join(text))
    if args.out:
        Path(args.out).write_text("\n".join(text) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
