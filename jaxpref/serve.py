"""``python -m jaxpref.serve --config FILE.yaml [--host H] [--port P] [key=value ...]``: serve a teacher.

Serves ``kd_teacher_model`` (with ``kd_teacher_adapter`` if set; sharded by the config's ``mesh``,
parameters in ``kd_teacher_dtype``) with vLLM's ``/v1/completions`` and SGLang's ``/generate``
prompt-log-prob APIs, so that a KD run elsewhere (``kd_online_server_base_url``), axolotl's online
teacher or any OpenAI client can ask it for the teacher's top-k. The config is a teacher-pass config
(``kd_teacher_model`` and the tokenizer settings; no datasets needed). What the server answers and how
it batches: ``jaxpref.teacher_server``; docs/kd_server.md.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: the re-exec restarts the interpreter
    from jaxpref.cli import reexec_with_malloc_tuning

    reexec_with_malloc_tuning()

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

from jaxpref.cli import run_command, setup_logging
from jaxpref.teacher_pass import load_teacher_config
from jaxpref.teacher_server import Batcher, Scorer, ServeSettings, TeacherAPI, start

logger = logging.getLogger("jaxpref")
DEFAULTS = ServeSettings()


def build_api(cfg: Any, settings: ServeSettings) -> TeacherAPI:
    """The teacher of ``cfg`` on its mesh, its tokenizer, and the request handlers around them."""
    from jaxpref import sharding as shd
    from jaxpref.assembly import build_teacher
    from jaxpref.data import DataSettings, load_tokenizer

    tokenizer = load_tokenizer(DataSettings.from_config(cfg))
    mesh = shd.make_mesh(cfg.mesh.model_dump() if cfg.mesh is not None else None)
    teacher = build_teacher(cfg, len(tokenizer), mesh)
    vocab = teacher.config.vocab_size
    scorer = Scorer(teacher, mesh, min(settings.max_top_k, vocab), settings.max_batch_tokens, settings.max_model_len)
    return TeacherAPI(Batcher(scorer, settings.batch_wait_ms / 1000), tokenizer, vocab, settings)


def serve(cfg: Any, settings: ServeSettings) -> None:
    """Serve until interrupted."""
    api = build_api(cfg, settings)

    async def main() -> None:
        runner, port = await start(api, settings.host, settings.port)
        logger.info("serving %s on http://%s:%d (vLLM /v1/completions, SGLang /generate)", settings.model_name,
                    settings.host, port)  # fmt: skip
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()
            await api.batcher.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxpref.serve", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML config with kd_teacher_model (a teacher-pass config)")
    p.add_argument("--host", default=DEFAULTS.host, help=f"address to listen on (default {DEFAULTS.host})")
    p.add_argument("--port", type=int, default=DEFAULTS.port, help=f"port (default {DEFAULTS.port}; 0: any free)")
    p.add_argument("--served_model_name", help="the model name of the API (default: kd_teacher_model's directory)")
    p.add_argument("--max_top_k", type=int, default=DEFAULTS.max_top_k, help="largest k a request may ask for")
    p.add_argument("--max_model_len", type=int, help="longest prompt in tokens (default: sequence_len)")
    p.add_argument(
        "--max_batch_tokens", type=int, default=DEFAULTS.max_batch_tokens, help="B x T of one forward pass"
    )
    p.add_argument(
        "--batch_wait_ms", type=float, default=DEFAULTS.batch_wait_ms,
        help="how long a batch waits for more requests before it runs (default: none)",
    )  # fmt: skip
    p.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nesting (mesh.tensor=2)")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()

    def command() -> None:
        cfg = load_teacher_config(args.config, args.overrides, require_datasets=False)
        settings = dataclasses.replace(
            DEFAULTS,
            host=args.host,
            port=args.port,
            model_name=args.served_model_name or Path(str(cfg.kd_teacher_model).rstrip("/")).name,
            max_top_k=args.max_top_k,
            max_model_len=args.max_model_len or cfg.sequence_len,
            max_batch_tokens=args.max_batch_tokens,
            batch_wait_ms=args.batch_wait_ms,
        )
        serve(cfg, settings)

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
