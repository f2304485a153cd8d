"""Optimizer and learning-rate schedule from the config, with optax.

Schedules follow Hugging Face's (what axolotl uses): linear warmup from 0 at optimizer step 0, then
cosine to ``cosine_min_lr_ratio * learning_rate``, linear to 0, or constant. Weight decay skips biases
and norm scales, as the Hugging Face Trainer does.

Each optimizer name does what its PyTorch namesake does with the Hugging Face Trainer's settings
(tests/trainer/test_optim.py steps each against it):

* ``adamw``: torch.optim.AdamW, decoupled weight decay ``lr * wd * p``.
* ``adam``: torch.optim.Adam, whose ``weight_decay`` is an L2 term ``wd * p`` added to the gradient
  before the moments (so Adam scales it like the gradient; it is not AdamW's decay).
* ``adafactor``: transformers' Adafactor as the Trainer builds it for ``optim: adafactor``
  (``scale_parameter=False, relative_step=False``: the learning rate is absolute, not scaled by the
  parameter's RMS), decoupled weight decay ``lr * wd * p``. optax factors the second moment of arrays
  whose two largest dimensions are >= 128 (transformers: every array of rank >= 2); jaxpref's stacked
  layer weights [layers, in, out] are factored per layer over (in, out), as transformers does for each
  layer's matrix, but the update's RMS clipping is over the whole stacked array.
* ``lion``: Lion (Chen et al. 2023; bitsandbytes' Lion), decoupled weight decay ``lr * wd * p``.
* ``sgd``: torch.optim.SGD without momentum, ``weight_decay`` as an L2 term.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import optax

from jaxpref.errors import ConfigError

logger = logging.getLogger(__name__)


def warmup_steps_for(cfg: Any, total_steps: int) -> int:
    """Warmup steps from ``warmup_steps`` or ``warmup_ratio``, at most ``total_steps - 1`` (a warning
    says so when the configured warmup is longer than the run: the peak is then reached at the end)."""
    if cfg.warmup_steps is not None:
        warmup = int(cfg.warmup_steps)
    elif cfg.warmup_ratio:
        warmup = int(round(cfg.warmup_ratio * total_steps))
    else:
        warmup = 0
    longest = max(total_steps - 1, 0)
    if warmup > longest:
        logger.warning(
            "warmup_steps=%d is longer than the run's %d optimizer steps; warming up for %d steps (the "
            "learning rate peaks at the last step). Lower warmup_steps or raise max_steps/num_epochs.",
            warmup, total_steps, longest,
        )
        warmup = longest
    return warmup


def make_schedule(cfg: Any, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the optimizer step (0-based)."""
    lr = float(cfg.learning_rate)
    warmup = warmup_steps_for(cfg, total_steps)
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
        if wd:
            opt = optax.chain(optax.add_decayed_weights(wd, mask=_decay_mask), opt)
    elif name == "adafactor":
        # optax.adafactor's own weight_decay_rate is not scaled by the learning rate (transformers'
        # is), and its multiply_by_parameter_scale is transformers' scale_parameter: built by hand.
        opt = optax.chain(
            optax.scale_by_factored_rms(decay_rate=0.8, epsilon=1e-30),
            optax.clip_by_block_rms(1.0),
            optax.add_decayed_weights(wd, mask=_decay_mask) if wd else optax.identity(),
            optax.scale_by_learning_rate(schedule),
        )
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
