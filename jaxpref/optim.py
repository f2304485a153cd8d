"""Optimizer and learning-rate schedule from the config, with optax.

Schedules follow Hugging Face's (what axolotl uses): linear warmup from 0 at optimizer step 0, then
cosine to ``cosine_min_lr_ratio * learning_rate``, linear to 0, or constant. Weight decay skips biases
and norm scales, as the Hugging Face Trainer does.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxpref.errors import ConfigError


def warmup_steps_for(cfg: Any, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return int(cfg.warmup_steps)
    if cfg.warmup_ratio:
        return int(round(cfg.warmup_ratio * total_steps))
    return 0


def make_schedule(cfg: Any, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the optimizer step (0-based)."""
    lr = float(cfg.learning_rate)
    warmup = min(warmup_steps_for(cfg, total_steps), max(total_steps - 1, 0))
    decay = max(total_steps - warmup, 1)
    kind = cfg.lr_scheduler
    if kind == "cosine":
        min_ratio = float(cfg.cosine_min_lr_ratio or 0.0)
        main = optax.cosine_decay_schedule(lr, decay, alpha=min_ratio)
    elif kind == "linear":
        main = optax.linear_schedule(lr, 0.0, decay)
    elif kind == "constant":
        main = optax.constant_schedule(lr)
    else:
        raise ConfigError(f"lr_scheduler: unknown schedule {kind!r}; use cosine, linear or constant.")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: everything but biases and norm scales."""

    def decays(path: tuple[Any, ...], _: Any) -> bool:
        names = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path).lower()
        return "bias" not in names and "norm" not in names

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation (gradient clipping included) and its schedule."""
    schedule = make_schedule(cfg, total_steps)
    name = cfg.optimizer
    wd = float(cfg.weight_decay or 0.0)
    b1, b2, eps = float(cfg.adam_beta1), float(cfg.adam_beta2), float(cfg.adam_epsilon)
    if name == "adamw":
        opt = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=_decay_mask)
    elif name == "adam":
        opt = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
    elif name == "adafactor":
        opt = optax.adafactor(schedule, weight_decay_rate=wd or None, weight_decay_mask=_decay_mask)
    elif name == "lion":
        opt = optax.lion(schedule, b1=b1, b2=b2, weight_decay=wd, mask=_decay_mask)
    elif name == "sgd":
        opt = optax.sgd(schedule)
        if wd:
            opt = optax.chain(optax.add_decayed_weights(wd, mask=_decay_mask), opt)
    else:
        raise ConfigError(f"optimizer: {name!r} is not available; use adamw, adam, adafactor, lion or sgd.")
    if cfg.max_grad_norm:
        opt = optax.chain(optax.clip_by_global_norm(float(cfg.max_grad_norm)), opt)
    return opt, schedule
