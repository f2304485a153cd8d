"""Benchmark: one GRPO step, sampling included, jaxpref vs TRL's GRPOTrainer (issue #18).

Both are full fine-tunes of the same random-init Llama checkpoint on the same prompts: ``prompts``
prompts of exactly P tokens per step, G = ``num_generations`` completions of each, every completion
exactly L = ``max_completion_length`` tokens, temperature 1.0, the same deterministic reward function
(:func:`even_ids_reward`), ``loss_type: dapo``, ``num_iterations`` 1, AdamW (lr 1e-6, clipping 1.0),
``beta`` 0 (TRL's default, no reference model) and, as a second config, ``beta`` 0.04 (a frozen
reference copy, one more forward pass).

* Text: a word-level tokenizer with one word per id (``t3`` ... ``t{V-1}``, ids 0-2 = <unk>, <s>,
  </s>) turns the prompts into text that tokenizes back to exactly the same ids on both sides (no
  special tokens added, no chat template), and decodes completions to space-separated words for the
  reward function. It is saved next to the checkpoint, so jaxpref loads it as the model's tokenizer.
* Equal lengths: </s> is the tokenizer's eos and its only stop token. TRL runs with
  ``generation_kwargs={"min_new_tokens": L}`` (transformers masks eos until L tokens are out, so no
  completion ends early); jaxpref's rollout runs with no stop token (``RolloutSettings.stop_token_ids``
  = (): generation runs to L new tokens; eos, drawn with probability about 1/V from a random-init model,
  would just be a token). Both sides report their mean completion length in the table.
* TRL: ``GRPOTrainer(model, reward_funcs=even_ids_reward, args=GRPOConfig(...), train_dataset=Dataset
  with a "prompt" column, processing_class=tokenizer).train()``, TRL's defaults otherwise (so
  ``gradient_checkpointing`` on, as GRPOConfig defaults it). A step is timed by a callback from
  ``on_step_begin`` to ``on_step_end``: TRL generates inside the step (``training_step`` ->
  ``_prepare_inputs`` -> ``_generate_and_score_completions`` on the first micro-batch of each optimizer
  step), so that covers generation, rewards, advantages, the reference forward, the loss, backward,
  clipping and AdamW. Sampling time = the model's ``generate`` calls, timed by a wrapper.
* jaxpref: a validated config (``rl: grpo`` with a ``trl`` section, as configs/grpo.yaml), assembled
  as ``jaxpref.train.run`` does (``build_data``, ``build_trainer``, ``train.grpo_hooks`` =
  ``GRPORollout``) and trained by the same loop, ``jaxpref.trainer.fit``, logging every step; its
  ``step_time`` covers the prompt batch, sampling, rewards, advantages, micro-batches and
  ``Trainer.train_step`` (checkpointing and export, which ``run`` adds after the loop, are left out, as
  TRL's ``save_strategy="no"``). Sampling share = the rollout's ``sampling_seconds`` / step time.

Tokens per step = prompts x G x (P + L) on both sides. Each (config, implementation) runs in its own
fresh subprocess, one after the other; peak memory = the process's peak RSS. The first ``--warmup``
steps (compilation, allocator warm-up) are not timed. The first-step loss is 0 on both sides by
construction (ratio 1, advantages centred per group, all completions equally long; the KL of the
policy to its own copy is 0), so it only checks that nothing else enters the loss; the step-1 entropy
(same weights; the samples differ: the two sides draw different random numbers) is the closer check.

  python scripts/bench_grpo_step.py                       # small (beta 0) and small-kl (beta 0.04)
  python scripts/bench_grpo_step.py --configs small --steps 3 --out grpo_table.md
  python scripts/bench_grpo_step.py --quick               # a tiny smoke run (tests/scripts)
"""

from __future__ import annotations

import argparse
import dataclasses
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
import bench_kd_step as kd  # noqa: E402  (machine line, subprocess driver, peak RSS, table)


