"""Benchmark: one DPO train step (policy + frozen reference), jaxpref vs TRL's DPOTrainer.

Both are full fine-tunes of the same random-init Llama checkpoint with a frozen reference copy
(``precompute_ref_log_probs`` off), sigmoid loss, beta 0.1, AdamW, gradient clipping 1.0, on the same
pairs: every pair is a P-token prompt plus a completion, chosen and rejected each exactly ``seq_len``
tokens (EOS included), so both implementations see [2 x pairs, seq_len] sequences.

* TRL: ``trl.DPOTrainer(model, ref_model=None, args=DPOConfig(...), train_dataset, processing_class)``
  and ``trainer.train()``; a word-level tokenizer with one word per id (``t0`` ... ``t31999``) turns
  the pairs into text that tokenizes back to exactly the same ids. Step times come from a callback
  (``on_step_begin`` -> ``on_step_end``: forward of policy and reference, backward, clip, AdamW).
* jaxpref: a validated config (``rl: dpo``), ``build_objective(cfg, "dpo")``, the reference built by
  ``jaxpref.assembly.build_companions``, AdamW from ``jaxpref.optim``, ``Trainer.train_step`` on the pair
  batch in the pipeline's layout (docs/design.md "Batches").

Each (config, implementation) runs in its own fresh subprocess, one after the other; peak memory is
the process's peak RSS. First-step losses are printed as a check that both compute the same thing.

  python scripts/bench_dpo_step.py                       # small and large
  python scripts/bench_dpo_step.py --configs large --steps 3 --out dpo_table.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kd_step as kd  # noqa: E402  (model config, checkpoint writer, machine line)

# name: (layers, pairs, seq_len, prompt_len)
CONFIGS = {"small": (4, 2, 256, 64), "large": (8, 4, 512, 128)}
# jaxpref config keys per benchmark config (TRL runs with its defaults); see bench_kd_step.py.
JAXPREF_SETTINGS = {"small": {}, "large": {"gradient_checkpointing": True}}
BETA, LR, MAX_GRAD_NORM = 0.1, 1e-6, 1.0
# DPOConfig settings every TRL side of a benchmark shares: sigmoid loss, live reference, a step per log
# line, nothing saved or reported, CPU, no loader workers.
TRL_RUN_SETTINGS = dict(
    loss_type=["sigmoid"], precompute_ref_log_probs=False, logging_steps=1, save_strategy="no", report_to=[],
    use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
)


def make_pairs(
    pairs: int, seq_len: int, prompt_len: int, seed: int = 0, *, vocab: int = kd.VOCAB
) -> dict[str, np.ndarray]:
    """Token ids: prompt [pairs, P], chosen/rejected completions [pairs, seq_len - P] (last one = EOS)."""
    rng = np.random.default_rng(seed)
    comp = seq_len - prompt_len
    prompt = rng.integers(3, vocab, (pairs, prompt_len))
    chosen = rng.integers(3, vocab, (pairs, comp))
    rejected = rng.integers(3, vocab, (pairs, comp))
    chosen[:, -1] = rejected[:, -1] = 2  # EOS
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def jaxpref_batch(ids: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The pipeline's pair batch: prediction-aligned labels, loss on the predictions of completion tokens."""
    prompt = ids["prompt"]
    pairs, p = prompt.shape
    out = {}
    for side in ("chosen", "rejected"):
        seq = np.concatenate([prompt, ids[side]], axis=1).astype(np.int32)
        t = seq.shape[1]
        labels = np.concatenate([seq[:, 1:], np.zeros((pairs, 1), np.int32)], axis=1)
        loss_mask = np.zeros((pairs, t), bool)
        loss_mask[:, p - 1 : t - 1] = True  # position t predicts token t + 1
        out[f"{side}_input_ids"] = seq
        out[f"{side}_labels"] = labels
        out[f"{side}_loss_mask"] = loss_mask
        out[f"{side}_positions"] = np.broadcast_to(np.arange(t, dtype=np.int32), (pairs, t)).copy()
        out[f"{side}_segment_ids"] = np.ones((pairs, t), np.int32)
    out["pair_mask"] = np.ones((pairs,), bool)
    return out


