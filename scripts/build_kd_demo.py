"""Rebuild the knowledge-distillation demo from scratch with jaxpref's own commands (offline, CPU).

    python scripts/build_kd_demo.py [--steps all|tasks|teacher|kd_data|accuracy]

Steps, in order (each reads what the previous one wrote):

1. ``tasks``: ``demo/data/kd_tasks_train.jsonl`` (8000 rows) and ``demo/data/kd_tasks_eval.jsonl``
   (200 rows, prompts disjoint from train): chat rows of a synthetic task mix chosen so that a
   2.5M-parameter model learns it on a CPU in minutes: adding two numbers below 100, sorting 3-6 digits,
   counting a letter in a word, reversing a word (the word list of ``scripts/build_demo_assets.py``).
   Deterministic (seeded); byte-identical on every run.
2. ``teacher``: ``python -m jaxpref.train --config configs/teacher_sft.yaml`` (SFT from random init,
   the student's tokenizer), then the exported model is re-saved in bfloat16 (half the bytes) with the
   tokenizer as ``demo/teacher/``.
3. ``kd_data``: ``python -m jaxpref.teacher --config configs/kd_teacher.yaml`` twice: the teacher's
   top-16 log-probs over the first 2000 training rows -> ``demo/data/kd_train/`` and over the eval rows
   -> ``demo/data/kd_eval/`` (format (b) parquet, token-aligned).
4. ``accuracy``: greedy decoding of the eval prompts with ``transformers`` (an independent
   implementation loading ``demo/teacher/``): exact-match accuracy per task ->
   ``demo/teacher/accuracy.json``.

The teacher training is the slow step (300 steps; 34 minutes on a shared 2-core CPU); it is deterministic for a
given machine, but XLA's CPU floating point is not bit-identical across machines, so the rebuilt
weights (and hence the KD data) match the shipped ones statistically, not byte for byte.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from build_demo_assets import SYSTEM_PROMPTS, WORDS, write_jsonl  # noqa: E402

DATA = REPO / "demo" / "data"
TEACHER = REPO / "demo" / "teacher"
N_TRAIN = 8000
N_EVAL = 200
N_KD_TRAIN = 2000


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return rng.choice([f"Compute {a}+{b}", f"What is {a}+{b}?", f"{a}+{b}=?"]), f"{a}+{b}={a + b}"


def _sort_digits(rng: random.Random) -> tuple[str, str]:
    d = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 6)))
    return f"Sort the digits {d}", "".join(sorted(d))


def _count(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    ch = rng.choice(w) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    return f"How many times does {ch} appear in {w}?", str(w.count(ch))


def _reverse(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return rng.choice([f"Reverse the word {w}", f"Spell {w} backwards"]), w[::-1]


TASKS = {"add": (_add, 4), "sort": (_sort_digits, 3), "count": (_count, 2), "reverse": (_reverse, 1)}


def task_of(prompt: str) -> str:
    """The task name of a user prompt written by this script."""
    if prompt.startswith("Sort"):
        return "sort"
    if prompt.startswith("How many"):
        return "count"
    if prompt.startswith(("Reverse", "Spell")):
        return "reverse"
    return "add"


def make_rows(rng: random.Random, n: int, exclude: set[str]) -> list[dict]:
    """``n`` chat rows whose user prompts are unique and not in ``exclude`` (which is updated).

    A task whose prompts are used up (reverse: 2 templates x the word list) is simply drawn less.
    """
    funcs = [f for f, w in TASKS.values() for _ in range(w)]
    rows: list[dict] = []
    while len(rows) < n:
        prompt, answer = rng.choice(funcs)(rng)
        if prompt in exclude:
            continue
        exclude.add(prompt)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.1:
            messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        rows.append({"messages": messages})
    return rows


def build_tasks(seed: int = 1) -> None:
    rng = random.Random(seed)
    seen: set[str] = set()
    eval_rows = make_rows(rng, N_EVAL, seen)  # eval first, so every task has held-out prompts
    train = make_rows(rng, N_TRAIN, seen)
    write_jsonl(DATA / "kd_tasks_train.jsonl", train)
    write_jsonl(DATA / "kd_tasks_eval.jsonl", eval_rows)
    print(f"wrote {DATA / 'kd_tasks_train.jsonl'} ({len(train)} rows), kd_tasks_eval.jsonl ({len(eval_rows)} rows)")


def _python() -> str:
    return sys.executable


def run(args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    print("+", " ".join(args), flush=True)
    subprocess.run(args, cwd=REPO, env=env, check=True)


def build_teacher(out: Path = REPO / "outputs" / "demo-teacher") -> None:
    shutil.rmtree(out, ignore_errors=True)
    run(
        [_python(), "-m", "jaxpref.train", "--config", "configs/teacher_sft.yaml", "--no_progress", f"output_dir={out}"]
    )
    export_teacher(out)


def export_teacher(out: Path) -> None:
    """``demo/teacher/``: the trained model of ``out`` in bfloat16 (half the bytes) plus its tokenizer."""
    import jax.numpy as jnp
    from transformers import AutoTokenizer

    from jaxpref import models

    shutil.rmtree(TEACHER, ignore_errors=True)
    model = models.from_pretrained(str(out))
    models.save_pretrained(model, TEACHER, dtype=jnp.bfloat16)
    AutoTokenizer.from_pretrained(str(out), local_files_only=True).save_pretrained(TEACHER)
    print(f"wrote {TEACHER}")


def build_kd_data() -> None:
    for split in ("train", "eval"):
        shutil.rmtree(DATA / f"kd_{split}", ignore_errors=True)
    run([_python(), "-m", "jaxpref.teacher", "--config", "configs/kd_teacher.yaml"])
    run(
        [
            _python(),
            "-m",
            "jaxpref.teacher",
            "--config",
            "configs/kd_teacher.yaml",
            "datasets.0.path=demo/data/kd_tasks_eval.jsonl",
            "datasets.0.split=train",
            "teacher_output_dir=demo/data/kd_eval",
        ]
    )


def greedy_accuracy(model_dir: Path, rows: list[dict], max_new_tokens: int = 12) -> dict[str, dict]:
    """Exact-match accuracy of greedy answers per task, decoded by jaxpref's own sampler
    (``jaxpref.generation``: greedy equals transformers' ``generate``, tests/generation/test_sampler.py)."""
    from transformers import AutoTokenizer

    from jaxpref import models
    from jaxpref.generation import SamplingSettings, generate

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    prompts = [row["messages"][:-1] for row in rows]
    ids = [tok.apply_chat_template(p, add_generation_prompt=True, return_dict=True)["input_ids"] for p in prompts]
    settings = SamplingSettings(max_new_tokens=max_new_tokens, stop_token_ids=(tok.eos_token_id,))
    result = generate(models.from_pretrained(str(model_dir)), ids, settings, batch_size=64)
    stats: dict[str, dict] = {}
    examples: dict[str, list] = {}
    for prompt, row, tokens in zip(prompts, rows, result.tokens):
        answer = row["messages"][-1]["content"]
        got = tok.decode(tokens, skip_special_tokens=True).strip()
        task = task_of(prompt[-1]["content"])
        s = stats.setdefault(task, {"n": 0, "correct": 0})
        s["n"] += 1
        s["correct"] += int(got == answer)
        if got != answer and len(examples.setdefault(task, [])) < 3:
            examples[task].append({"prompt": prompt[-1]["content"], "expected": answer, "got": got})
    total = {"n": sum(s["n"] for s in stats.values()), "correct": sum(s["correct"] for s in stats.values())}
    for s in [*stats.values(), total]:
        s["accuracy"] = round(s["correct"] / s["n"], 4)
    return {"per_task": dict(sorted(stats.items())), "all": total, "wrong_examples": examples}


def build_accuracy() -> None:
    rows = [json.loads(line) for line in (DATA / "kd_tasks_eval.jsonl").read_text().splitlines()]
    acc = greedy_accuracy(TEACHER, rows)
    (TEACHER / "accuracy.json").write_text(json.dumps(acc, indent=2) + "\n")
    print(json.dumps(acc["per_task"]), json.dumps(acc["all"]))


STEPS = {"tasks": build_tasks, "teacher": build_teacher, "kd_data": build_kd_data, "accuracy": build_accuracy}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", nargs="+", default=["all"], choices=["all", *STEPS])
    args = parser.parse_args(argv)
    for name, step in STEPS.items():
        if "all" in args.steps or name in args.steps:
            step()
    return 0


if __name__ == "__main__":
    sys.exit(main())
