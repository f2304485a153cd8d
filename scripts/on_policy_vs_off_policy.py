"""On-policy (GKD) vs off-policy KD on the shipped demo: held-out exact match and KL after the same steps.

The KD demo (configs/kd.yaml: demo/tiny-llama random init, student of demo/teacher) with the teacher run
in the train step (kd_teacher_model: demo/teacher, top-16) on the demo's chat rows, once per
kd_on_policy_ratio; each run ends with an evaluation: held-out kd_loss (KL to the teacher's top-16) and
greedy exact match on the first N held-out prompts (eval_generation). Each run is a fresh process.

    python scripts/on_policy_vs_off_policy.py [--steps 100] [--ratios 0 0.5 1] [--seed 0] [--samples 100]
        [--student DIR --learning_rate 1e-3]     # from a trained (e.g. SFT-warmed) student
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def config(out: Path, ratio: float, args: argparse.Namespace) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "kd.yaml").read_text())
    for entry in [*cfg["datasets"], *cfg["test_datasets"]]:  # plain chat rows: the teacher runs in the step
        for key in ("logprobs_field", "temperature", "logprobs_alignment"):
            entry.pop(key, None)
        entry["data_files"] = [str(REPO / f) for f in entry["data_files"]] if isinstance(
            entry["data_files"], list) else str(REPO / entry["data_files"])
    cfg["datasets"][0]["split"] = f"train[:{args.rows}]"
    if args.student:  # a trained student (e.g. an SFT warm start, as GKD assumes) instead of random init
        cfg["random_init_weights"] = False
    cfg.update(
        base_model=str(args.student or REPO / "demo" / "tiny-llama"),
        kd_teacher_model=str(REPO / "demo" / "teacher"),
        kd_teacher_top_k=16,
        sequence_len=128,
        max_steps=args.steps,
        warmup_steps=max(1, args.steps // 10),
        seed=args.seed,
        output_dir=str(out),
        logging_steps=max(1, args.steps // 10),
        eval_steps=args.steps,
        save_steps=10**6,
        use_tensorboard=False,
        kd_on_policy_ratio=ratio,
        kd_on_policy_max_new_tokens=args.max_new_tokens,
        eval_generation={"samples": args.samples, "max_new_tokens": 24},
    )
    if args.learning_rate:
        cfg["learning_rate"] = args.learning_rate
    cfg.update({k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set or ())})
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=500)
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="more config keys for every run (kd_beta=0.5)")
    p.add_argument("--student", help="start from this model directory (default: demo/tiny-llama, random init)")
    p.add_argument("--learning_rate", type=float, help="instead of kd.yaml's 3e-3 (lower for a trained student)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="on_policy_"))
    rows = []
    for ratio in args.ratios:
        out = tmp / f"ratio{ratio}"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "jaxpref.train", "--config", str(config(out, ratio, args)),
                        "--no_progress"], check=True, cwd=REPO)
        seconds = time.perf_counter() - start
        logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        last_eval = [m for m in logged if m["split"] == "eval"][-1]
        train = [m for m in logged if m["split"] == "train"]
        share = sum(m.get("sampling_seconds", 0.0) for m in train) / max(sum(m["step_time"] for m in train), 1e-9)
        rows.append({
            "ratio": ratio,
            "eval_kd_loss": last_eval.get("kd_loss"),
            "eval_exact_match": last_eval.get("generation_exact_match"),
            "seconds": round(seconds, 1),
            "sampling_share_of_logged_steps": round(share, 3),
        })
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"steps": args.steps, "seed": args.seed, "rows": args.rows, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
