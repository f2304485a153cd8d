"""GRPO's reward functions: resolved from import paths once, called on a step's completions as TRL calls them.

``trl.reward_funcs`` entries are ``module.function`` (axolotl's spelling: the module is imported from the
working directory, e.g. ``rewards.accuracy``) or ``package.module:function``. Each is called once per step
with every completion of the step (this process's rows), as TRL 1.16's ``GRPOTrainer`` calls a Python
reward function::

    f(prompts=[...], completions=[...], completion_ids=[[int, ...], ...], trainer_state=TrainerState,
      log_extra=..., log_metric=..., **{column: [value per completion] for every other column of the rows})

Prompts and completions are conversations (``[{"role": "assistant", "content": text}]`` for a
completion) when the rows' prompts are, else strings. Completions are decoded with
``skip_special_tokens=True``. A function returns one float per completion, or None for "not scored"
(read as NaN: left out of the group's mean, advantage 0), as in TRL.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxpref.errors import ConfigError, UserError
from jaxpref.user_code import import_attribute

RewardFn = Callable[..., Sequence[float | None]]


class RewardFunctionError(UserError):
    """A reward function failed or returned the wrong number of rewards."""


def resolve_reward_function(path: str) -> tuple[str, RewardFn]:
    """(name, function) of ``module.function`` or ``package.module:function``; ConfigError otherwise."""
    try:
        fn = import_attribute(path)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(
            f"trl.reward_funcs: cannot import {path!r} ({type(e).__name__}: {e}); give module.function or "
            "package.module:function importable from the working directory"
        ) from None
    if not callable(fn):
        raise ConfigError(f"trl.reward_funcs: {path!r} is not a function")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
    if params and not takes_kwargs and not {"prompts", "completions"} <= set(params):
        raise ConfigError(
            f"trl.reward_funcs: {path} takes ({', '.join(params)}); a reward function takes prompts and completions "
            "(and **kwargs for the other columns), as in TRL"
        )
    return getattr(fn, "__name__", path.replace(":", ".").rpartition(".")[2]), fn


class RewardFunctions:
    """The run's reward functions; ``__call__`` gives rewards [N, F] float32 (NaN: not scored)."""

    def __init__(self, paths: Sequence[str]):
        resolved = [resolve_reward_function(p) for p in paths]
        self.names = [name for name, _ in resolved]
        self.functions = [fn for _, fn in resolved]
        self.logged: dict[str, list[float]] = {}

    def _log_metric(self, name: str, value: float) -> None:
        self.logged.setdefault(name, []).append(float(value))

    def __call__(
        self,
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]],
        columns: dict[str, list[Any]],
        trainer_state: Any,
    ) -> np.ndarray:
        """Rewards [len(completions), F]; ``columns``: the rows' other columns, one value per completion."""
        out = np.zeros((len(completions), len(self.functions)), np.float32)
        kwargs = {
            **columns,
            "trainer_state": trainer_state,
            "log_extra": lambda column, values: None,
            "log_metric": self._log_metric,
        }
        for j, (name, fn) in enumerate(zip(self.names, self.functions)):
            try:
                values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
            except Exception as e:
                raise RewardFunctionError(
                    f"reward function {name} raised {type(e).__name__}: {e} (at step {trainer_state.global_step}); "
                    "fix it and resume with resume_from_checkpoint: auto"
                ) from e
            values = list(values)
            if len(values) != len(completions):
                raise RewardFunctionError(
                    f"reward function {name} returned {len(values)} rewards for {len(completions)} completions; "
                    "it must return one per completion (None: not scored)"
                )
            out[:, j] = [np.nan if v is None else float(v) for v in values]
        return out
