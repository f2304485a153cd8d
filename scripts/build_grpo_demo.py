"""Build the GRPO demo's prompts (offline, deterministic): counting a letter in a word.

    python scripts/build_grpo_demo.py

The start is the shipped SFT model ``demo/teacher/`` (the KD demo's teacher). On the count task it answers
59% of the held-out prompts right with greedy decoding (``demo/teacher/accuracy.json``) but only about 47%
of its samples at temperature 1 are right: the policy GRPO samples from, and improves. Its SFT rows of the
count task (``demo/data/kd_tasks_train.jsonl``) are split: 150 (seeded) are held out and, with the 49 count
rows of ``kd_tasks_eval.jsonl``, form ``demo/data/grpo_count_eval.jsonl`` (199 prompts no GRPO step sees);
the rest are ``demo/data/grpo_count_train.jsonl``. Rows are in TRL's conversational prompt shape with the
reference answer in its own column, which the reward functions receive (``configs/grpo_rewards.py``)::

    {"prompt": [{"role": "user", "content": "How many times does r appear in parrot?"}], "answer": "2"}
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from build_demo_assets import write_jsonl  # noqa: E402
from build_kd_demo import task_of  # noqa: E402

DATA = REPO / "demo" / "data"
TASK = "count"
HELD_OUT = 150


def prompt_rows(path: Path) -> list[dict]:
    """The count-task rows of a KD demo file as {"prompt": [messages but the answer], "answer": str}."""
    out = []
    for line in path.read_text().splitlines():
        messages = json.loads(line)["messages"]
        if task_of(messages[-2]["content"]) == TASK:
            out.append({"prompt": messages[:-1], "answer": messages[-1]["content"]})
    return out


def main() -> int:
    train = prompt_rows(DATA / "kd_tasks_train.jsonl")
    random.Random(0).shuffle(train)
    held_out, train = train[:HELD_OUT], train[HELD_OUT:]
    evals = held_out + prompt_rows(DATA / "kd_tasks_eval.jsonl")
    write_jsonl(DATA / f"grpo_{TASK}_train.jsonl", train)
    write_jsonl(DATA / f"grpo_{TASK}_eval.jsonl", evals)
    print(f"wrote grpo_{TASK}_train.jsonl ({len(train)} prompts), grpo_{TASK}_eval.jsonl ({len(evals)} prompts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
