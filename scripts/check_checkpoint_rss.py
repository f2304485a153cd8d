"""Check that loading and saving a sharded checkpoint streams tensor by tensor: peak RSS < parameters + 1 GiB.

For each config.json and parameter dtype, in fresh processes:

1. ``write``: a random checkpoint of that shape, in ``--shards`` (>= 3) safetensors shards plus
   ``model.safetensors.index.json``. Tensor names and shapes come from transformers' own model class built on
   the meta device (``--names transformers``, the default: the names a real checkpoint has) or from jaxpref's
   key map (``--names jaxpref``: no torch import, for the test suite); the data, uniform with standard
   deviation 0.02 in the checkpoint dtype, is written shard by shard with ``safetensors.numpy.save_file``.
   One checkpoint serves every parameter dtype of its config.
2. ``measure``: ``jaxpref.models.from_pretrained(dir, param_dtype=...)``, then
   ``jaxpref.models.save_pretrained(model, out_dir, max_shard_size=...)`` into ``--shards`` or more shards. The
   peak RSS of each phase is ``resource.getrusage(RUSAGE_SELF).ru_maxrss``; between the phases the high-water
   mark is reset (``/proc/self/clear_refs``), so the save peak is the save's own (the model is resident
   throughout it). The load peak includes the import baseline, which is reported on its own (RSS after
   ``import jax, jaxpref.models`` and after the first JAX computation). A thread sampling /proc/self/status
   every few milliseconds splits the sampled peak into anonymous memory and mapped file pages (memory-mapped
   safetensors pages that were touched count in the RSS while the mapping is open). Afterwards a few tensors
   of the saved checkpoint are compared with the input through ``safetensors.safe_open``.

The bound is met when the peak RSS is below the bytes of the parameters as held in memory plus 1 GiB: the
checkpoint is never held twice.

  python scripts/check_checkpoint_rss.py                 # Llama-3.2-1B shape, bfloat16 and float32 parameters
  python scripts/check_checkpoint_rss.py --config configs/models/Qwen3-0.6B/config.json --param-dtype bfloat16
  python scripts/check_checkpoint_rss.py --config A/config.json --config B/config.json --json results.json

Llama-3.2-1B with float32 parameters needs about 7 GiB of memory and 8 GiB of disk (``--workdir``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "models" / "Llama-3.2-1B" / "config.json"
GIB = 1024**3
MIB = 1024**2
SLACK = GIB  # the bound: peak RSS < parameter bytes + SLACK


# ---------------------------------------------------------------------------------------------- memory probes


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, ... of this process, in bytes (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def maxrss() -> int:
    """Peak RSS of this process in bytes (``ru_maxrss`` is in KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> None:
    """Reset the RSS high-water mark that ``ru_maxrss`` and VmHWM report (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Sampler:
    """Samples /proc/self/status in a thread; keeps the largest VmRSS seen and its anon/file split."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak: dict[str, int] = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            s = proc_status()
            if s["VmRSS"] > self.peak["VmRSS"]:
                self.peak = {k: s[k] for k in self.peak}
            time.sleep(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------- write worker


def _tensor_names(ckpt: Path, names: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a checkpoint of ckpt/config.json holds, in checkpoint order."""
    if names == "transformers":
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(ckpt)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        return [
            (k, tuple(v.shape))
            for k, v in model.state_dict().items()
            if not (tied and k == "lm_head.weight")  # transformers' save_pretrained drops the tied copy too
        ]
    from jaxpref.models.config import load_model_config
    from jaxpref.models.hf_io import abstract_model, hf_sort_key, tensor_specs

    specs = tensor_specs(abstract_model(load_model_config(ckpt)))
    return sorted(((n, s.hf_shape) for s in specs for n in s.hf_names()), key=lambda t: hf_sort_key(t[0]))


def write_checkpoint(config: Path, out: Path, *, dtype: str, shards: int, names: str, seed: int = 0) -> dict:
    """Write a random checkpoint with ``config``'s shapes into ``out`` in ``shards`` safetensors files."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    out.mkdir(parents=True, exist_ok=True)
    hf = json.loads(config.read_text())
    hf.pop("torch_dtype", None)
    hf["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    tensors = _tensor_names(out, names)
    total = sum(math.prod(shape) for _, shape in tensors) * np_dtype.itemsize
    # Greedy packing in checkpoint order into files of at most total / shards bytes (+ the largest tensor).
    target = math.ceil(total / shards)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        if groups[-1] and size >= target:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += math.prod(shape) * np_dtype.itemsize
    rng = np.random.default_rng(seed)
    weight_map = {}
    for s, group in enumerate(groups):
        fname = f"model-{s + 1:05d}-of-{len(groups):05d}.safetensors"
        arrays = {}
        for name, shape in group:
            x = rng.random(shape, dtype=np.float32)  # uniform(-0.035, 0.035): std 0.02, 5x faster than normal
            x -= 0.5
            x *= 0.07
            arrays[name] = x.astype(np_dtype, copy=False)
            weight_map[name] = fname
        save_file(arrays, out / fname, metadata={"format": "pt"})
        del arrays
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"ckpt_bytes": total, "ckpt_shards": len(groups), "n_tensors": len(tensors), "names": names}


# -------------------------------------------------------------------------------------------- measure worker


def measure(ckpt: Path, out: Path, *, param_dtype: str, shards: int) -> dict:
    """Load ``ckpt`` with jaxpref, save it into ``out``; peak RSS of each phase (run in a fresh process)."""
    r: dict[str, Any] = {"rss_python": proc_status()["VmRSS"]}
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import jaxpref.models

    r["rss_imports"] = proc_status()["VmRSS"]
    jnp.zeros((8,)).block_until_ready()
    r["rss_jax_init"] = proc_status()["VmRSS"]
    r["jax_backend"] = jax.default_backend()

    t0 = time.perf_counter()
    with Sampler() as sampler:
        model = jaxpref.models.from_pretrained(ckpt, param_dtype=param_dtype)
    r["load_s"] = time.perf_counter() - t0
    r["load_peak"] = maxrss()
    r["load_sampled"] = sampler.peak
    r["rss_after_load"] = proc_status()["VmRSS"]
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    r["n_params"] = sum(int(x.size) for x in params)
    r["param_bytes"] = sum(int(x.nbytes) for x in params)

    reset_peak()
    max_shard_size = r["param_bytes"] // shards + 1
    t0 = time.perf_counter()
    with Sampler() as sampler:
        jaxpref.models.save_pretrained(model, out, max_shard_size=max_shard_size)
    r["save_s"] = time.perf_counter() - t0
    r["save_peak"] = maxrss()
    r["save_sampled"] = sampler.peak
    with open(out / "model.safetensors.index.json") as f:
        r["out_shards"] = len(set(json.load(f)["weight_map"].values()))

    # The saved checkpoint holds the loaded values: a few tensors through safetensors' own reader.
    del model, params
    from safetensors import safe_open

    with open(ckpt / "model.safetensors.index.json") as f:
        src_map = json.load(f)["weight_map"]
    with open(out / "model.safetensors.index.json") as f:
        out_map = json.load(f)["weight_map"]
    names = sorted(src_map)
    checked = [names[0], names[len(names) // 2], names[-1], "model.embed_tokens.weight"]
    for name in dict.fromkeys(checked):
        with safe_open(ckpt / src_map[name], "numpy") as f:
            want = f.get_tensor(name).astype(jnp.dtype(param_dtype))
        with safe_open(out / out_map[name], "numpy") as f:
            got = f.get_tensor(name)
        if got.dtype != want.dtype or not np.array_equal(got, want):
            raise SystemExit(f"saved tensor {name} differs from the checkpoint's")
    r["checked_tensors"] = len(dict.fromkeys(checked))
    return r


# -------------------------------------------------------------------------------------------------- driver


def _worker(args: list[str]) -> dict:
    """Run this script as a fresh worker process; its last stdout line is a JSON result."""
    proc = subprocess.run(
        [sys.executable, __file__, *args], cwd=REPO, capture_output=True, text=True, env={**os.environ}
    )
    if proc.returncode != 0:
        raise SystemExit(f"worker {args[:2]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(config: Path, param_dtypes: list[str], *, ckpt_dtype: str | None, shards: int, names: str, workdir: Path):
    """Write one checkpoint for ``config`` and measure it for each parameter dtype; a list of result rows."""
    hf = json.loads(config.read_text())
    ckpt_dtype = ckpt_dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32"
    ckpt = workdir / f"{config.parent.name}-{ckpt_dtype}"
    shutil.rmtree(ckpt, ignore_errors=True)
    t0 = time.perf_counter()
    written = _worker(
        ["--worker", "write", "--config", str(config), "--ckpt", str(ckpt), "--ckpt-dtype", ckpt_dtype]
        + ["--shards", str(shards), "--names", names]
    )
    written["write_s"] = time.perf_counter() - t0
    rows = []
    for param_dtype in param_dtypes:
        out = workdir / f"{ckpt.name}-saved-{param_dtype}"
        shutil.rmtree(out, ignore_errors=True)
        r = _worker(
            ["--worker", "measure", "--ckpt", str(ckpt), "--out", str(out), "--param-dtype", param_dtype]
            + ["--shards", str(shards)]
        )
        shutil.rmtree(out, ignore_errors=True)
        bound = r["param_bytes"] + SLACK
        r.update(written)
        r.update(
            model=config.parent.name,
            config=str(config),
            param_dtype=param_dtype,
            ckpt_dtype=ckpt_dtype,
            bound=bound,
            load_ok=r["load_peak"] < bound,
            save_ok=r["save_peak"] < bound,
        )
        rows.append(r)
    shutil.rmtree(ckpt, ignore_errors=True)
    return rows


def markdown(rows: list[dict]) -> str:
    def gib(b: int) -> str:
        return f"{b / GIB:.2f} GiB"

    def margin(peak: int, bound: int) -> str:
        return f"{(peak - bound) / MIB:+.0f} MiB"

    def split(s: dict) -> str:
        return f"{s['RssAnon'] / GIB:.2f} / {s['RssFile'] / GIB:.2f}"

    head = (
        "| model | params | param dtype | checkpoint | params in memory | baseline: imports / jax init "
        "| load peak RSS | load peak − (params + 1 GiB) | load | save peak RSS (shards) "
        "| save peak − (params + 1 GiB) | save | sampled peak anon / file GiB: load; save | time load / save |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['n_params'] / 1e6:.0f}M | {r['param_dtype']} "
            f"| {r['ckpt_dtype']}, {r['ckpt_shards']} shards, {gib(r['ckpt_bytes'])} | {gib(r['param_bytes'])} "
            f"| {r['rss_imports'] / MIB:.0f} / {r['rss_jax_init'] / MIB:.0f} MiB "
            f"| {gib(r['load_peak'])} | {margin(r['load_peak'], r['bound'])} | {'pass' if r['load_ok'] else 'FAIL'} "
            f"| {gib(r['save_peak'])} ({r['out_shards']}) | {margin(r['save_peak'], r['bound'])} "
            f"| {'pass' if r['save_ok'] else 'FAIL'} | {split(r['load_sampled'])}; {split(r['save_sampled'])} "
            f"| {r['load_s']:.1f} / {r['save_s']:.1f} s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", type=Path, help=f"config.json (repeatable; default {DEFAULT_CONFIG})")
    p.add_argument("--param-dtype", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    p.add_argument("--ckpt-dtype", choices=["bfloat16", "float32"], help="dtype on disk (default: the config's)")
    p.add_argument("--shards", type=int, default=3, help="shards of the written and the saved checkpoint (>= 3)")
    p.add_argument("--names", choices=["transformers", "jaxpref"], default="transformers")
    p.add_argument("--workdir", type=Path, help="where checkpoints are written (default: a temporary directory)")
    p.add_argument("--json", type=Path, help="also write the result rows here")
    p.add_argument("--worker", choices=["write", "measure"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.shards < 3:
        p.error("--shards must be at least 3")

    if a.worker == "write":
        r = write_checkpoint(a.config[0], a.ckpt, dtype=a.ckpt_dtype, shards=a.shards, names=a.names)
        print(json.dumps(r))
        return 0
    if a.worker == "measure":
        print(json.dumps(measure(a.ckpt, a.out, param_dtype=a.param_dtype[0], shards=a.shards)))
        return 0

    rows = []
    with tempfile.TemporaryDirectory(prefix="ckpt-rss-", dir=a.workdir) as tmp:
        for config in a.config or [DEFAULT_CONFIG]:
            rows += check(
                config.resolve(),
                a.param_dtype,
                ckpt_dtype=a.ckpt_dtype,
                shards=a.shards,
                names=a.names,
                workdir=Path(tmp),
            )
    print(markdown(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(r["load_ok"] and r["save_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
