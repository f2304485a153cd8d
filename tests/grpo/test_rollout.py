"""GRPO's rollout pieces: reward functions called as TRL calls them, the micro-batch layout, and the
rollout hook (groups of G, reproducible sampling, reuse for num_iterations)."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from jaxpref.errors import ConfigError
from jaxpref.grpo_rollout import GRPORollout, Rollout, RolloutSettings, build_micro_batches, reward_inputs
from jaxpref.reward_calls import RewardFunctionError, RewardFunctions, resolve_reward_function

SEEN: dict = {}


def recording_reward(prompts, completions, completion_ids, answer, trainer_state, **kwargs):
    SEEN.update(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answer,
                step=trainer_state.global_step, kwargs=sorted(kwargs))  # fmt: skip
    kwargs["log_metric"]("my_metric", 1.5)
    return [None if c[0]["content"] == "skip" else float(len(c[0]["content"])) for c in completions]


def wrong_length(prompts, completions, **kwargs):
    return [1.0]


def raising(prompts, completions, **kwargs):
    raise KeyError("answer")


def not_a_reward(text, answer):
    return 0.0


def settings(**kw) -> RolloutSettings:
    base = dict(
        num_generations=2, max_completion_length=4, temperature=1.0, top_p=1.0, top_k=0, micro_batch_size=2,
        micro_batches=2, sequence_len=64, num_iterations=1, mask_truncated_completions=False,
        scale_rewards="group", aggregation="sum_then_normalize", reward_weights=(1.0,), log_completions=False,
        stop_token_ids=(2,),
    )  # fmt: skip
    return RolloutSettings(**{**base, **kw})


def test_reward_functions_get_what_trl_passes_and_nan_for_none():
    here = __name__
    fns = RewardFunctions([f"{here}.recording_reward"])
    assert fns.names == ["recording_reward"]
    prompts = [[{"role": "user", "content": "q"}]] * 2
    completions = [[{"role": "assistant", "content": "abc"}], [{"role": "assistant", "content": "skip"}]]
    out = fns(prompts, completions, [[5, 6, 2], [7]], {"answer": ["x", "y"]}, types.SimpleNamespace(global_step=3))
    assert out.shape == (2, 1) and out[0, 0] == 3.0 and np.isnan(out[1, 0])
    assert SEEN["answer"] == ["x", "y"] and SEEN["step"] == 3 and SEEN["completion_ids"] == [[5, 6, 2], [7]]
    assert SEEN["kwargs"] == ["log_extra", "log_metric"] and fns.logged == {"my_metric": [1.5]}
    state = types.SimpleNamespace(global_step=0)
    with pytest.raises(RewardFunctionError, match="returned 1 rewards for 2 completions"):
        RewardFunctions([f"{here}.wrong_length"])(prompts, completions, [[1], [1]], {}, state)
    with pytest.raises(RewardFunctionError, match="raising raised KeyError"):
        RewardFunctions([f"{here}:raising"])(prompts, completions, [[1], [1]], {}, state)
    with pytest.raises(ConfigError, match="cannot import"):
        resolve_reward_function("no_such_module.fn")
    with pytest.raises(ConfigError, match="takes prompts and completions"):
        resolve_reward_function(f"{here}.not_a_reward")


def test_reward_inputs_are_conversations_when_the_prompts_are():
    class Tok:
        def batch_decode(self, ids, skip_special_tokens):
            assert skip_special_tokens
            return ["".join(chr(97 + i) for i in seq if i != 2) for seq in ids]

    rows = [{"prompt": [{"role": "user", "content": "q"}], "answer": "1", "task": "count"}] * 2
    rollout = Rollout([[1, 2]] * 2, [[0, 1, 2], [3]], [False, True], rows)
    prompts, completions, columns = reward_inputs(rollout, Tok())
    assert prompts == [rows[0]["prompt"]] * 2
    assert completions == [[{"role": "assistant", "content": "ab"}], [{"role": "assistant", "content": "d"}]]
    assert columns == {"answer": ["1", "1"], "task": ["count", "count"]}
    plain = Rollout([[1, 2]], [[0]], [False], [{"prompt": "text", "answer": "1"}])
    assert reward_inputs(plain, Tok())[1] == ["a"]


def test_micro_batches_train_exactly_the_completion_tokens():
    rollout = Rollout(
        prompt_ids=[[10, 11, 12], [10, 11, 12], [20, 21], [20, 21]],
        completion_ids=[[5, 2], [6, 7, 8, 9], [2], [4, 4, 4, 4]],
        truncated=[False, True, False, True],
        rows=[{}] * 4,
    )
    adv = np.asarray([1.0, -1.0, 0.5, -0.5], np.float32)
    for mask_truncated in (False, True):
        micro = build_micro_batches(rollout, adv, settings(mask_truncated_completions=mask_truncated))
        assert len(micro) == 2 and all(mb["input_ids"].shape == (2, 64) for mb in micro)
        rows = [(mb, r) for mb in micro for r in range(2)]
        for i, (mb, r) in enumerate(rows):
            prompt, completion = rollout.prompt_ids[i], rollout.completion_ids[i]
            n = len(prompt) + len(completion)
            assert mb["input_ids"][r, :n].tolist() == prompt + completion and not mb["input_ids"][r, n:].any()
            trained = mb["labels"][r][mb["loss_mask"][r]].tolist()
            expect = [] if (mask_truncated and rollout.truncated[i]) else completion
            assert trained == expect
            assert mb["advantages"][r] == adv[i] and mb["segment_ids"][r, :n].tolist() == [1] * n
            assert mb["positions"][r, :n].tolist() == list(range(n)) and not mb["old_logps"].any()
    # fewer completions than rows (the data's last prompts): padding rows are all zero
    short = Rollout(rollout.prompt_ids[:2], rollout.completion_ids[:2], rollout.truncated[:2], [{}] * 2)
    micro = build_micro_batches(short, adv[:2], settings())
    assert not micro[1]["segment_ids"].any() and not micro[1]["loss_mask"].any() and not micro[1]["advantages"].any()


def _prompt_batch(tokenizer, prompts: list[str]) -> dict:
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
    ids = [list(i["input_ids"]) if hasattr(i, "keys") else list(i) for i in ids]
    out = np.zeros((len(ids), 64), np.int32)
    for b, seq in enumerate(ids):
        out[b, : len(seq)] = seq
    rows = np.asarray([json.dumps({"prompt": [{"role": "user", "content": p}], "answer": "1"}) for p in prompts])
    return {
        "prompt_ids": out,
        "prompt_lengths": np.asarray([len(s) for s in ids], np.int32),
        "rows": rows.astype(object),
    }


def count_a(completions, **kwargs):
    return [float(c[0]["content"].count("a")) for c in completions]


def test_the_rollout_samples_groups_reproducibly_and_reuses_them_for_num_iterations():
    from pathlib import Path

    from transformers import AutoTokenizer

    from jaxpref import models

    teacher = Path(__file__).resolve().parents[2] / "demo" / "teacher"
    tok = AutoTokenizer.from_pretrained(teacher)
    model = models.from_pretrained(teacher)
    batch = _prompt_batch(tok, ["How many times does a appear in banana?", "Sort the digits 321"])
    rewards = RewardFunctions([f"{__name__}.count_a"])
    s = settings(micro_batch_size=2, micro_batches=2, num_iterations=2)
    hook = GRPORollout(lambda: model, s, rewards, tok, seed=0, total_steps=4)
    micro, metrics = hook(0, [batch])
    again, _ = GRPORollout(lambda: model, s, rewards, tok, seed=0, total_steps=4)(0, [batch])
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(micro, again))
    prompts = [mb["input_ids"][r, : batch["prompt_lengths"][0]].tolist() for mb in micro for r in range(2)]
    assert prompts[0] == prompts[1] == batch["prompt_ids"][0, : batch["prompt_lengths"][0]].tolist()
    adv = np.concatenate([mb["advantages"] for mb in micro]).reshape(2, 2)
    assert np.allclose(adv.sum(axis=1), 0.0, atol=1e-5)  # group-centred
    # num_iterations 2: step 1 reuses step 0's completions (and old log-probs, computed once)
    reused, m1 = hook(1, [batch])
    assert reused is micro and m1["sampling_seconds"] == 0.0
    assert any(mb["old_logps"].any() for mb in micro)
    for mb in micro:
        assert not mb["old_logps"][~mb["loss_mask"]].any() and (mb["old_logps"][mb["loss_mask"]] < 0).all()
    fresh, _ = hook(2, [batch])
    assert fresh is not micro
    for key in ("reward", "reward_std", "rewards/count_a/mean", "completions/mean_length", "frac_reward_zero_std"):
        assert key in metrics
