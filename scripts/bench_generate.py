"""Benchmark: new tokens/s of ``jaxpref.generation.generate`` vs transformers' ``generate`` (PyTorch, CPU).

Greedy, float32, 128 new tokens (no stop token: every row runs to the end), prompts of 32 random token
ids, batch 1 and 16, for the demo teacher (demo/teacher) and a random 4-layer d=512 Llama (vocab 32000).
Every (model, engine, batch) runs in its own fresh process. jaxpref: the first call compiles, the
second is timed (compile = first - second); transformers: one short warm-up call, then the timed one.

  python scripts/bench_generate.py [--new_tokens 128] [--batches 1 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PROMPT_LEN = 32


def _random_llama(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=1024, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)


def _prompts(batch: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return rng.integers(3, vocab, (batch, PROMPT_LEN)).tolist()


def worker(engine: str, path: str, batch: int, new_tokens: int) -> dict:
    import json as _json

    vocab = _json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    prompts = _prompts(batch, vocab)
    if engine == "jaxpref":
        from jaxpref.generation import SamplingSettings, generate
        from jaxpref.models import from_pretrained

        model = from_pretrained(path)
        settings = SamplingSettings(max_new_tokens=new_tokens)
        t0 = time.perf_counter()
        generate(model, prompts, settings)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = generate(model, prompts, settings)
        run = time.perf_counter() - t0
        n = sum(map(len, out.tokens))
        return dict(tokens=n, seconds=run, compile_s=first - run)
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ids = torch.tensor(prompts)
    kw = dict(do_sample=False, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        hf.generate(ids, max_new_tokens=4, **kw)
        t0 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        run = time.perf_counter() - t0
    return dict(tokens=int((out.shape[1] - PROMPT_LEN) * batch), seconds=run, compile_s=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--worker", nargs=3, metavar=("ENGINE", "PATH", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        engine, path, batch = args.worker
        print("RESULT " + json.dumps(worker(engine, path, int(batch), args.new_tokens)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        llama = Path(tmp) / "llama-4x512"
        _random_llama(llama)
        models = {"demo teacher (6 x 192, V=512)": REPO / "demo" / "teacher", "Llama 4 x 512, V=32000": llama}
        rows = []
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for name, path in models.items():
            for batch in args.batches:
                result = {}
                for engine in ("jaxpref", "transformers"):
                    cmd = [sys.executable, __file__, "--new_tokens", str(args.new_tokens),
                           "--worker", engine, str(path), str(batch)]
                    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
                    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                    if out.returncode or not line:
                        sys.exit(f"{engine} {name} batch {batch} failed:\n{out.stderr[-3000:]}")
                    result[engine] = json.loads(line[-1][7:])
                j, t = result["jaxpref"], result["transformers"]
                jt, tt = j["tokens"] / j["seconds"], t["tokens"] / t["seconds"]
                rows.append(f"| {name} | {batch} | {jt:,.0f} | {tt:,.0f} | {jt / tt:.1f}x | {j['compile_s']:.1f} |")
                print(rows[-1], file=sys.stderr, flush=True)
    print(f"\nGreedy, float32, CPU ({os.cpu_count()} cores), prompts of {PROMPT_LEN} tokens, "
          f"{args.new_tokens} new tokens per row\n")
    print("| model | batch | jaxpref new tok/s | transformers new tok/s | ratio | jaxpref compile s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
