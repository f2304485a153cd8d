"""``python -m jaxpref.generate --model DIR --prompts FILE.jsonl [--output FILE] ...``: sample from a model.

Each line of ``--prompts`` is a JSON object with ``messages`` (a conversation; a final assistant turn
is taken as the reference answer, not as part of the prompt) or ``prompt`` (a string, sent as one user
turn). Prompts are rendered with the chat template (``--chat_template``: a template shipped with
jaxpref, or the tokenizer's own) with the generation prompt added, and completed by
``jaxpref.generation.generate`` (prefill + KV-cache decode in one compiled loop; greedy unless
``--temperature`` > 0). Generation stops at the tokenizer's eos or the template's end-of-turn token.

Output (``--output``, default stdout): one JSON line per usable prompt: ``index`` (its line in the
input, from 0), ``prompt`` (the rendered text), ``completion`` (decoded, special tokens skipped),
``token_ids``, ``finished`` (ended by a stop token) and ``reference`` when the row had one. Unusable
lines are counted per reason and reported at the end, like the data pipeline's bad rows; if no line
is usable the command fails with exit code 2.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: the re-exec restarts the interpreter
    from jaxpref.cli import reexec_with_malloc_tuning

    reexec_with_malloc_tuning()

import argparse
import collections
import dataclasses
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from jaxpref.cli import run_command, setup_logging
from jaxpref.errors import ConfigError, DataError

logger = logging.getLogger("jaxpref")


@dataclasses.dataclass
class PromptRow:
    index: int
    messages: list[dict[str, Any]]
    reference: str | None


class BadLine(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def parse_line(index: int, line: str) -> PromptRow:
    """A prompt row from one JSONL line; :class:`BadLine` (with a report reason) when it is unusable."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadLine("not_json", f"not JSON: {e}") from None
    if not isinstance(row, dict):
        raise BadLine("not_an_object", "not a JSON object")
    if isinstance(row.get("messages"), list):
        messages = row["messages"]
        if not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise BadLine("bad_messages", "messages must be a non-empty list of {role, content} strings")
        reference = None
        if messages[-1]["role"] == "assistant":
            reference, messages = messages[-1]["content"], messages[:-1]
        if not messages:
            raise BadLine("bad_messages", "only an assistant turn: nothing to prompt with")
        return PromptRow(index, messages, reference)
    if isinstance(row.get("prompt"), str) and row["prompt"]:
        return PromptRow(index, [{"role": "user", "content": row["prompt"]}], row.get("reference"))
    raise BadLine("missing_field", "no 'messages' list and no non-empty 'prompt' string")


def read_prompts(path: Path) -> tuple[list[PromptRow], collections.Counter, dict[str, str]]:
    """The usable rows, the count of unusable lines per reason, and an example per reason."""
    if not path.is_file():
        raise DataError(f"--prompts {path}: no such file; give a JSONL file of {{messages}} or {{prompt}} rows")
    rows, bad, examples = [], collections.Counter(), {}
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rows.append(parse_line(i, line))
            except BadLine as e:
                bad[e.reason] += 1
                examples.setdefault(e.reason, f"line {i + 1}: {e}")
    return rows, bad, examples


def chat_template(tokenizer: Any, choice: str | None) -> str:
    from jaxpref.data.chat_templates import SHIPPED_TEMPLATES, shipped_template

    if choice and choice != "tokenizer_default":
        return shipped_template(choice)
    if tokenizer.chat_template:
        return tokenizer.chat_template
    raise ConfigError(
        f"the tokenizer has no chat template; pass --chat_template with one of {', '.join(SHIPPED_TEMPLATES)}"
    )


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from jaxpref import lora, models
    from jaxpref.generation import SamplingSettings, generate
    from jaxpref.generation.prompts import stop_token_ids

    rows, bad, examples = read_prompts(Path(args.prompts))
    if not rows:
        example = next(iter(examples.values()), "the file is empty")
        raise DataError(f"--prompts {args.prompts}: no usable line ({dict(bad)}); e.g. {example}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {args.model}: cannot load its tokenizer ({e}); pass --tokenizer DIR") from None
    template = chat_template(tokenizer, args.chat_template)
    dtype = {"float32": jax.numpy.float32, "bfloat16": jax.numpy.bfloat16}[args.dtype]
    model = models.from_pretrained(args.model, dtype=dtype, param_dtype=dtype)
    if args.adapter:
        lora.load_peft_adapter(model, args.adapter)
    settings = SamplingSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        stop_token_ids=stop_token_ids(tokenizer),
    )  # fmt: skip
    limit = model.config.max_position_embeddings - args.max_new_tokens
    prompts, kept = [], []
    for row in rows:
        text = tokenizer.apply_chat_template(row.messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > limit:
            bad["too_long"] += 1
            examples.setdefault("too_long", f"line {row.index + 1}: {len(ids)} tokens > {limit} (positions - new)")
            continue
        prompts.append((text, ids))
        kept.append(row)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    key = jax.random.key(args.seed)
    written = 0
    try:
        bar = tqdm(total=len(prompts), unit="prompt", disable=args.no_progress, file=sys.stderr)
        for i, chunk in enumerate(batches(list(zip(kept, prompts)), args.batch_size)):
            result = generate(model, [ids for _, (_, ids) in chunk], settings, key=jax.random.fold_in(key, i),
                              use_adapters=True)  # fmt: skip
            for (row, (text, _)), tokens, finished in zip(chunk, result.tokens, result.finished):
                line = {"index": row.index, "prompt": text,
                        "completion": tokenizer.decode(tokens, skip_special_tokens=True),
                        "token_ids": [int(t) for t in tokens], "finished": bool(finished)}  # fmt: skip
                if row.reference is not None:
                    line["reference"] = row.reference
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
                written += 1
            bar.update(len(chunk))
        bar.close()
    finally:
        if args.output:
            out.close()
    for reason, n in sorted(bad.items()):
        logger.warning("skipped %d line(s): %s, e.g. %s", n, reason, examples[reason])
    logger.info("wrote %d completion(s)%s", written, f" to {args.output}" if args.output else "")
    return {"written": written, "skipped": dict(bad)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxpref.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a Hugging Face model directory (or an exported jaxpref run)")
    p.add_argument("--adapter", help="a PEFT LoRA adapter directory applied to --model")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--prompts", required=True, help="JSONL: {messages: [...]} or {prompt: str} per line")
    p.add_argument("--chat_template", help="a template shipped with jaxpref (chatml, llama3, qwen3, ...); "
                   "default: the tokenizer's own")  # fmt: skip
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top_k", type=int, help="sample from the k most likely tokens")
    p.add_argument("--top_p", type=float, help="sample from the smallest set of tokens with this probability")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of the sampling")
    p.add_argument("--batch_size", type=int, default=16, help="prompts per compiled call")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--output", help="output JSONL (default: stdout)")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.batch_size < 1 or args.temperature < 0:
        p.error("--max_new_tokens and --batch_size must be >= 1 and --temperature >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
