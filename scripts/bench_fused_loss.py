"""Benchmark: KD loss + gradient from hidden states, unfused reference vs the fused kernel paths.

Each (size, implementation) runs in its own subprocess so that peak RSS is per implementation. For each
it reports the compiled temporaries (``memory_analysis().temp_size_in_bytes``), peak process RSS, compile
time and the median wall time of ``value_and_grad`` w.r.t. hidden and LM-head weight.

  python scripts/bench_fused_loss.py                      # small and large sizes, all impls available
  python scripts/bench_fused_loss.py --sizes small --reps 5
  python scripts/bench_fused_loss.py --impls xla_chunked --block-v 4096

Implementations: ``reference`` = ``kd_loss`` on full float32 logits (``hidden @ weight``, autodiff);
``xla_chunked`` and ``pallas`` = ``fused_kd_loss`` with that kernel (pallas only on GPU/TPU).
The loss is ``kd_alpha=1, kd_ce_alpha=0.5, temperature=2, beta=0.5`` with K teacher ids per position.
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
import time

SIZES = {  # name: (N tokens, H hidden, V vocabulary, K teacher top-k)
    "small": (1024, 512, 32768, 32),
    "large": (4096, 1024, 128256, 32),
}


def _worker(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxpref.losses import kd_loss
    from jaxpref.losses.fused import fused_kd_loss

    n, h, v, k = SIZES[args.size]
    dtype = jnp.dtype(args.dtype)
    opts = dict(kd_alpha=1.0, kd_ce_alpha=0.5, temperature=2.0, beta=0.5)

    def loss(hidden, weight, ids, lp, mask, labels):
        if args.impl == "reference":
            logits = jnp.dot(hidden, weight, preferred_element_type=jnp.float32)
            return kd_loss(logits, ids, lp, mask, labels, **opts)[0]
        blocks = dict(block_n=args.block_n, block_v=args.block_v)
        return fused_kd_loss(hidden, weight, ids, lp, mask, labels, impl=args.impl, **blocks, **opts)[0]

    keys = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(keys[0], (n, h), jnp.float32).astype(dtype)
    weight = (jax.random.normal(keys[1], (h, v), jnp.float32) * h**-0.5).astype(dtype)
    ids = jax.random.randint(keys[2], (n, k), 0, v)
    lp = jax.nn.log_softmax(jax.random.normal(keys[3], (n, k)) * 2.0, axis=-1)
    mask = jnp.ones((n, k), bool)
    labels = ids[:, 0]
    inputs = (hidden, weight, ids, lp, mask, labels)
    jax.block_until_ready(inputs)
    rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    t0 = time.perf_counter()
    compiled = step.lower(*inputs).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    jax.block_until_ready(compiled(*inputs))  # warm-up
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        times.append(time.perf_counter() - t0)
    return {
        "size": args.size,
        "impl": args.impl,
        "shape": [n, h, v, k],
        "dtype": str(dtype),
        "backend": jax.default_backend(),
        "compile_s": compile_s,
        "times_s": times,
        "median_s": statistics.median(times),
        "temp_bytes": mem.temp_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_inputs_bytes": rss_inputs,
    }


def _run_child(size: str, impl: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--size", size, "--impl", impl, "--reps", str(args.reps)]
    cmd += ["--dtype", args.dtype]
    for flag, value in (("--block-n", args.block_n), ("--block-v", args.block_v)):
        if value:
            cmd += [flag, str(value)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"size": size, "impl": impl, "error": " | ".join(tail)}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"


def _table(results: list[dict]) -> str:
    mib = 1024**2
    lines = [
        "| size (N, H, V, K) | impl | median step (s) | compile (s) | temporaries (MiB) | temp / ref "
        "| peak RSS (GiB) | time / ref |",
        "|---|---|---|---|---|---|---|---|",
    ]
    refs = {r["size"]: r for r in results if r["impl"] == "reference" and "error" not in r}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['impl']} | failed: {r['error'][:80]} | | | | | |")
            continue
        ref = refs.get(r["size"])
        ratio_mem = f"1/{ref['temp_bytes'] / max(r['temp_bytes'], 1):.0f}" if ref and r is not ref else "1"
        ratio_t = f"{r['median_s'] / ref['median_s']:.2f}" if ref else "-"
        n, h, v, k = r["shape"]
        lines.append(
            f"| {r['size']} ({n}, {h}, {v}, {k}) | {r['impl']} | {r['median_s']:.2f} | {r['compile_s']:.1f} "
            f"| {r['temp_bytes'] / mib:,.0f} | {ratio_mem} | {r['peak_rss_bytes'] / 1024**3:.2f} | {ratio_t} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="small,large")
    p.add_argument("--impls", default=None, help="comma list; default reference,xla_chunked (+pallas on GPU/TPU)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--block-n", type=int, default=None)
    p.add_argument("--block-v", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(_worker(args)))
        return

    if args.impls:
        impls = args.impls.split(",")
    else:
        import jax

        impls = ["reference", "xla_chunked"] + (["pallas"] if jax.default_backend() in ("gpu", "tpu") else [])
    machine_before = _machine()
    results = []
    for size in args.sizes.split(","):
        for impl in impls:
            print(f"running {size} / {impl} ...", file=sys.stderr, flush=True)
            results.append(_run_child(size, impl, args))
            print(f"  {json.dumps(results[-1])}", file=sys.stderr, flush=True)
    print(f"\nMachine: {machine_before} at start; load average {os.getloadavg()[0]:.1f} at end.")
    print(f"dtype {args.dtype}, {args.reps} timed repetitions after one warm-up; value_and_grad w.r.t. hidden, W.\n")
    print(_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_before, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
