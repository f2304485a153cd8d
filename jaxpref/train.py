"""``python -m jaxpref.train --config FILE.yaml [key=value ...]``: the training command.

Builds, in order: config -> tokenizer -> data -> model (+ LoRA) -> objective -> optimizer -> mesh and
trainer -> checkpoints and logs, then trains, evaluates, checkpoints and finally exports a Hugging
Face model directory (or a PEFT adapter) into ``output_dir``. Bad input is reported as one paragraph
without a traceback, with exit code 2.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: the re-exec restarts the interpreter
    from jaxpref.cli import reexec_with_malloc_tuning

    reexec_with_malloc_tuning()

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import jax
import yaml

from jaxpref import memory
from jaxpref import sharding as shd
from jaxpref.assembly import (
    build_data,
    build_trainer,
    objective_name,
    with_served_targets,
)
from jaxpref.checkpoint import Checkpointer, allgather_json, data_state_for_process, find_checkpoint_root
from jaxpref.cli import run_command, setup_logging
from jaxpref.errors import ConfigError
from jaxpref.export import export_final
from jaxpref.logs import RunLogger
from jaxpref.teacher_client import TeacherServerError
from jaxpref.trainer import LoopHooks, LoopSettings, fit

logger = logging.getLogger("jaxpref")

CHECKPOINTS = "checkpoints"


def check_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".jaxpref_write_test_{os.getpid()}"  # one per process: processes may share path
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output_dir: cannot write to {path} ({exc.strerror}); choose a writable directory.") from exc


def _every(explicit: float | None, per_epoch: int | None, steps_per_epoch: int, total: int) -> int | None:
    """Cadence in steps from ``*_steps`` (a count, or a fraction < 1 of the run) or ``*_per_epoch``."""
    if explicit:
        return max(1, math.ceil(explicit * total)) if explicit < 1 else int(explicit)
    if per_epoch:
        return max(1, steps_per_epoch // int(per_epoch))
    return None


def eval_cadence(cfg: Any, has_eval: bool, steps_per_epoch: int, total: int) -> int | None:
    """Evaluate every N steps, or None for never. With an eval set and no cadence: once, after the last
    step; ``evals_per_epoch: 0`` (the schema's "no evaluation") turns that off too."""
    if not has_eval:
        return None
    every = _every(cfg.eval_steps, cfg.evals_per_epoch, steps_per_epoch, total)
    if every is not None:
        return every
    if cfg.evals_per_epoch == 0:
        logger.info("not evaluating (evals_per_epoch: 0)")
        return None
    logger.info("evaluating once, after the last step (set eval_steps or evals_per_epoch to evaluate more often)")
    return total


def plan_steps(cfg: Any, micro_batches_per_epoch: int | None, items_per_step: int | None = None) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch). Epochs are a continuous stream of micro-batches.

    ``micro_batches_per_epoch`` None (streaming data: unknown) needs ``max_steps``; the whole run then
    counts as one epoch for the ``*_per_epoch`` cadences. ``items_per_step``: data items per optimizer step
    (default ``gradient_accumulation_steps``; 1 for GRPO's prompt batches).
    """
    accum = items_per_step or cfg.gradient_accumulation_steps
    if micro_batches_per_epoch is None:
        if not cfg.max_steps:
            raise ConfigError("streaming datasets need max_steps: their length, hence the epoch length, is unknown")
        return int(cfg.max_steps), int(cfg.max_steps)
    steps_per_epoch = max(1, micro_batches_per_epoch // accum)
    if cfg.max_steps:
        return int(cfg.max_steps), steps_per_epoch
    micro_total = int(cfg.num_epochs * micro_batches_per_epoch)
    total, leftover = divmod(micro_total, accum)
    if leftover:
        logger.info(
            "the last %d micro-batch(es) of the last epoch do not fill an optimizer step and are not used", leftover
        )
    if total < 1:
        raise ConfigError(
            f"the training data gives {micro_batches_per_epoch} micro-batches per epoch, fewer than "
            f"gradient_accumulation_steps={accum} x num_epochs={cfg.num_epochs} needs for one step; add "
            "data, lower micro_batch_size or gradient_accumulation_steps, or raise num_epochs."
        )
    return total, steps_per_epoch


def run(cfg: Any, *, show_progress: bool = True) -> dict[str, Any]:
    """Train as ``cfg`` says; returns final train/eval metrics and paths."""
    from jaxpref import distributed
    from jaxpref.data import DataSettings, load_tokenizer
    from jaxpref.objectives import build_objective

    out_dir = Path(cfg.output_dir).absolute()
    distributed.initialize(distributed.settings_from_config(cfg))  # before anything touches a device
    check_output_dir(out_dir)
    distributed.check_shared_directory(out_dir)
    ckpt_root, resume_step = resolve_resume(cfg, out_dir)

    objective = build_objective(cfg, objective_name(cfg))  # an unknown objective fails before any loading
    data_settings = DataSettings.from_config(cfg)  # what the data layer reads, resolved once
    tokenizer = load_tokenizer(data_settings)
    mesh = shd.make_mesh(cfg.mesh.model_dump() if cfg.mesh is not None else None)
    divisor = shd.batch_divisor(mesh)
    global_micro = cfg.micro_batch_size * jax.process_count()
    if global_micro % divisor:
        raise ConfigError(
            f"micro_batch_size={cfg.micro_batch_size} x {jax.process_count()} process(es) must be a "
            f"multiple of the {divisor} devices on the mesh's data and fsdp axes."
        )
    data = with_served_targets(cfg, build_data(data_settings, tokenizer, objective.data), tokenizer)
    logger.info(data.report.summary())
    grpo = objective.data == "prompts"  # one prompt batch per step; the rollout makes the micro-batches
    items_per_step = 1 if grpo else cfg.gradient_accumulation_steps
    total_steps, steps_per_epoch = plan_steps(cfg, data.micro_batches_per_epoch, items_per_step)

    trainer, schedule = build_trainer(cfg, objective, data, tokenizer, mesh, total_steps)
    n_train, n_frozen = trainer.num_params()
    logger.info("parameters: %s trainable, %s frozen; %d steps", f"{n_train:,}", f"{n_frozen:,}", total_steps)

    eval_every = eval_cadence(cfg, data.has_eval, steps_per_epoch, total_steps)
    settings = LoopSettings(
        total_steps=total_steps,
        grad_accum=items_per_step,
        logging_steps=max(1, cfg.logging_steps or 1),
        eval_every=eval_every,
        save_every=_every(cfg.save_steps, cfg.saves_per_epoch, steps_per_epoch, total_steps) or steps_per_epoch,
        skip_nonfinite=cfg.skip_nonfinite_steps,
    )
    epochs = cfg.num_epochs if not cfg.max_steps else None
    if grpo:
        on_policy = grpo_hooks(cfg, tokenizer, trainer, data, total_steps)
    else:
        on_policy = on_policy_hook(cfg, tokenizer, trainer, data)
    if not grpo and on_policy is not None and on_policy.targets is not None and cfg.kd_on_policy_ratio >= 1:
        data_iter = data.train_iterator(epochs, with_targets=False)  # every step is rebuilt on-policy
    else:
        data_iter = data.train_iterator(epochs)
    ckpt = Checkpointer(ckpt_root, max_to_keep=cfg.save_total_limit)
    if resume_step is None and ckpt_root == out_dir / CHECKPOINTS and cfg.resume_from_checkpoint == "auto":
        resume_step = ckpt.latest_step()
    if resume_step is not None:
        params, opt_state, meta = ckpt.restore(resume_step, trainer.params, trainer.opt_state)
        trainer.restore_state(params, opt_state, int(meta["step"]))
        data_iter.set_state(data_state_for_process(meta["data_state"]))
        logger.info("resumed from %s at step %d", ckpt_root / str(resume_step), trainer.step)
        if ckpt_root != out_dir / CHECKPOINTS:
            ckpt.close()
            ckpt = Checkpointer(out_dir / CHECKPOINTS, max_to_keep=cfg.save_total_limit)

    if jax.process_index() == 0:
        (out_dir / "jaxpref_config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    run_log = RunLogger(
        out_dir,
        total_steps=total_steps,
        start_step=trainer.step,
        use_tensorboard=cfg.use_tensorboard,
        wandb=wandb_settings(cfg),
        show_progress=show_progress,
    )

    def save(step: int) -> None:
        states = allgather_json(data_iter.get_state())
        ckpt.save(step, trainer.params, trainer.opt_state, {"step": step, "data_state": states})

    eval_batches = (lambda: data.eval_batches()) if data.has_eval and not grpo else None
    if grpo:
        generation = on_policy.evaluation if data.has_eval else None
    else:
        generation = generation_hook(cfg, data_settings, tokenizer, trainer) if data.has_eval else None
    hooks = LoopHooks(
        eval_batches=eval_batches,
        save=save,
        log=run_log.log,
        progress=run_log.advance,
        learning_rate=lambda s: float(schedule(s)),
        generation=generation,
        prepare_step=on_policy,
    )
    try:
        result = fit(trainer, data_iter, settings, hooks)
        if trainer.step and ckpt.latest_step() != trainer.step:
            save(trainer.step)
        ckpt.wait()
        export_final(cfg, trainer, tokenizer, out_dir)
    except TeacherServerError as e:  # the checkpoints so far are whole: say where the run goes on from
        ckpt.wait()
        latest = ckpt.latest_step()
        where = (
            f"The last checkpoint is step {latest} in {ckpt.directory}; when the server is back, rerun with "
            "resume_from_checkpoint: auto to go on from there."
            if latest is not None
            else "No checkpoint was written yet (save_steps sets how often); the run starts over when rerun."
        )
        raise TeacherServerError(f"{e} {where}") from None
    finally:
        ckpt.close()
        run_log.close()
        if hasattr(data, "close"):
            data.close()
    if on_policy is not None and on_policy.steps:
        run_log.message(
            f"on-policy: {on_policy.steps} step(s) sampled from the {'policy' if grpo else 'student'}, "
            f"{on_policy.total_sampling_s:.1f} s sampling in all"
        )
    distributed.barrier("run-done", timeout_s=3600)  # leave together: JAX's shutdown barrier is short
    run_log.message(f"done: {trainer.step} steps; model written to {out_dir}")
    return {**result, "output_dir": str(out_dir), "steps": trainer.step}


def generation_hook(cfg: Any, data_settings: Any, tokenizer: Any, trainer: Any) -> Any:
    """``eval_generation``: a function of the step that completes and scores eval rows with the current model."""
    if cfg.eval_generation is None:
        return None
    from jaxpref.eval_generation import build_generation_eval

    evaluate = build_generation_eval(cfg.eval_generation, data_settings, tokenizer, seed=cfg.seed, mesh=trainer.mesh)
    return lambda step: evaluate(trainer.model(), step)


def on_policy_hook(cfg: Any, tokenizer: Any, trainer: Any, data: Any) -> Any:
    """``kd_on_policy_ratio`` > 0: the loop's ``prepare_step`` that rebuilds on-policy steps (``jaxpref.on_policy``)."""
    if not cfg.kd_on_policy_ratio:
        return None
    from jaxpref.generation.prompts import stop_token_ids
    from jaxpref.on_policy import OnPolicySettings, OnPolicyStep

    settings = OnPolicySettings(
        ratio=cfg.kd_on_policy_ratio,
        max_new_tokens=cfg.kd_on_policy_max_new_tokens,
        temperature=cfg.kd_on_policy_temperature,
        sequence_len=cfg.sequence_len,
        stop_token_ids=stop_token_ids(tokenizer),
    )
    targets = data.targets if cfg.kd_online_server_base_url else None  # ServedTeacherData's ServedTargets
    return OnPolicyStep(trainer.model, settings, cfg.seed, targets, mesh=trainer.mesh)


def grpo_hooks(cfg: Any, tokenizer: Any, trainer: Any, data: Any, total_steps: int) -> Any:
    """``rl: grpo``: the loop's ``prepare_step`` (``jaxpref.grpo_rollout.GRPORollout``: sampling, rewards,
    advantages), with its held-out evaluation by generation as ``.evaluation`` (None without an eval set)."""
    from jaxpref.generation.prompts import stop_token_ids
    from jaxpref.grpo_rollout import GRPOEval, GRPORollout, RolloutSettings
    from jaxpref.reward_calls import RewardFunctions

    settings = RolloutSettings.from_config(cfg, stop_token_ids(tokenizer))
    rewards = RewardFunctions(cfg.trl.reward_funcs)
    rollout = GRPORollout(
        trainer.model, settings, rewards, tokenizer, seed=cfg.seed, total_steps=total_steps, mesh=trainer.mesh
    )
    evaluation = None
    if data.has_eval:
        evaluation = GRPOEval(data.eval_batches(), settings, rewards, tokenizer, seed=cfg.seed, mesh=trainer.mesh)
    rollout.evaluation = (lambda step: evaluation(trainer.model(), step)) if evaluation else None
    return rollout


def resolve_resume(cfg: Any, out_dir: Path) -> tuple[Path, int | None]:
    """Where checkpoints are read from, and an explicit step when PATH names one."""
    root = out_dir / CHECKPOINTS
    value = cfg.resume_from_checkpoint
    if value and value != "auto":
        return find_checkpoint_root(value)
    has_previous = root.is_dir() and any(p.name.isdigit() for p in root.iterdir())
    if has_previous and value != "auto":
        raise ConfigError(
            f"output_dir {out_dir} already holds checkpoints of an earlier run. To continue that run set "
            "resume_from_checkpoint: auto (or resume_from_checkpoint=auto on the command line); to start "
            "over, choose another output_dir or delete that one."
        )
    return root, None


def wandb_settings(cfg: Any) -> dict[str, Any] | None:
    if not cfg.wandb_project:
        return None
    return {
        "project": cfg.wandb_project,
        "entity": cfg.wandb_entity,
        "name": cfg.wandb_name,
        "mode": cfg.wandb_mode,
    }


def dry_run(cfg: Any, *, devices: int | None = None, processes: int | None = None) -> dict[str, Any]:
    """``--dry_run``: validate the config and print (as YAML) and return its per-device plan
    (``jaxpref.planning.memory_plan``)."""
    from jaxpref.planning import memory_plan

    report = memory_plan(cfg, devices=devices, processes=processes)
    print(yaml.safe_dump(report, sort_keys=False, width=120))
    return report


def lower(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    """``--dry_run`` with ``--lower_for`` and/or ``--dry_run_compile``: the memory plan, then the train
    step lowered for each platform and/or compiled for this machine (XLA's memory analysis)."""
    from jaxpref import lowering

    devices = lowering.mesh_devices(cfg, args.dry_run_devices)
    lowering.ensure_devices(devices)  # before anything starts JAX: simulated devices for the mesh
    dry_run(cfg, devices=devices, processes=args.dry_run_processes)
    report: dict[str, Any] = {}
    if args.lower_for:
        report["lowered"] = lowering.lower_train_step(
            cfg, lowering.parse_platforms(args.lower_for), out_dir=args.lower_out, devices=devices
        )
    if args.dry_run_compile:
        compiled = lowering.compiled_memory(cfg, devices)
        report["compiled_here"] = {**compiled, "per_device": {
            k: memory.human(compiled[k]) for k in ("arguments", "temporaries", "outputs", "total")
        }}  # fmt: skip
    print(yaml.safe_dump(report, sort_keys=False, width=120))
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxpref.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML config file (axolotl key names)")
    p.add_argument("--dry_run", "--dry-run", action="store_true", help="validate and report sizes, then exit")
    p.add_argument("--dry_run_devices", type=int, help="--dry_run: plan for this many devices (default: the mesh's)")
    p.add_argument("--dry_run_processes", type=int, help="--dry_run: plan for this many processes (hosts); default 1")
    p.add_argument(
        "--lower_for",
        metavar="PLATFORMS",
        help="--dry_run: also lower the real train step for these platforms (tpu,cuda) with jax.export and "
        "report its kernels; on simulated CPU devices when this machine has fewer than the mesh",
    )
    p.add_argument("--lower_out", metavar="DIR", help="--lower_for: write DIR/<platform>.mlir (StableHLO text)")
    p.add_argument(
        "--dry_run_compile",
        action="store_true",
        help="--dry_run: also compile the train step for this machine from shapes (nothing initialised; reads "
        "the first batch) and report XLA's per-device arguments and temporaries",
    )
    p.add_argument("--no_progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nesting (mesh.fsdp=4)")
    args = p.parse_intermixed_args(argv)  # flags may follow the key=value overrides
    if args.lower_out and not args.lower_for:
        p.error("--lower_out needs --lower_for (e.g. --lower_for tpu,cuda)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    from jaxpref.config import load_config

    def command() -> None:
        cfg = load_config(args.config, args.overrides)
        if args.lower_for or args.dry_run_compile:
            lower(cfg, args)
        elif args.dry_run:
            dry_run(cfg, devices=args.dry_run_devices, processes=args.dry_run_processes)
        else:
            run(cfg, show_progress=not args.no_progress)

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
