"""Run logs: TensorBoard event files, ``metrics.jsonl`` and the console progress bar.

Only process 0 writes. On resume from step ``s`` the logs are rewound to ``s`` first (TensorBoard's
``purge_step`` and a rewrite of ``metrics.jsonl``), so steps that ran after the last checkpoint of the
killed run do not appear twice.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def _rewind_jsonl(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    path.write_text("".join(k + "\n" for k in kept))


class RunLogger:
    """Writes train/eval metrics to TensorBoard, ``metrics.jsonl`` and a tqdm bar (process 0 only)."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        total_steps: int,
        start_step: int = 0,
        use_tensorboard: bool = True,
        wandb: dict[str, Any] | None = None,
        show_progress: bool = True,
    ):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self._writer = None
        self._wandb = None
        self._bar = None
        if not self.enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = out / "metrics.jsonl"
        _rewind_jsonl(self.jsonl_path, start_step)
        self._jsonl = self.jsonl_path.open("a")
        if use_tensorboard:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(out / "runs"), purge_step=start_step + 1 if start_step else None)
        if wandb and wandb.get("project"):
            self._wandb = _start_wandb(wandb)
        if show_progress:
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self._t0 = time.perf_counter()

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, "split": split, **clean}) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self._writer.add_scalar(f"{split}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{split}/{k}": v for k, v in clean.items()}, step=step)
        if split == "eval":
            tqdm.write(f"eval step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in clean.items()))

    def advance(self, step: int, postfix: dict[str, float] | None = None) -> None:
        """Move the progress bar to ``step`` and show ``postfix`` (loss, tokens/s, ...)."""
        if self._bar is None:
            return
        self._bar.n = step
        if postfix:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        self._bar.refresh()

    def message(self, text: str) -> None:
        if self.enabled:
            (tqdm.write if self._bar is not None else print)(text)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._jsonl.close()
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(settings: dict[str, Any]) -> Any:
    try:
        import wandb
    except ImportError:
        logger.warning("wandb_project is set but wandb is not installed; logging to TensorBoard only.")
        return None
    kwargs = {k: v for k, v in settings.items() if v is not None and k in {"project", "entity", "name", "mode"}}
    return wandb.init(**kwargs)
