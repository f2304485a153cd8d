"""``python -m jaxpref.teacher --config FILE.yaml [key=value ...]``: write a KD dataset from a teacher.

Reads the chat rows of ``datasets`` (every entry a ``chat_template`` type), tokenizes them exactly as
the SFT/KD pipeline does (``type: chat_template`` with the run's tokenizer, chat template and dataset
keys), runs ``kd_teacher_model`` over them in batches and writes KD rows of format (b)
(docs/data.md "KD datasets", "Teacher pass"): each input row with ``target_token_ids`` [L][K] and
``logprobs`` [L][K] added, *token-aligned* (row i is the teacher's distribution over token i given
the tokens before it; row 0 is null, like vLLM ``prompt_logprobs``), log-probs at temperature
``teacher_temperature`` (T_gen) normalised over the full vocabulary. K = ``kd_teacher_top_k``.

Output, in ``teacher_output_dir``: ``part-NNNNN.jsonl`` (or ``.parquet``) shards of
``teacher_shard_rows`` input rows each (rows of one dataset entry per shard), ``teacher_info.json``
(counts and the dataset entry to paste into a KD config) and ``.teacher/`` (the run's fingerprint and
per-shard counts). Every file is written atomically (temporary file + rename), so a killed run
resumes: a rerun with the same config skips the finished shards and produces byte-identical files; a
different config for an existing directory is an error. Shards are split over processes (process i
of n writes shards i, i + n, ...): either the JAX processes of a multi-host launch (joined through
``jaxpref.distributed`` as ``jaxpref.train`` does; the output directory must be shared), or
independent processes numbered by ``--process_index``/``--process_count``. The last process to
finish writes ``teacher_info.json``. Each process runs the teacher on its own (local) devices with the
config's ``mesh`` (parameters sharded by ``logical_axis_rules``), with no cross-process collective.

This module is the command line; the pass is ``jaxpref.teacher_pass`` (:func:`run_teacher`), the
output directory and its rows ``jaxpref.teacher_output``.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: the re-exec restarts the interpreter
    from jaxpref.cli import reexec_with_malloc_tuning

    reexec_with_malloc_tuning()

import argparse
import sys

from jaxpref.cli import run_command, setup_logging
from jaxpref.teacher_pass import load_teacher_config, run_teacher

# ----------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxpref.teacher", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML config (kd_teacher_model, datasets, kd_teacher_top_k, ...)")
    p.add_argument("--output", help="same as teacher_output_dir=DIR")
    p.add_argument("--process_index", type=int, help="this process's index (default: jax.process_index())")
    p.add_argument("--process_count", type=int, help="number of processes (default: jax.process_count())")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nesting (mesh.tensor=2)")
    return p.parse_intermixed_args(argv)  # flags may follow the key=value overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()

    def command() -> None:
        overrides = list(args.overrides)
        if args.output:
            overrides.append(f"teacher_output_dir={args.output}")
        cfg = load_teacher_config(args.config, overrides)
        run_teacher(
            cfg, process_index=args.process_index, process_count=args.process_count, show_progress=not args.no_progress
        )

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