@dataclasses.dataclass(frozen=True)
class Shape:
    """A benchmark config: model shape, prompts per step and lengths, the batch layout, beta."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    prompts: int  # per step
    prompt_len: int  # P
    generations: int  # G
    completion_len: int  # L
    micro_batch: int  # completions per micro-batch (TRL: per_device_train_batch_size)
    accum: int  # micro-batches per step (gradient_accumulation_steps)
    beta: float

    @property
    def tokens_per_step(self) -> int:
        return self.prompts * self.generations * (self.prompt_len + self.completion_len)


SMALL = dict(layers=4, hidden=kd.HIDDEN, heads=kd.HEADS, kv_heads=kd.KV_HEADS, intermediate=kd.INTERMEDIATE,
             vocab=kd.VOCAB, prompts=8, prompt_len=32, generations=8, completion_len=64, micro_batch=16,
             accum=4)  # fmt: skip
# --quick: a tiny model, a few tokens (the smoke test)
QUICK = Shape(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=512, prompts=2, prompt_len=8,
              generations=4, completion_len=8, micro_batch=4, accum=2, beta=0.0)  # fmt: skip
CONFIGS = {"small": Shape(**SMALL, beta=0.0), "small-kl": Shape(**SMALL, beta=0.04), "quick": QUICK}
LR, MAX_GRAD_NORM, TEMPERATURE, LOSS_TYPE = 1e-6, 1.0, 1.0, "dapo"
# jaxpref config keys per implementation row: as shipped, and with TRL's default activation checkpointing.
JAXPREF_SETTINGS = {"jaxpref": {}, "jaxpref-remat": {"gradient_checkpointing": True}}


def even_ids_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """The share of a completion's words (``t<id>``) with an even id: deterministic, and it differs
    between completions, so the advantages are not all zero."""
    out = []
    for text in completions:
        words = text.split()
        out.append(sum(int(w[1:]) % 2 == 0 for w in words if w[1:].isdigit()) / max(len(words), 1))
    return out


def model_config(s: Shape) -> dict:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": s.vocab,
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }


def tokenizer(vocab: int):
    """Word level, one word per id: ``t<i>`` <-> i for 3 <= i < vocab; <unk>, <s>, </s> = 0, 1, 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(3, vocab)} | {"<unk>": 0, "<s>": 1, "</s>": 2}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<unk>", bos_token="<s>")


