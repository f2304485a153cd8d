"""Build the shipped synthetic preference task (``demo/data/pref_*.jsonl``), offline and deterministically.

    python scripts/build_preference_demo.py [--out demo/data] [--seed 1] [--check]

Every pair has a chosen answer that follows a rule and a rejected answer that breaks it: the rule is
"sorted" (a list of characters in ascending order), and the rejected answer is the input as given, the
characters in descending order, or the sorted list with one adjacent pair swapped:

* sorting digits (two thirds) ``Sort the digits 5120`` -> ``0125`` vs ``5120`` / ``5210`` / ``0215``;
* sorting the letters of a made-up word ``Sort the letters of tolbak`` -> ``abklot`` vs ``tolbak`` /
  ``tolkba`` / ``abkolt``.

Prompts are in the style of the SFT demo task (``demo/data/sft_*.jsonl``) but never the same prompt
(held out from SFT and between train and eval). The rule is visible in the answer itself, so a tiny
model learns the preference in a few hundred CPU steps. Tried first and dropped: off-by-one arithmetic
and corrupted reversals, on which DPO's held-out reward accuracy stayed at chance at that budget (the
tiny model does not know the answers, and made-up words are split into arbitrary BPE pieces).

The same task is written in the dataset shapes of the seed examples (one file pair per shape):

* ``pref_intel_{train,eval}.jsonl``, for ``chatml.intel``: Intel/orca_dpo_pairs (system, may be "",
  question, chosen, rejected);
* ``pref_ultra_{train,eval}.jsonl``, for ``chatml``: argilla/ultrafeedback-binarized-preferences (source,
  instruction, chosen_response, chosen_rating, rejected_response, rejected_rating);
* ``pref_argilla_{train,eval}.jsonl``, for ``chat_template.argilla``: argilla/ultrafeedback-binarized-
  preferences-cleaned (source, prompt, chosen/rejected as [user, assistant] messages, ratings, models);
* ``pref_kto_{train,eval}.jsonl``, for ``llama3.ultra`` (KTO): argilla/ultrafeedback-binarized-preferences-
  cleaned-kto (prompt, completion, label; one true and one false row per prompt, in random order).

And for an SFT warm start before DPO (``configs/sft_pref.yaml``), chat rows ``{"messages": [system?, user,
assistant]}`` whose answer is the chosen one: ``pref_sft_train.jsonl`` (the intel and ultra train pairs,
1400 rows: the pairs ``configs/dpo.yaml`` trains on) and ``pref_sft_eval.jsonl`` (the 200 intel eval pairs).

Prompts are unique across all files. Running it twice gives byte-identical files (``--check`` compares a
fresh build with the committed one; other files in ``demo/data`` are not touched).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import random
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SFT_DATA = REPO / "demo" / "data"

# rows per file: (train, eval); the KTO files hold two rows (true, false) per prompt
SIZES = {"intel": (1000, 200), "ultra": (400, 100), "argilla": (500, 100), "kto": (500, 100)}
SYSTEM_PROMPTS = ["You are a careful assistant.", "Answer precisely.", "You are good at puzzles."]
LETTERS = "abcdefghiklmnoprstuvw"
Pair = tuple[str, str, str, str]  # task, prompt, chosen, rejected


def _word(rng: random.Random) -> str:
    """A made-up lower-case word of 4-7 letters with no letter twice in a row."""
    out = [rng.choice(LETTERS)]
    while len(out) < rng.randint(4, 7):
        c = rng.choice(LETTERS)
        if c != out[-1]:
            out.append(c)
    return "".join(out)


def _unsorted(good: str, rng: random.Random, given: str) -> str:
    """A rule-breaking answer for the sorted string ``good``: the input as given, the characters in
    descending order, or ``good`` with one adjacent pair of different characters swapped."""
    kind = rng.randrange(3)
    if kind == 0:
        return given
    if kind == 1:
        return good[::-1]
    i = rng.choice([i for i in range(len(good) - 1) if good[i] != good[i + 1]])
    return good[:i] + good[i + 1] + good[i] + good[i + 2 :]


def sort_digits(rng: random.Random) -> Pair:
    while True:
        d = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 7)))
        good = "".join(sorted(d))
        if d != good:
            return "sort_digits", f"Sort the digits {d}", good, _unsorted(good, rng, d)


def sort_letters(rng: random.Random) -> Pair:
    while True:
        w = _word(rng)
        good = "".join(sorted(w))
        if w != good:
            return "sort_letters", f"Sort the letters of {w}", good, _unsorted(good, rng, w)


TASKS: list[tuple[Callable[[random.Random], Pair], int]] = [
    (sort_digits, 2),
    (sort_letters, 1),
]


def sft_prompts() -> set[str]:
    """User prompts of the SFT demo data (kept out of the preference data)."""
    seen: set[str] = set()
    for name in ("sft_train.jsonl", "sft_eval.jsonl"):
        path = SFT_DATA / name
        if path.exists():
            for line in path.open():
                seen.update(m["content"] for m in json.loads(line)["messages"] if m["role"] == "user")
    return seen


def make_pairs(rng: random.Random, n: int, exclude: set[str]) -> list[Pair]:
    """``n`` pairs whose prompts are unique and not in ``exclude`` (which is updated)."""
    funcs = [f for f, w in TASKS for _ in range(w)]
    pairs: list[Pair] = []
    while len(pairs) < n:
        pair = rng.choice(funcs)(rng)
        if pair[1] in exclude:
            continue
        exclude.add(pair[1])
        pairs.append(pair)
    return pairs


def intel_row(pair: Pair, rng: random.Random) -> dict:
    _, prompt, chosen, rejected = pair
    system = rng.choice(SYSTEM_PROMPTS) if rng.random() < 0.5 else ""
    return {"system": system, "question": prompt, "chosen": chosen, "rejected": rejected}


def ultra_row(pair: Pair, rng: random.Random) -> dict:
    task, prompt, chosen, rejected = pair
    return {
        "source": task,
        "instruction": prompt,
        "chosen_response": chosen,
        "chosen_rating": 5.0,
        "rejected_response": rejected,
        "rejected_rating": float(rng.choice([1, 2])),
    }


def argilla_row(pair: Pair, rng: random.Random) -> dict:
    task, prompt, chosen, rejected = pair
    user = {"role": "user", "content": prompt}
    return {
        "source": task,
        "prompt": prompt,
        "chosen": [user, {"role": "assistant", "content": chosen}],
        "chosen-rating": 5.0,
        "chosen-model": "rule",
        "rejected": [user, {"role": "assistant", "content": rejected}],
        "rejected-rating": float(rng.choice([1, 2])),
        "rejected-model": "corrupted",
    }


def kto_rows(pair: Pair, rng: random.Random) -> list[dict]:
    _, prompt, chosen, rejected = pair
    rows = [
        {"prompt": prompt, "completion": chosen, "label": True},
        {"prompt": prompt, "completion": rejected, "label": False},
    ]
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def sft_row(row: dict) -> dict:
    """An intel or ultra pair row -> a chat row whose answer is the chosen one (for the SFT warm start)."""
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    prompt, chosen = row.get("question") or row["instruction"], row.get("chosen") or row["chosen_response"]
    return {"messages": [*system, {"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}]}


def build(out: Path, seed: int) -> None:
    rng = random.Random(seed)
    seen = sft_prompts()
    written: dict[str, list[dict]] = {}
    for shape, (n_train, n_eval) in SIZES.items():
        for split, n in (("train", n_train), ("eval", n_eval)):
            pairs = make_pairs(rng, n, seen)
            if shape == "kto":
                rows = [row for pair in pairs for row in kto_rows(pair, rng)]
            else:
                to_row = {"intel": intel_row, "ultra": ultra_row, "argilla": argilla_row}[shape]
                rows = [to_row(pair, rng) for pair in pairs]
            write_jsonl(out / f"pref_{shape}_{split}.jsonl", rows)
            written[f"{shape}_{split}"] = rows
    # the SFT warm start (configs/sft_pref.yaml): the chosen answers of configs/dpo.yaml's training pairs
    sft_train = [sft_row(r) for r in [*written["intel_train"], *written["ultra_train"]]]
    write_jsonl(out / "pref_sft_train.jsonl", sft_train)
    write_jsonl(out / "pref_sft_eval.jsonl", [sft_row(r) for r in written["intel_eval"]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SFT_DATA)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--check", action="store_true", help="rebuild in a temp dir and compare with --out")
    args = parser.parse_args(argv)
    if not args.check:
        build(args.out, args.seed)
        print(f"wrote {args.out}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), args.seed)
        names = sorted(p.name for p in Path(tmp).iterdir())
        same = all((args.out / n).exists() and filecmp.cmp(Path(tmp) / n, args.out / n, shallow=False) for n in names)
    print("preference demo data is up to date" if same else f"{args.out} differs from a fresh build")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
