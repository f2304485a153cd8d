"""Rebuild the embedded demo assets in ``demo/`` from scratch, offline and deterministically.

    python scripts/build_demo_assets.py [--out demo] [--seed 0]

Writes
* ``demo/data/sft_train.jsonl`` (4000 rows) and ``demo/data/sft_eval.jsonl`` (200 held-out rows):
  chat rows ``{"messages": [{"role": "system"?, ...}, {"role": "user", ...}, {"role": "assistant", ...}]}``
  for a synthetic, rule-based task mix (integer arithmetic, a two-step chain, reversing a word, sorting
  digits, counting a letter) that a tiny model learns in a few CPU minutes.
* ``demo/tiny-llama/``: a byte-level BPE tokenizer (512 entries: 256 bytes, 3 special tokens, merges)
  trained on the training rows, with the ChatML template, eos ``<|im_end|>`` and pad ``<|endoftext|>``;
  and ``config.json`` of a tiny Llama (no weights: configs use ``random_init_weights: true``).

Running it twice gives byte-identical files (``--check`` verifies that against the committed ones).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "jaxpref" / "templates"

N_TRAIN = 4000
N_EVAL = 200
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "lemon",
    "garden",
    "window",
    "silver",
    "planet",
    "rocket",
    "candle",
    "forest",
    "bridge",
    "orange",
    "pencil",
    "marble",
    "jacket",
    "castle",
    "dragon",
    "winter",
    "summer",
    "yellow",
    "purple",
    "monkey",
    "rabbit",
    "turtle",
    "parrot",
    "banana",
    "cherry",
    "butter",
    "cookie",
    "guitar",
    "violin",
    "hammer",
    "ladder",
    "mirror",
    "needle",
    "pillow",
    "basket",
    "bottle",
    "carpet",
    "doctor",
    "engine",
    "farmer",
    "flower",
    "hunter",
    "island",
    "jungle",
    "kettle",
    "lizard",
    "meadow",
    "number",
    "ocean",
    "pepper",
    "quartz",
    "saddle",
    "tomato",
    "velvet",
    "wallet",
    "yogurt",
    "zipper",
    "anchor",
    "beacon",
    "cactus",
    "dolphin",
    "falcon",
    "glacier",
    "harbor",
    "igloo",
    "jigsaw",
    "koala",
    "lantern",
    "magnet",
    "nectar",
    "oyster",
    "puzzle",
    "quiver",
    "raven",
    "sunset",
    "tunnel",
    "umbrella",
    "valley",
    "walrus",
    "yacht",
    "zebra",
    "bakery",
    "canyon",
    "desert",
    "ember",
    "fossil",
    "goblin",
    "helmet",
    "insect",
    "jewel",
    "kitten",
    "legend",
    "mango",
    "nickel",
    "olive",
    "pirate",
    "quill",
    "ribbon",
    "spider",
    "timber",
    "unicorn",
    "vortex",
    "wizard",
    "cobalt",
    "shadow",
    "breeze",
    "copper",
]

SYSTEM_PROMPTS = ["You are a careful assistant.", "Answer precisely.", "You are good at puzzles."]


def _arith(rng: random.Random) -> tuple[str, str]:
    op = rng.choice("+-*")
    if op == "+":
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        result = a + b
    elif op == "-":
        a = rng.randint(0, 999)
        b = rng.randint(0, a)
        result = a - b
    else:
        a, b = rng.randint(2, 99), rng.randint(2, 9)
        result = a * b
    expr = f"{a}{op}{b}"
    prompt = rng.choice([f"Compute {expr}", f"What is {expr}?", f"{expr}=?"])
    return prompt, f"{expr}={result}"


def _chain(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    c = rng.randint(0, a + b)
    s = a + b
    return f"Compute {a}+{b}-{c}", f"{a}+{b}={s}, {s}-{c}={s - c}"


def _reverse(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return rng.choice([f"Reverse the word {w}", f"Spell {w} backwards"]), w[::-1]


def _sort_digits(rng: random.Random) -> tuple[str, str]:
    d = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 7)))
    return f"Sort the digits {d}", "".join(sorted(d))


def _count(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    ch = rng.choice(w) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    return f"How many times does {ch} appear in {w}?", str(w.count(ch))


TASKS = [(_arith, 4), (_chain, 2), (_reverse, 2), (_sort_digits, 1), (_count, 1)]


def make_rows(rng: random.Random, n: int, exclude: set[str]) -> list[dict]:
    """``n`` chat rows whose user prompts are unique and not in ``exclude`` (which is updated)."""
    funcs = [f for f, w in TASKS for _ in range(w)]
    rows = []
    while len(rows) < n:
        prompt, answer = rng.choice(funcs)(rng)
        if prompt in exclude:
            continue
        exclude.add(prompt)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.25:
            messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def train_tokenizer(rows: list[dict]):
    """Byte-level BPE over the message texts; digits are split one per token (easier arithmetic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    # Untrimmed offsets: character spans of tokens are exact, which the trainable-token mask relies on.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [m["role"] + "\n" + m["content"] for row in rows for m in row["messages"]]
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def build(out: Path, seed: int) -> None:
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    seen: set[str] = set()
    train = make_rows(rng, N_TRAIN, seen)
    eval_rows = make_rows(rng, N_EVAL, seen)  # prompts disjoint from train
    write_jsonl(out / "data" / "sft_train.jsonl", train)
    write_jsonl(out / "data" / "sft_eval.jsonl", eval_rows)

    model_dir = out / "tiny-llama"
    model_dir.mkdir(parents=True, exist_ok=True)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(train),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>"],
        chat_template=(TEMPLATES / "chatml.jinja").read_text(),
        model_max_length=512,
    )
    hf_tok.save_pretrained(model_dir)

    # Written by hand (not LlamaConfig.to_json_file) so that the file has the classic top-level
    # `rope_theta` that checkpoints on the Hub carry, and nothing version-specific.
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": -(-len(hf_tok) // 64) * 64,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": None,
        "eos_token_id": hf_tok.eos_token_id,
        "pad_token_id": hf_tok.pad_token_id,
        "torch_dtype": "float32",
    }
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _same_tree(a: Path, b: Path) -> bool:
    """``b`` holds every file of the fresh build ``a``, byte-identical. Files only in ``b`` are other
    demos' assets (e.g. ``demo/data/kd_*`` from ``scripts/build_kd_demo.py``) and are not compared."""
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(_same_tree(a / d, b / d) for d in cmp.common_dirs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="rebuild in a temp dir and compare with --out")
    args = parser.parse_args(argv)
    if not args.check:
        shutil.rmtree(args.out / "tiny-llama", ignore_errors=True)
        for name in ("sft_train.jsonl", "sft_eval.jsonl"):  # demo/data also holds other demos' files
            (args.out / "data" / name).unlink(missing_ok=True)
        build(args.out, args.seed)
        print(f"wrote {args.out}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), args.seed)
        same = all(_same_tree(Path(tmp) / sub, args.out / sub) for sub in ("data", "tiny-llama"))
    print("demo assets are up to date" if same else f"demo assets in {args.out} differ from a fresh build")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