def prompt_texts(s: Shape, seed: int = 0) -> list[str]:
    """``s.prompts`` distinct prompts of exactly ``s.prompt_len`` words (ids >= 3)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, s.vocab, (s.prompts, s.prompt_len))
    return [" ".join(f"t{int(i)}" for i in row) for row in ids]


def _prepare(model_dir: str, s: Shape) -> dict:
    """The random-init float32 checkpoint (transformers' initialisation) and the tokenizer, for both."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**model_config(s)))
    model.save_pretrained(model_dir)
    tokenizer(s.vocab).save_pretrained(model_dir)
    return {"params": sum(p.numel() for p in model.parameters())}


def _check_prompt_lengths(tok: Any, s: Shape) -> None:
    lengths = {len(tok(t, add_special_tokens=False)["input_ids"]) for t in prompt_texts(s)}
    if lengths != {s.prompt_len}:
        raise SystemExit(f"prompts tokenize to {lengths} tokens, expected {s.prompt_len}: the word trick is off")


def result(args: argparse.Namespace, s: Shape, times: list[float], sampling: list[float], rows: list[dict],
           extra: dict) -> dict:  # fmt: skip
    """One worker's row; ``rows``: per step (warm-up included) loss, entropy, mean completion length."""
    med = statistics.median(times)
    return {
        "config": args.config,
        "impl": args.impl,
        "tokens_per_step": s.tokens_per_step,
        "times_s": times,
        "median_step_s": med,
        "sampling_s": sampling,
        "sampling_share": statistics.median(sampling) / med if sampling else None,
        "tokens_per_s": s.tokens_per_step / med,
        "peak_rss_bytes": kd.rss_bytes(),
        "losses": [r["loss"] for r in rows],
        "entropy_step1": rows[0]["entropy"] if rows else None,
        "mean_length": float(np.mean([r["mean_length"] for r in rows])) if rows else None,
        "steps": rows,
        **extra,
    }


def _trl_worker(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    s = CONFIGS[args.config]
    total = args.warmup + args.steps
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    _check_prompt_lengths(tok, s)
    model = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    generate_s: list[float] = []
    generate = model.generate

    def timed_generate(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        out = generate(*a, **k)
        generate_s.append(time.perf_counter() - t0)
        return out

    model.generate = timed_generate  # TRL calls the unwrapped model's generate (this instance on one CPU)
    times: list[float] = []
    sampling: list[float] = []
    logs: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.t0, self.g0 = time.perf_counter(), len(generate_s)

        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(time.perf_counter() - self.t0)
            sampling.append(sum(generate_s[self.g0 :]))

        def on_log(self, _args: Any, _state: Any, _control: Any, **k: Any) -> None:
            entry = k.get("logs")  # one per step (logging_steps=1): loss, entropy, completions/*, reward
            if entry and "loss" in entry:
                logs.append(dict(entry))

    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_grpo_trl_"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=s.micro_batch,
        gradient_accumulation_steps=s.accum,
        num_generations=s.generations,
        max_completion_length=s.completion_len,
        temperature=TEMPERATURE,
        generation_kwargs={"min_new_tokens": s.completion_len},  # eos cannot end a completion early
        beta=s.beta,
        loss_type=LOSS_TYPE,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        max_steps=total,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        **kd.parse_set(args.trl_set),
    )
    rows = [{"prompt": t} for t in prompt_texts(s)] * total
    trainer = GRPOTrainer(
        model=model, reward_funcs=even_ids_reward, args=cfg, train_dataset=Dataset.from_list(rows),
        processing_class=tok, callbacks=[Timer()],
    )  # fmt: skip
    trainer.train()
    if len(times) != total or len(logs) != total:
        raise SystemExit(f"TRL ran {len(times)} timed steps and logged {len(logs)}, expected {total}")
    steps = [
        {"loss": float(g["loss"]), "entropy": float(g.get("entropy", float("nan"))),
         "mean_length": float(g["completions/mean_length"]), "reward": float(g.get("reward", float("nan"))),
         "step_s": t, "sampling_s": smp}
        for g, t, smp in zip(logs, times, sampling)
    ]  # fmt: skip
    extra = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "gradient_checkpointing": cfg.gradient_checkpointing,
    }
    w = args.warmup
    return result(args, s, times[w:], sampling[w:], steps, extra)


def _jax_worker(args: argparse.Namespace) -> dict:
    import jax

    from jaxpref import sharding as shd
    from jaxpref.assembly import build_data, build_trainer
    from jaxpref.config import validate_config
    from jaxpref.data import DataSettings, load_tokenizer
    from jaxpref.objectives import build_objective
    from jaxpref.train import grpo_hooks
    from jaxpref.trainer import LoopHooks, LoopSettings, fit

    s = CONFIGS[args.config]
    total = args.warmup + args.steps
    work = Path(tempfile.mkdtemp(prefix="bench_grpo_jax_"))
    data_path = work / "prompts.jsonl"
    data_path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in prompt_texts(s) * total))
    raw = {
        "base_model": args.model_dir,
        "rl": "grpo",
        "trl": {
            "num_generations": s.generations,
            "max_completion_length": s.completion_len,
            "temperature": TEMPERATURE,
            "reward_funcs": ["bench_grpo_step.even_ids_reward"],  # this file (scripts/ is on sys.path)
            "beta": s.beta,
            "loss_type": LOSS_TYPE,
        },
        "datasets": [{"path": str(data_path), "ds_type": "json"}],
        "sequence_len": s.prompt_len + s.completion_len,
        "micro_batch_size": s.micro_batch,
        "gradient_accumulation_steps": s.accum,
        "max_steps": total,
        "optimizer": "adamw_torch",
        "learning_rate": LR,
        "lr_scheduler": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": MAX_GRAD_NORM,
        "seed": 0,
        "logging_steps": 1,
        "output_dir": str(work / "out"),
    }
    raw.update(JAXPREF_SETTINGS[args.impl])
    raw.update(kd.parse_set(args.set))
    cfg = validate_config(raw)
    # as jaxpref.train.run assembles a run (no checkpointer, no export: TRL saves nothing either)
    objective = build_objective(cfg, "grpo")
    data_settings = DataSettings.from_config(cfg)
    tok = load_tokenizer(data_settings)
    _check_prompt_lengths(tok, s)
    mesh = shd.make_mesh(None)
    data = build_data(data_settings, tok, objective.data)
    trainer, schedule = build_trainer(cfg, objective, data, tok, mesh, total)
    rollout = grpo_hooks(cfg, tok, trainer, data, total)
    rollout.settings = dataclasses.replace(rollout.settings, stop_token_ids=())  # eos cannot end a completion
    logged: list[dict] = []
    loop = LoopSettings(total_steps=total, grad_accum=1, logging_steps=1, eval_every=None, save_every=0,
                        skip_nonfinite=False)  # fmt: skip
    hooks = LoopHooks(log=lambda step, kind, m: logged.append(dict(m)), learning_rate=lambda i: float(schedule(i)),
                      prepare_step=rollout)  # fmt: skip
    fit(trainer, data.train_iterator(None), loop, hooks)
    if len(logged) != total:
        raise SystemExit(f"jaxpref logged {len(logged)} steps, expected {total}")
    steps = [
        {"loss": m["loss"], "entropy": m.get("entropy", float("nan")), "mean_length": m["completions/mean_length"],
         "reward": m.get("reward", float("nan")), "step_s": m["step_time"], "sampling_s": m["sampling_seconds"]}
        for m in logged
    ]  # fmt: skip
    w = args.warmup
    extra = {"jax": jax.__version__, "reference": objective.reference, "remat_policy": cfg.remat_policy or "none",
             "warmup_s": [m["step_time"] for m in logged[:w]]}  # fmt: skip
    return result(args, s, [r["step_s"] for r in steps[w:]], [r["sampling_s"] for r in steps[w:]], steps, extra)


