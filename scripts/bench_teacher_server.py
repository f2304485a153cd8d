"""Benchmark: teacher throughput of ``jaxpref.serve`` at concurrency 1, 8 and 64 vs the in-process pass.

``server-c``: the vLLM API (``/v1/completions``, ``prompt_logprobs``) with c requests in flight;
``sglang-8``: the same server through SGLang's API (``/generate``: lists, no token texts), 8 in flight.

Both run the same teacher over the same rows of token ids and return the top-k (k = 20, vLLM's default
``max_logprobs``) at every position:

* in-process: ``jaxpref.teacher_pass.TeacherRunner`` (what ``python -m jaxpref.teacher`` runs), rows in
  length-sorted batches of ``--batch_rows``, padded to a multiple of 64, ids and log-probs fetched to
  the host;
* server: ``python -m jaxpref.serve`` in its own process on 127.0.0.1 (dynamic batching, bucketed
  passes, the prompt token's log-prob and rank, vLLM's JSON answer) and, in the benchmark's process,
  jaxpref's client (``jaxpref.teacher_client``: one request per ``--batch_rows`` rows, ``c`` requests in
  flight, answers parsed into teacher rows), as a KD run on the same host would use it.

Tokens/s = prompt tokens scored / wall seconds of the second pass over the rows (the first compiles);
CPU seconds are the client's plus the server's.
Each (model, mode) runs in its own fresh process, one after the other.

  python scripts/bench_teacher_server.py --out teacher_server_table.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
K = 20
# name: (model directory or (layers, hidden, vocab) for a random Llama, rows)
MODELS = {"demo-teacher": ("demo/teacher", 256), "4L-d512-v32k": ((4, 512, 32000), 64)}
MODES = ("inprocess", "server-1", "server-8", "server-64", "sglang-8")  # server-c: vLLM's API, sglang-c: SGLang's


def rows(n: int, vocab: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=int(rng.integers(64, 385))).astype(np.int32) for _ in range(n)]


def model_dir(name: str, work: Path) -> Path:
    """The teacher's checkpoint directory (the random one written once into ``work``)."""
    spec, _ = MODELS[name]
    if isinstance(spec, str):
        return REPO / spec
    out = work / name
    if not (out / "config.json").exists():
        from jaxpref import models

        layers, hidden, vocab = spec
        cfg = models.ModelConfig.from_hf_dict({
            "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 4 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 128,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "initializer_range": 0.02,
        })  # fmt: skip
        models.save_pretrained(models.from_config(cfg, seed=0), out)
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(teacher: Path, batch_rows: int, work: Path) -> tuple[subprocess.Popen, str]:
    """``python -m jaxpref.serve`` on 127.0.0.1 in its own process (the demo teacher's tokenizer)."""
    config = work / "serve.yaml"
    config.write_text(f"kd_teacher_model: {teacher}\ntokenizer_config: {REPO / 'demo/teacher'}\nsequence_len: 512\n")
    log = work / "server.log"
    cmd = [sys.executable, "-m", "jaxpref.serve", "--config", str(config), "--port", "0", "--max_top_k", str(K),
           "--max_batch_tokens", str(batch_rows * 512), "--max_model_len", "512"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO)
    for _ in range(1200):
        found = re.search(r"on (http://[0-9.:]+) ", log.read_text())
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    sys.exit(f"the server did not start:\n{log.read_text()}")


def worker(name: str, mode: str, batch_rows: int, work: Path) -> dict:
    from jaxpref import models

    teacher = model_dir(name, work)
    vocab = models.load_model_config(teacher).vocab_size
    data = rows(MODELS[name][1], vocab)
    n, tokens = len(data), sum(len(r) for r in data)
    server = None
    if mode == "inprocess":
        from jaxpref import sharding as shd
        from jaxpref.teacher_pass import TeacherRunner

        runner = TeacherRunner(models.from_pretrained(teacher), shd.make_mesh(None), K, 1.0, batch_rows)
        order = sorted(range(n), key=lambda i: -len(data[i]))

        def one_pass() -> None:
            for s in range(0, n, batch_rows):
                batch = [data[i] for i in order[s : s + batch_rows]]
                t = -(-len(batch[0]) // 64) * 64
                ids = np.zeros((runner.batch_size, t), np.int32)
                lengths = np.zeros(runner.batch_size, np.int64)
                for j, r in enumerate(batch):
                    ids[j, : len(r)], lengths[j] = r, len(r)
                runner(ids, lengths)

    else:
        from jaxpref.teacher_client import ServerSettings, TeacherClient

        server, url = start_server(teacher, batch_rows, work)
        api, concurrency = mode.split("-")
        kind = "sglang" if api == "sglang" else "vllm"
        client = TeacherClient(ServerSettings(base_url=url, server=kind, top_k=K, concurrency=int(concurrency)))

        def one_pass() -> None:
            futures = [client.submit(data[s : s + batch_rows]) for s in range(0, n, batch_rows)]
            for f in futures:
                f.result()

    try:
        one_pass()  # compiles every shape
        server_cpu = cpu_seconds(server.pid) if server else 0.0
        start, cpu = time.perf_counter(), time.process_time()
        one_pass()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        server_cpu = cpu_seconds(server.pid) - server_cpu if server else 0.0
    finally:
        if server:
            server.kill()
    return {"model": name, "mode": mode, "rows": n, "tokens": tokens, "seconds": wall, "cpu_seconds": cpu + server_cpu,
            "tokens_per_s": tokens / wall}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batch_rows", type=int, default=8, help="rows per in-process batch and per request")
    p.add_argument("--out", help="also write the markdown table here")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "jaxpref_bench_teacher_server"))
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch_rows, Path(args.work))))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_kd_step import machine

    Path(args.work).mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.models.split(","):
        for mode in MODES:
            cmd = [sys.executable, __file__, "--worker", name, mode, "--batch_rows", str(args.batch_rows),
                   "--work", args.work]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
            if out.returncode:
                sys.exit(f"{name} {mode} failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    lines = [
        f"Machine: {machine()}; k = {K}, {args.batch_rows} rows per batch / request.",
        "",
        "| model | mode | rows | tokens | tokens/s | vs in-process | CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = next(x for x in results if x["model"] == r["model"] and x["mode"] == "inprocess")
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['rows']} | {r['tokens']} | {r['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {r['cpu_seconds']:.1f} |"
        )
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
