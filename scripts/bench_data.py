"""Benchmark: rows/s and tokens/s of the data pipelines against the train step of the embedded default.

  python scripts/bench_data.py                       # KD (formats a and b), DPO, and a 40-step trainer run
  python scripts/bench_data.py --rows 50 --train-tokens-per-second 7000   # skip the trainer run
  python scripts/bench_data.py --processes 1 --stream-cases ""            # one process, nothing streamed

Cases (synthetic rows, the demo tokenizer ``demo/tiny-llama``, chatml):

* KD: about 1k-token conversations with teacher top-32 per token (every 5th position carries a 33rd,
  least likely entry, as vLLM returns it), JSON lines in format (a) (``{"token": "token_id:N",
  "logprob": x}`` lists) and (b) (``target_token_ids`` + ``logprobs``), packed into 2048-token sequences;
* DPO: ``chatml.intel`` pairs (prompt about 300 tokens, completions about 350), ``rl: dpo``.

Per case, with ``dataset_processes`` 1: ``JSON -> Arrow`` = ``datasets`` reading the JSON lines file
into its cache (once per file); ``prepare`` = ``build_*_data`` after that, without a prepared-data
cache (format, tokenize, KD targets, shift, filter, pack); ``batches`` = one epoch of micro-batches
from it; ``from cache`` = ``build_*_data`` again with ``dataset_prepared_path`` holding the
``python -m jaxpref.preprocess`` result, plus one epoch of batches (what a training run does after
preprocessing). With ``dataset_processes`` N > 1 (``--processes``): prepare and batches again, with
every row mapped in the worker processes (``workers.PROBE_ROWS = 0``, ``WORKER_MIN_SECONDS = 0``; a
run maps 32 rows in its own thread first and starts workers only when the rest would take at least
``WORKER_MIN_SECONDS`` there), start-up included; the start-up (the extra time of the first 2 x N
rows in workers) and the rate after it are given with the case.
``streamed`` (``--stream-cases``): the same file with ``streaming: true``, build + one pass of
micro-batches (read, format, tokenize, pack, batch: there is no separate prepare step, and no
JSON -> Arrow conversion). Rates are kept rows and kept tokens (template tokens included) per second
of wall time. The trainer rate is the median ``tokens_per_second`` of ``metrics.jsonl`` (logged every
10 steps, the first interval, with compilation, left out) of ``configs/sft.yaml`` run for
``--train-steps`` steps.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEMO = REPO / "demo" / "tiny-llama"
TOP_K = 32
WORDS = ["the", "a", "of", "to", "and", "in", "is", "it", "you", "that", "he", "was", "for", "on", "are",
         "with", "as", "his", "they", "be", "at", "one", "have", "this", "from"]


def _text(rng: np.random.Generator, tokenizer: Any, tokens: int) -> str:
    """Random words with about ``tokens`` tokens."""
    words = rng.choice(WORDS, size=tokens).tolist()
    text = " ".join(words)
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return " ".join(words[: max(1, int(len(words) * tokens / n))])


def _teacher_rows(rng: np.random.Generator, tokens: list[int], vocab: int) -> tuple[list, list]:
    """Token-aligned top-K (every 5th position K+1) ids and log-probs, with the leading null row."""
    ids_rows, lp_rows = [None], [None]
    for i in range(1, len(tokens)):
        k = TOP_K + (i % 5 == 0)
        ids = rng.choice(vocab, size=k, replace=False)
        lps = np.sort(rng.normal(-6.0, 2.0, size=k))[::-1] - 0.1
        ids_rows.append(ids.tolist())
        lp_rows.append(lps.tolist())
    return ids_rows, lp_rows


def write_kd_rows(path: Path, fmt: str, rows: int, tokenizer: Any, seed: int = 0) -> None:
    from jaxpref.data.formats.kd import kd_row

    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            messages = [
                {"role": "user", "content": _text(rng, tokenizer, 100)},
                {"role": "assistant", "content": _text(rng, tokenizer, 880)},
            ]
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids_rows, lp_rows = _teacher_rows(rng, tokens, len(tokenizer))
            if fmt == "b":
                row = kd_row(messages, ids_rows, lp_rows)
            else:
                entries = [
                    None if ids is None else [{"token": f"token_id:{t}", "logprob": x} for t, x in zip(ids, lps)]
                    for ids, lps in zip(ids_rows, lp_rows)
                ]
                row = {"messages": messages, "logprobs": entries}
            f.write(json.dumps(row) + "\n")


def write_dpo_rows(path: Path, rows: int, tokenizer: Any, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            row = {
                "system": _text(rng, tokenizer, 20),
                "question": _text(rng, tokenizer, 280),
                "chosen": _text(rng, tokenizer, 350),
                "rejected": _text(rng, tokenizer, 350),
            }
            f.write(json.dumps(row) + "\n")


def _config(data: Path, work: Path, **kw: Any) -> Any:
    from jaxpref.config import validate_config

    cfg = {
        "base_model": str(DEMO),
        "chat_template": "chatml",
        "learning_rate": 1e-3,
        "micro_batch_size": 8,
        "output_dir": str(work / "out"),
        **kw,
    }
    cfg["datasets"] = [{"path": str(data), **cfg.pop("entry")}]
    return validate_config(cfg)


def measure(name: str, cfg: Any, build: Any, work: Path) -> dict[str, Any]:
    """Time the JSON -> Arrow load, prepare, one epoch of batches, and the cached path."""
    from jaxpref.data import DataSettings, load_tokenizer
    from jaxpref.data.sources import load_entries
    from jaxpref.preprocess import preprocess

    tokenizer = load_tokenizer(DataSettings.from_config(cfg))
    t0 = time.perf_counter()
    load_entries(cfg.datasets)  # JSON -> Arrow, once per file (the datasets cache keeps it)
    t_load = time.perf_counter() - t0
    result = measure_processes(name, cfg, build, 1)
    cached = cfg.model_copy(update={"dataset_prepared_path": str(work / f"prepared-{name}")})
    with open(os.devnull, "w") as devnull:
        preprocess(cached, out=devnull)
    t0 = time.perf_counter()
    hit = build(cached, tokenizer)
    n = sum(1 for _ in hit.train_iterator(1))
    t_cached = time.perf_counter() - t0
    assert n == result["batches"]
    return {**result, "load_s": t_load, "cached_s": t_cached}


def measure_processes(name: str, cfg: Any, build: Any, processes: int) -> dict[str, Any]:
    """Prepare + one epoch of batches with ``dataset_processes`` = ``processes`` (workers forced on).

    With workers, ``startup_s`` = the extra time of preparing the first ``2 * processes`` rows in workers
    rather than in this process (spawn, imports, unpickling the pipeline).
    """
    from jaxpref.data import DataSettings, load_tokenizer, workers

    tokenizer = load_tokenizer(DataSettings.from_config(cfg))
    cfg = cfg.model_copy(update={"dataset_processes": processes})
    workers.PROBE_ROWS, workers.WORKER_MIN_SECONDS = 0, 0.0  # every row through the workers
    t0 = time.perf_counter()
    data = build(cfg, tokenizer)
    t_prepare = time.perf_counter() - t0
    t0 = time.perf_counter()
    batches = sum(1 for _ in data.train_iterator(1))
    t_batches = time.perf_counter() - t0
    rep = data.report
    out = {
        "case": name if processes == 1 else f"{name}, {processes} processes",
        "rows": rep.rows_out,
        "tokens": rep.tokens,
        "dropped": rep.rows_dropped,
        "batches": batches,
        "prepare_s": t_prepare,
        "batches_s": t_batches,
    }
    if processes > 1:
        path = Path(cfg.datasets[0].path)
        head = path.with_name(f"head-{path.name}")
        with open(path) as f, open(head, "w") as g:
            g.writelines(line for _, line in zip(range(2 * processes), f))
        small = cfg.model_copy(update={"datasets": [cfg.datasets[0].model_copy(update={"path": str(head)})]})
        times = []
        for p in (1, processes):
            t0 = time.perf_counter()
            build(small.model_copy(update={"dataset_processes": p}), tokenizer)
            times.append(time.perf_counter() - t0)
        out["startup_s"] = times[1] - times[0]
    return out


def measure_streaming(name: str, cfg: Any, build: Any) -> dict[str, Any]:
    """Build + one pass of micro-batches over the same file with ``streaming: true``."""
    from jaxpref.data import DataSettings, load_tokenizer

    tokenizer = load_tokenizer(DataSettings.from_config(cfg))
    entry = cfg.datasets[0].model_copy(update={"streaming": True})
    cfg = cfg.model_copy(update={"datasets": [entry], "max_steps": 1})
    t0 = time.perf_counter()
    data = build(cfg, tokenizer)
    it = data.train_iterator(1)
    next(it)
    t_first = time.perf_counter() - t0
    batches = 1 + sum(1 for _ in it)
    t_all = time.perf_counter() - t0
    rep = data.report
    return {"case": f"{name}, streamed", "rows": rep.rows_out, "tokens": rep.tokens, "dropped": rep.rows_dropped,
            "batches": batches, "stream_s": t_all, "first_batch_s": t_first}


def train_tokens_per_second(steps: int, work: Path) -> float:
    """Median tokens/s of the embedded default's train step (logged every 10 steps, first interval left out)."""
    from jaxpref.config import load_config
    from jaxpref.train import run

    cfg = load_config(
        REPO / "configs" / "sft.yaml",
        [f"max_steps={steps}", f"output_dir={work / 'sft'}", "logging_steps=10", f"eval_steps={10 * steps}",
         f"save_steps={10 * steps}", "resume_from_checkpoint=null"],
    )
    run(cfg, show_progress=False)
    rows = [json.loads(line) for line in (work / "sft" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_second"] for r in rows if r["split"] == "train" and r["step"] > 10]
    return statistics.median(rates)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"


def table(results: list[dict[str, Any]], train_tps: float) -> str:
    lines = [
        "| case | rows | tokens | JSON -> Arrow (s, once) | prepare: rows/s | prepare: tokens/s | batches: tokens/s "
        "| prepare + batches: tokens/s | x train step | same + JSON -> Arrow: x train step "
        "| from cache + batches: tokens/s | x train step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "todo" in r:
            lines.append(f"| {r['case']} | TODO: {r['todo']} | | | | | | | | | | |")
            continue
        if "stream_s" in r:  # read, format, pack and batch in one pass: no prepare step, no Arrow cache
            total = r["tokens"] / r["stream_s"]
            lines.append(
                f"| {r['case']} (first batch after {r['first_batch_s']:.1f} s) | {r['rows']} | {r['tokens']:,} | - "
                f"| - | - | - | {total:,.0f} | {total / train_tps:.1f} | {total / train_tps:.1f} | - | - |"
            )
            continue
        total = r["tokens"] / (r["prepare_s"] + r["batches_s"])
        cells = [f"{r['load_s']:.1f}" if "load_s" in r else "-", f"{r['rows'] / r['prepare_s']:.1f}",
                 f"{r['tokens'] / r['prepare_s']:,.0f}", f"{r['tokens'] / r['batches_s']:,.0f}", f"{total:,.0f}",
                 f"{total / train_tps:.1f}"]
        if "load_s" in r:
            first = r["tokens"] / (r["load_s"] + r["prepare_s"] + r["batches_s"])
            cached = r["tokens"] / r["cached_s"]
            cells += [f"{first / train_tps:.1f}", f"{cached:,.0f}", f"{cached / train_tps:.1f}"]
        else:
            cells += ["-", "-", "-"]
        case = r["case"]
        if "startup_s" in r:
            steady = r["rows"] / max(1e-9, r["prepare_s"] - r["startup_s"])
            case += f" (start-up {r['startup_s']:.1f} s, then {steady:.0f} rows/s)"
        lines.append(f"| {case} | {r['rows']} | {r['tokens']:,} | " + " | ".join(cells) + " |")
    lines.append(f"| train step, configs/sft.yaml (8 x 256) | | | | | | | {train_tps:,.0f} | 1.0 | | | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100, help="rows per case")
    p.add_argument("--cases", default="kd-a,kd-b,dpo")
    p.add_argument("--processes", default="1,2", help="dataset_processes values (1 = the full single-process row)")
    p.add_argument("--stream-cases", default="kd-a,kd-b,dpo", help="cases also measured with streaming: true")
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--train-tokens-per-second", type=float, default=None, help="skip the trainer run")
    p.add_argument("--json", default=None, help="also write the raw results here")
    args = p.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = tempfile.TemporaryDirectory()
    os.environ["HF_DATASETS_CACHE"] = os.path.join(tmp.name, "hf")  # before datasets is imported
    import logging

    logging.basicConfig(level=logging.WARNING)
    import datasets

    datasets.disable_progress_bars()
    from jaxpref.data import DataSettings, build_lm_data, load_tokenizer

    machine = _machine()
    with tmp:
        work = Path(tmp.name)
        base = _config(work / "x.jsonl", work, entry={"type": "chat_template"})
        tokenizer = load_tokenizer(DataSettings.from_config(base))
        results = []
        processes = [int(p) for p in args.processes.split(",") if p]
        streamed = [c for c in args.stream_cases.split(",") if c]
        for case in args.cases.split(","):
            print(f"running {case} ...", file=sys.stderr, flush=True)
            data = work / f"{case}.jsonl"
            if case.startswith("kd-"):
                write_kd_rows(data, case[-1], args.rows, tokenizer)
                cfg = _config(data, work, entry={"type": "chat_template"}, kd_trainer=True, sequence_len=2048,
                              sample_packing=True, micro_batch_size=4)
                build = lambda c, tok: build_lm_data(DataSettings.from_config(c), tok)  # noqa: E731
            elif case == "dpo":
                from jaxpref.data.preference import build_preference_data

                write_dpo_rows(data, args.rows, tokenizer)
                cfg = _config(data, work, entry={"type": "chatml.intel"}, rl="dpo", sequence_len=1024)
                build = lambda c, tok: build_preference_data(DataSettings.from_config(c), tok)  # noqa: E731
            else:
                raise SystemExit(f"unknown case {case!r}")
            runs = [functools.partial(measure, case, cfg, build, work)] if 1 in processes else []
            runs += [functools.partial(measure_processes, case, cfg, build, p) for p in processes if p > 1]
            if case in streamed:
                runs.append(functools.partial(measure_streaming, case, cfg, build))
            for run in runs:
                results.append(run())
                print(f"  {json.dumps(results[-1])}", file=sys.stderr, flush=True)
        train_tps = args.train_tokens_per_second
        if train_tps is None:
            print(f"running the trainer ({args.train_steps} steps) ...", file=sys.stderr, flush=True)
            train_tps = train_tokens_per_second(args.train_steps, work)
    print(f"\nMachine: {machine} at start; load average {os.getloadavg()[0]:.1f} at end.\n")
    print(table(results, train_tps))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "train_tokens_per_second": train_tps}, indent=1))


if __name__ == "__main__":
    main()
