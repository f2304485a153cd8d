"""GRPO's group-relative advantages from reward-function scores, on the host (numpy), as TRL 1.16.

``GRPOTrainer._generate_and_score_completions`` turns the scores of F reward functions on N completions
(N = prompts x ``num_generations``, the generations of a prompt adjacent, gathered over every process)
into one advantage per completion. NaN marks a completion a function did not score (it returned None);
a completion no function scored is *unscorable*. With weights ``w`` [F] and groups g of G completions:

``sum_then_normalize`` (TRL's default)::

    r_i   = sum_f w_f s_if over the scored f (NaN if unscorable)
    A_i   = r_i - nanmean_{j in g(i)} r_j
    A_i  /= std + 1e-4,  std = nanstd over g(i) ("group") or over all N ("batch"); "none": no division

``normalize_then_sum``::

    s'_if = (s_if - nanmean_{g(i)} s_f) / (nanstd_{g(i)} s_f + 1e-4)
    r_i   = sum_f w_f s'_if over the non-NaN terms (NaN if unscorable)
    A_i   = (r_i - nanmean_N r) / (nanstd_N r + 1e-4)        (whatever scale_rewards says, as TRL)

``nanstd`` is the standard deviation over the non-NaN values with Bessel's correction (NaN for fewer
than two), so a group with one scored completion gives it advantage NaN -> 0. Every NaN advantage
(unscorable completions, degenerate groups) becomes 0. Arithmetic is float32, as TRL's tensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
_F32 = np.float32


def _nanmean(x: np.ndarray, axis=None, keepdims: bool = False) -> np.ndarray:
    with warnings.catch_warnings():  # all-NaN slices give NaN, as torch.nanmean
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis, keepdims=keepdims).astype(_F32)


def nanstd(x: np.ndarray, axis=None, keepdims: bool = False) -> np.ndarray:
    """TRL's ``nanstd``: std over the non-NaN values with Bessel's correction; NaN with fewer than 2."""
    x = np.asarray(x, _F32)
    mean = _nanmean(x, axis=axis, keepdims=True)
    var = _nanmean((x - mean) ** 2, axis=axis, keepdims=True)
    count = np.sum(~np.isnan(x), axis=axis, keepdims=True).astype(_F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        correction = np.where(count > 1, count / (count - 1), np.nan).astype(_F32)
    std = np.sqrt(var * correction).astype(_F32)
    if keepdims:
        return std
    return std.reshape(()) if axis is None else np.squeeze(std, axis=axis)


def _weighted_nansum(values: np.ndarray, weights: np.ndarray, unscorable: np.ndarray) -> np.ndarray:
    """sum_f w_f v_if over the non-NaN terms (torch ``nansum``), NaN on unscorable rows."""
    out = np.nansum(values * weights[None, :], axis=1).astype(_F32)
    return np.where(unscorable, np.float32(np.nan), out)


def group_advantages(
    rewards_per_func: np.ndarray,
    weights: Sequence[float] | np.ndarray | None,
    num_generations: int,
    scale_rewards: str = "group",
    aggregation: str = "sum_then_normalize",
    names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Advantages of N completions from F reward functions' scores (the module docstring has the formulas).

    Args:
      rewards_per_func: ``[N, F]`` float scores, NaN = not scored; N a multiple of ``num_generations``,
        each prompt's completions adjacent.
      weights: ``[F]`` reward weights (None: 1 each).
      num_generations: G, completions per prompt.
      scale_rewards: "group" | "batch" | "none" (TRL ``scale_rewards``).
      aggregation: "sum_then_normalize" | "normalize_then_sum" (TRL ``multi_objective_aggregation``).
      names: the reward functions' names for the per-function metrics (default ``func0``, ...).

    Returns:
      ``(advantages [N] float32, rewards [N] float32, metrics)``. ``rewards`` is TRL's logged reward:
      the weighted sum of the raw scores, NaN for unscorable completions. ``metrics`` (TRL's names):
      ``reward`` and ``reward_std`` (nanmean / nanstd of ``rewards``), ``frac_reward_zero_std`` (the
      fraction of completions whose normalising std is 0: their group's with ``group``/``none``, the
      batch's otherwise), and ``rewards/<name>/mean`` and ``rewards/<name>/std`` per function (over the
      completions it scored). NaN where TRL logs NaN.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards {scale_rewards!r}: expected one of {SCALE_REWARDS}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation {aggregation!r}: expected one of {AGGREGATIONS}")
    scores = np.asarray(rewards_per_func, _F32)
    if scores.ndim != 2:
        raise ValueError(f"rewards_per_func must be [N, F], got shape {scores.shape}")
    n, f = scores.shape
    g = int(num_generations)
    if g < 1 or n % g:
        raise ValueError(f"{n} completions are not whole groups of num_generations={g}")
    w = np.ones(f, _F32) if weights is None else np.asarray(weights, _F32)
    if w.shape != (f,):
        raise ValueError(f"{f} reward functions but weights of shape {w.shape}")
    names = [f"func{i}" for i in range(f)] if names is None else list(names)
    if len(names) != f:
        raise ValueError(f"{f} reward functions but {len(names)} names")
    unscorable = np.isnan(scores).all(axis=1)
    eps = np.float32(1e-4)

    with np.errstate(invalid="ignore"):
        if aggregation == "sum_then_normalize":
            rewards = _weighted_nansum(scores, w, unscorable)
            grouped = rewards.reshape(-1, g)
            mean = np.repeat(_nanmean(grouped, axis=1), g)
            if scale_rewards in ("group", "none"):
                std = np.repeat(nanstd(grouped, axis=1), g) if g > 1 else np.zeros(n, _F32)
            else:
                std = np.broadcast_to(nanstd(rewards), (n,)) if n > 1 else np.zeros(n, _F32)
            advantages = rewards - mean
            if scale_rewards != "none":
                advantages = advantages / (std + eps)
        else:
            grouped = scores.reshape(-1, g, f)
            mean_k = _nanmean(grouped, axis=1, keepdims=True)
            std_k = nanstd(grouped, axis=1, keepdims=True) if g > 1 else np.zeros_like(mean_k)
            normalised = ((grouped - mean_k) / (std_k + eps)).reshape(n, f)
            rewards_n = _weighted_nansum(normalised, w, unscorable)
            std = np.broadcast_to(nanstd(rewards_n), (n,)) if n > 1 else np.zeros(n, _F32)
            advantages = (rewards_n - _nanmean(rewards_n)) / (std + eps)
        is_std_zero = np.isclose(std, 0.0)
    advantages = np.nan_to_num(advantages.astype(_F32), nan=0.0)

    metrics: dict[str, float] = {}
    for i, name in enumerate(names):
        metrics[f"rewards/{name}/mean"] = float(_nanmean(scores[:, i]))
        metrics[f"rewards/{name}/std"] = float(nanstd(scores[:, i]))
    logged = _weighted_nansum(scores, w, unscorable)
    metrics["reward"] = float(_nanmean(logged))
    metrics["reward_std"] = float(nanstd(logged))
    metrics["frac_reward_zero_std"] = float(np.mean(is_std_zero.astype(_F32)))
    return advantages, logged, metrics


__all__ = ["AGGREGATIONS", "SCALE_REWARDS", "group_advantages", "nanstd"]
