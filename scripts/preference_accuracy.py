"""Task accuracy by generation on the preference demo: held-out exact match per task, before and after.

The preference demo (demo/data/pref_*: sort the digits of a number, or the letters of a made-up word) is
scored by jaxpref's greedy decoding (``jaxpref.eval_generation``) of the 200 held-out intel prompts
(``pref_intel_eval.jsonl``, held out from every training file; about half carry a system prompt), read
through ``chatml.intel`` exactly as the DPO loss reads them; the reference is the chosen (sorted)
answer. Per seed, four models:

* ``random init``: demo/tiny-llama initialised with the seed (every run below but DPO starts here);
* ``SFT``: ``configs/sft_pref.yaml`` (SFT on the chosen answers of the pairs configs/dpo.yaml trains on);
* ``SFT -> DPO``: ``configs/dpo.yaml`` with ``base_model`` = the SFT model (reference = the SFT model),
  at the config's learning rate (1e-3, set for a random-init start) and at each ``--dpo_learning_rates``;
* ``ORPO``: ``configs/orpo.yaml`` from random init, on configs/dpo.yaml's training pairs and eval set
  (ORPO's NLL term on the chosen answer teaches it to answer; ``--no_orpo`` skips it).

Each training run is a fresh ``python -m jaxpref.train`` process; the scores are computed here. The
defaults take about 6 minutes per seed on a 2-core CPU.

    python scripts/preference_accuracy.py [--seeds 0 1] [--sft_steps 400] [--dpo_steps 100]
        [--dpo_learning_rates 1e-4] [--orpo_steps 600] [--no_orpo] [--out DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
EVAL_FILE = REPO / "demo" / "data" / "pref_intel_eval.jsonl"
MAX_NEW_TOKENS = 12  # answers are at most 7 characters (+ <|im_end|>)


def task_of(row: dict[str, Any]) -> str:
    return "digits" if row["question"].startswith("Sort the digits") else "letters"


def write_config(name: str, out: Path, **changes: Any) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    cfg.update(output_dir=str(out), use_tensorboard=False, save_steps=10**6, resume_from_checkpoint=None, **changes)
    for key in ("datasets", "test_datasets"):
        for entry in cfg.get(key) or []:
            entry["path"] = str(REPO / entry["path"])  # an absolute path stays as it is
    cfg["base_model"] = str(REPO / cfg["base_model"])
    path = out.with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train(name: str, out: Path, **changes: Any) -> dict[str, Any]:
    """Run ``configs/<name>.yaml`` with ``changes`` into ``out``; its last eval metrics and wall time."""
    start = time.perf_counter()
    path = write_config(name, out, **changes)
    subprocess.run([sys.executable, "-m", "jaxpref.train", "--config", str(path), "--no_progress"], check=True,
                   cwd=REPO, stdout=subprocess.DEVNULL)  # fmt: skip
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in logged if m["split"] == "eval"]
    return {"seconds": round(time.perf_counter() - start, 1), "last_eval": evals[-1] if evals else {}}


class Scorer:
    """Greedy exact match per task on the held-out intel prompts, prompts as configs/dpo.yaml's eval reads them."""

    def __init__(self) -> None:
        from jaxpref.config import load_config
        from jaxpref.data import DataSettings, load_tokenizer
        from jaxpref.eval_generation import build_generation_eval

        tmp = Path(tempfile.mkdtemp(prefix="pref_acc_cfg_"))
        n = sum(1 for _ in EVAL_FILE.open())
        cfg = load_config(write_config("dpo", tmp / "eval", eval_generation={"samples": n,
                                                                            "max_new_tokens": MAX_NEW_TOKENS}))
        settings = DataSettings.from_config(cfg)
        self.evaluate = build_generation_eval(cfg.eval_generation, settings, load_tokenizer(settings))
        assert len(self.evaluate.rows) == n, "every held-out row is scored"

    def __call__(self, model: Any) -> dict[str, Any]:
        completions = self.evaluate.completions(model)
        scores = self.evaluate.scores(completions)
        per_task: dict[str, list[int]] = {}
        wrong: dict[str, list[str]] = {}
        for row, completion, score in zip(self.evaluate.rows, completions, scores):
            counts = per_task.setdefault(task_of(row), [0, 0])
            counts[0] += int(score)
            counts[1] += 1
            if not score and len(wrong.setdefault(task_of(row), [])) < 3:
                wrong[task_of(row)].append(f"{row['question']} -> {completion.strip()!r} (want {row['chosen']})")
        correct, total = sum(c for c, _ in per_task.values()), sum(n for _, n in per_task.values())
        result: dict[str, Any] = {t: f"{c}/{n}" for t, (c, n) in sorted(per_task.items())}
        result.update(all=f"{correct}/{total}", accuracy=round(correct / total, 4), wrong=wrong)
        return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--sft_steps", type=int, default=400)
    p.add_argument("--dpo_steps", type=int, default=100)
    p.add_argument("--dpo_learning_rates", type=float, nargs="*", default=[1e-4],
                   help="DPO runs from the SFT model besides the one at configs/dpo.yaml's learning rate")  # fmt: skip
    p.add_argument("--orpo_steps", type=int, default=600)
    p.add_argument("--no_orpo", action="store_true")
    p.add_argument("--out", type=Path, help="run directory (default: a new temp dir)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    from jaxpref import models

    out = args.out or Path(tempfile.mkdtemp(prefix="pref_acc_"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    score = Scorer()
    dpo = yaml.safe_load((REPO / "configs" / "dpo.yaml").read_text())
    results: list[dict[str, Any]] = []

    def report(seed: int, model_name: str, model: Any, run: dict[str, Any] | None = None) -> None:
        row = {"seed": seed, "model": model_name, **score(model)}
        if run is not None:
            row["train_seconds"] = run["seconds"]
            row["last_eval"] = {k: round(v, 4) for k, v in run["last_eval"].items() if isinstance(v, float)}
        results.append(row)
        print(json.dumps(row), flush=True)

    for seed in args.seeds:
        config = models.load_model_config(str(REPO / "demo" / "tiny-llama"))
        report(seed, "random init", models.from_config(config, seed=seed))
        sft_dir = out / f"sft_seed{seed}"
        run = train("sft_pref", sft_dir, seed=seed, max_steps=args.sft_steps, eval_steps=args.sft_steps,
                    warmup_steps=max(1, args.sft_steps // 10))  # fmt: skip
        report(seed, f"SFT ({args.sft_steps} steps)", models.from_pretrained(str(sft_dir)), run)
        for lr in [dpo["learning_rate"], *args.dpo_learning_rates]:
            dpo_dir = out / f"dpo_lr{lr:g}_seed{seed}"
            run = train("dpo", dpo_dir, seed=seed, max_steps=args.dpo_steps, eval_steps=args.dpo_steps,
                        learning_rate=lr, base_model=str(sft_dir), random_init_weights=False)  # fmt: skip
            report(seed, f"SFT -> DPO ({args.dpo_steps} steps, lr {lr:g})", models.from_pretrained(str(dpo_dir)), run)
        if not args.no_orpo:
            orpo_dir = out / f"orpo_seed{seed}"
            run = train("orpo", orpo_dir, seed=seed, max_steps=args.orpo_steps, eval_steps=args.orpo_steps,
                        warmup_steps=max(1, args.orpo_steps // 10), datasets=dpo["datasets"],
                        test_datasets=dpo["test_datasets"])  # fmt: skip
            report(seed, f"ORPO ({args.orpo_steps} steps, random init)", models.from_pretrained(str(orpo_dir)), run)
    summary = {"seconds": round(time.perf_counter() - started, 1), "out": str(out), "results": results}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}))


if __name__ == "__main__":
    main()