def describe(name: str) -> str:
    s = CONFIGS[name]
    return (f"{name} ({s.layers} layers, {s.prompts} prompts x G={s.generations}, P={s.prompt_len}, "
            f"L={s.completion_len}, beta {s.beta:g})")  # fmt: skip


def table(results: list[dict]) -> str:
    def cell(fmt: str, key: str):
        return lambda r: "-" if r.get(key) is None else fmt.format(r[key])

    columns = [
        ("step (s)", cell("{:.2f}", "median_step_s")),
        ("sampling share", cell("{:.0%}", "sampling_share")),
        ("tokens/s", cell("{:,.0f}", "tokens_per_s")),
        ("mean completion length", cell("{:.1f}", "mean_length")),
        ("first-step loss", lambda r: f"{r['losses'][0]:.5f}"),
        ("step-1 entropy", cell("{:.3f}", "entropy_step1")),
    ]
    return kd.comparison_table(results, "trl", "TRL", lambda r: describe(r["config"]), columns)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="small,small-kl", help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--impls", default="trl,jaxpref,jaxpref-remat", help="of trl, jaxpref, jaxpref-remat")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation, allocator warm-up)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: --configs quick --steps 1 --warmup 1")
    p.add_argument("--set", action="append", help="extra jaxpref config key=value (e.g. gradient_checkpointing=true)")
    p.add_argument("--trl-set", action="append", help="extra GRPOConfig key=value (e.g. gradient_checkpointing=false)")
    p.add_argument("--out", default=None, help="write the markdown table (and machine line) here")
    p.add_argument("--json", default=None, help="write the raw results here")
    p.add_argument(
        "--malloc", default="as-shipped", choices=["as-shipped", "tuned", "default"], help="as bench_kd_step.py"
    )
    p.add_argument("--worker", default=None, choices=["prepare", "trl", *JAXPREF_SETTINGS], help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.configs, args.impls, args.steps, args.warmup = "quick", "trl,jaxpref", 1, 1
    if args.worker:
        args.impl = args.worker
        if args.worker == "prepare":
            out = _prepare(args.model_dir, CONFIGS[args.config])
        else:
            out = (_trl_worker if args.worker == "trl" else _jax_worker)(args)
        print(json.dumps(out))
        return
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    unknown += [i for i in args.impls.split(",") if i != "trl" and i not in JAXPREF_SETTINGS]
    if unknown:
        p.error(f"unknown config(s) or implementation(s) {unknown}")

    args.no_bound = True  # no matmul bound here: decoding GEMVs and training GEMMs run at different speeds
    load_start = os.getloadavg()
    results, _ = kd.run_configs(__file__, args, prefix="bench_grpo_")
    load_end = os.getloadavg()
    trl_cp = {r.get("gradient_checkpointing") for r in results if r["impl"] == "trl" and "error" not in r}
    text = [
        f"Machine: {kd.machine()}; load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end.",
        f"float32 Llama, full fine-tune; GRPO {LOSS_TYPE}, num_iterations 1, temperature {TEMPERATURE}, AdamW lr "
        f"{LR:g}, clip {MAX_GRAD_NORM}; every completion exactly L tokens (TRL min_new_tokens=L, jaxpref without "
        f"stop tokens); tokens/s = prompts x G x (P + L) per step / step time; median of {args.steps} steps after "
        f"{args.warmup} warm-up step(s); sampling share = generation time / step time; peak memory = peak RSS of the "
        f"process; TRL gradient_checkpointing {sorted(trl_cp)} {args.trl_set or ''}; jaxpref settings "
        f"{JAXPREF_SETTINGS} {args.set or ''}; "
        f"malloc: {kd.malloc_note(args.malloc)}.",
        "",
        table(results),
    ]
    print("\n" + "\n".join(text))
    if args.out:
        Path(args.out).write_text("\n".join(text) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": kd.machine(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