def _text(row: np.ndarray) -> str:
    return " ".join(f"t{int(i)}" for i in row)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Ids 0-2 are <unk>, <s>, </s>; the pairs only use ids >= 3 plus EOS. </s> is a special token, so
    # TRL's "completion" + eos_token (no space) still splits into two tokens.
    vocab = {f"t{i}": i for i in range(3, kd.VOCAB)} | {"<unk>": 0, "<s>": 1, "</s>": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<unk>", bos_token="<s>")


def step_result(args, tokens: int, times: list[float], cpu: list[float], losses: list[float], extra: dict) -> dict:
    """One worker's row: ``args.config`` / ``args.impl``, step times, tokens/s, the process's peak RSS."""
    med = statistics.median(times)
    return {
        "config": args.config,
        "impl": args.impl,
        "tokens_per_step": tokens,
        "times_s": times,
        "median_step_s": med,
        "cpu_s": cpu,
        "median_cpu_s": statistics.median(cpu),
        "tokens_per_s": tokens / med,
        "steps_per_s": 1.0 / med,
        "peak_rss_bytes": kd.rss_bytes(),
        "losses": losses,
        **extra,
    }


def step_timer() -> tuple[Any, dict[str, list[float]]]:
    """A transformers ``TrainerCallback`` recording each step's wall and CPU seconds (``on_step_begin`` ->
    ``on_step_end``) and the logged losses, and the dict it records into."""
    from transformers import TrainerCallback

    marks: dict[str, list[float]] = {"times": [], "cpu": [], "losses": []}

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            marks["times"].append(time.perf_counter() - self.t0)
            marks["cpu"].append(time.process_time() - self.c0)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                marks["losses"].append(float(logs["loss"]))

    return Timer(), marks


def _trl_worker(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    layers, pairs, seq_len, prompt_len = CONFIGS[args.config]
    ids = make_pairs(pairs, seq_len, prompt_len)
    total = args.warmup + args.steps
    rows = [
        {"prompt": _text(ids["prompt"][i]), "chosen": " " + _text(ids["chosen"][i][:-1]),
         "rejected": " " + _text(ids["rejected"][i][:-1])}
        for i in range(pairs)
    ] * total  # fmt: skip
    model = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    cfg = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_dpo_trl_"),
        per_device_train_batch_size=pairs,
        max_length=seq_len,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        beta=BETA,
        max_steps=total,
        **TRL_RUN_SETTINGS,
    )
    timer, marks = step_timer()

    trainer = DPOTrainer(
        model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=_tokenizer(),
        callbacks=[timer],
    )  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    seen = int(batch["input_ids"].shape[1])
    if seen != seq_len:
        raise SystemExit(f"TRL batch has length {seen}, expected {seq_len}: the tokenizer round trip is off")
    trainer.train()
    times, cpu = marks["times"][args.warmup :], marks["cpu"][args.warmup :]
    extra = {"torch": torch.__version__, "trl_batch_shape": list(batch["input_ids"].shape)}
    return step_result(args, 2 * pairs * seq_len, times, cpu, marks["losses"], extra)


def _jax_worker(args: argparse.Namespace) -> dict:
    import jax

    from jaxpref import sharding as shd
    from jaxpref.assembly import build_companions, build_model
    from jaxpref.config import validate_config
    from jaxpref.objectives import build_objective
    from jaxpref.optim import make_optimizer
    from jaxpref.trainer import Trainer

    layers, pairs, seq_len, prompt_len = CONFIGS[args.config]
    raw = {
        "base_model": args.model_dir,
        "rl": "dpo",
        "rl_beta": BETA,
        "micro_batch_size": pairs,
        "sequence_len": seq_len,
        "optimizer": "adamw_torch",
        "learning_rate": LR,
        "weight_decay": 0.0,
        "max_grad_norm": MAX_GRAD_NORM,
        "lr_scheduler": "constant",
        "max_steps": args.warmup + args.steps,
        "output_dir": tempfile.mkdtemp(prefix="bench_dpo_out_"),
        **JAXPREF_SETTINGS[args.config],
    }
    cfg = validate_config(raw, require_datasets=False)
    objective = build_objective(cfg, "dpo")
    mesh = shd.make_mesh(None)
    model = build_model(cfg, kd.VOCAB, mesh)
    companions = build_companions(cfg, objective.companions, kd.VOCAB, mesh)
    tx, _ = make_optimizer(cfg, cfg.max_steps)
    trainer = Trainer(
        model, objective, tx, mesh=mesh, rules=cfg.logical_axis_rules, seed=cfg.seed, companions=companions
    )
    del model, companions
    mb = jaxpref_batch(make_pairs(pairs, seq_len, prompt_len))
    losses, times, cpu = [], [], []
    for i in range(args.warmup + args.steps):
        c0, t0 = time.process_time(), time.perf_counter()
        losses.append(trainer.train_step([mb])["loss"])
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    extra = {"jax": jax.__version__, "reference": objective.reference}
    return step_result(args, 2 * pairs * seq_len, times, cpu, losses, extra)


def table(results: list[dict]) -> str:
    def name(r: dict) -> str:
        layers, pairs, seq_len, _ = CONFIGS[r["config"]]
        return f"{r['config']} ({layers} layers, {pairs} pairs x {seq_len})"

    columns = [
        ("tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}"),
        ("steps/s", lambda r: f"{r['steps_per_s']:.3f}"),
        ("step (s)", lambda r: f"{r['median_step_s']:.2f}"),
    ]
    return kd.comparison_table(results, "trl", "TRL", name, columns)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="small,large")
    p.add_argument("--impls", default="trl,jaxpref")
    p.add_argument("--steps", type=int, default=4, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator warm-up)")
    p.add_argument("--out", default=None, help="write the markdown table (and machine line) here")
    p.add_argument("--json", default=None, help="write the raw results here")
    p.add_argument(
        "--malloc", default="as-shipped", choices=["as-shipped", "tuned", "default"], help="as bench_kd_step.py"
    )
    p.add_argument("--no-bound", action="store_true", help="skip the matmul-bound measurement")
    p.add_argument("--worker", default=None, choices=["prepare", "trl", "jaxpref", "gemm"], help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.impl = args.worker
        layers, pairs, seq_len, _ = CONFIGS[args.config]
        if args.worker == "prepare":
            out = kd._prepare(args.model_dir, layers)
        elif args.worker == "gemm":  # policy forward + backward, reference forward, on 2 x pairs sequences
            tokens = 2 * pairs * seq_len
            out = {"config": args.config, **kd.gemm_bound_worker(layers, tokens, tokens, args.steps)}
        else:
            out = {"trl": _trl_worker, "jaxpref": _jax_worker}[args.worker](args)
        print(json.dumps(out))
        return

    load_start = os.getloadavg()
    results, bounds = kd.run_configs(__file__, args, prefix="bench_dpo_")
    load_end = os.getloadavg()
    text = [
        f"Machine: {kd.machine()}; load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end.",
        f"float32, V={kd.VOCAB}, d={kd.HIDDEN}, {kd.HEADS} heads / {kd.KV_HEADS} kv heads; DPO sigmoid, beta "
        f"{BETA}, full fine-tune + frozen reference copy, AdamW, clip {MAX_GRAD_NORM}; tokens = chosen + rejected "
        f"tokens per step; median of {args.steps} steps after {args.warmup} warm-up steps; peak memory = peak "
        f"RSS of the process; jaxpref settings: {JAXPREF_SETTINGS}; malloc: {kd.malloc_note(args.malloc)}.",
        "",
        table(results),
    ]
    if bounds:
        text += ["", *kd.bound_lines(bounds, results, "trl")]
    checks = []
    for config in args.configs.split(","):
        first = {r["impl"]: r["losses"][0] for r in results if r["config"] == config and r.get("losses")}
        if len(first) > 1:
            checks.append(f"{config}: " + ", ".join(f"{k} {v:.5f}" for k, v in first.items()))
    if checks:
        text += ["", "First-step loss (same weights, same pairs): " + "; ".join(checks)]
    print("\n" + "\n".join(text))
    if args.out:
        Path(args.out).write_text("\n".join(text) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": kd.machine(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
