"""Training checkpoints with orbax: trainable parameters, optimizer state, step and data state.

Checkpoints live in ``<output_dir>/checkpoints/<step>``. orbax writes each one to a temporary
directory and renames it when complete, so a run killed mid-save leaves the previous checkpoint
intact and the partial one is ignored (and cleaned up) on restart. Saves are asynchronous: training
continues while the arrays are written. Only trainable parameters are saved (the LoRA adapters
alone, with ``adapter: lora``); frozen weights come back from ``base_model`` on resume.

The JSON ``meta`` item holds the step, the data iterator state of every process and a fingerprint of
the settings that must not change across a resume.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxpref.errors import UserError

logger = logging.getLogger(__name__)


def allgather_json(obj: Any) -> list[Any]:
    """Every process's JSON-able ``obj``, in process order (a no-op list on one process)."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
    lengths = multihost_utils.process_allgather(np.array([data.size], dtype=np.int32))
    padded = np.zeros(int(lengths.max()), dtype=np.uint8)
    padded[: data.size] = data
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[: int(n)]).decode()) for row, n in zip(gathered, lengths.reshape(-1))]


def data_state_for_process(
    states: list[Any], process_index: int | None = None, process_count: int | None = None
) -> Any:
    """This process's data-iterator state from a checkpoint's per-process list.

    A checkpoint written by another number of processes restores when every process had the same
    state (the pipeline's state is the index of the next *global* batch, so it carries over as long
    as ``micro_batch_size x processes`` stays the same); otherwise the data order cannot be resumed.
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if len(states) == count:
        return states[index]
    if all(st == states[0] for st in states):
        logger.info("checkpoint written by %d process(es), restored by %d: same data position", len(states), count)
        return states[0]
    raise UserError(
        f"the checkpoint was written by {len(states)} processes whose data positions differ ({states}); it "
        f"cannot resume the data order on {count} process(es). Resume with {len(states)} processes."
    )


class Checkpointer:
    """Save and restore training state in ``directory`` with an orbax ``CheckpointManager``."""

    def __init__(self, directory: str | Path, *, max_to_keep: int | None = None, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("params", "opt_state", "meta")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any, meta: dict[str, Any]) -> None:
        """Start an (async) save of ``step``; returns once the arrays are copied off the devices."""
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, force=True)

    def _check_dtypes(self, step: int, item: str, target: Any) -> None:
        """UserError when the arrays saved under ``item`` have other dtypes than ``target``'s (orbax
        would cast them silently: a float32 run resumed as bfloat16, or the reverse)."""
        try:
            metadata = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / item).tree
        except (OSError, ValueError, KeyError):
            return  # unreadable metadata: restore itself reports the problem
        saved = sorted(((tuple(m.shape), np.dtype(m.dtype)) for m in jax.tree.leaves(metadata)), key=str)
        wanted = sorted(((tuple(x.shape), np.dtype(x.dtype)) for x in jax.tree.leaves(target)), key=str)
        same_shapes = [s for s, _ in saved] == [s for s, _ in wanted]
        if saved != wanted and same_shapes:
            have = sorted({str(d) for _, d in saved})
            need = sorted({str(d) for _, d in wanted})
            raise UserError(
                f"cannot restore checkpoint {self.directory / str(step)}: its {item} are {'/'.join(have)} but this "
                f"config builds them as {'/'.join(need)}. Resume with the param_dtype the run was started with, "
                "or start a new output_dir."
            )

    def restore(self, step: int, params_target: Any, opt_target: Any) -> tuple[Any, Any, dict[str, Any]]:
        """Restore ``step`` into arrays shaped and sharded like the targets (abstract or concrete); the
        dtypes must be the checkpoint's."""
        self._check_dtypes(step, "params", params_target)
        abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract(params_target)),
            opt_state=ocp.args.StandardRestore(abstract(opt_target)),
            meta=ocp.args.JsonRestore(),
        )
        try:
            out = self.manager.restore(step, args=args)
        except (ValueError, KeyError, FileNotFoundError) as exc:
            raise UserError(
                f"cannot restore checkpoint {self.directory / str(step)}: {exc}. The checkpoint does not "
                "match this config (different model, adapter or optimizer?). Use the config it was "
                "written with, or a new output_dir."
            ) from exc
        return out["params"], out["opt_state"], dict(out["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def find_checkpoint_root(path: str | Path) -> tuple[Path, int]:
    """Resolve ``resume_from_checkpoint: PATH`` to (checkpoints root, step).

    PATH is one step directory (``.../checkpoints/300``), a checkpoints root or a run's output_dir;
    for the last two the latest complete step is used (half-written temporary directories are not steps).
    """
    p = Path(path).absolute()
    if not p.exists():
        raise UserError(f"resume_from_checkpoint: {p} does not exist; give a checkpoint directory or 'auto'.")
    if p.name.isdigit() and (p / "meta").exists():
        return p.parent, int(p.name)
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    steps = [int(d.name) for d in p.iterdir() if d.name.isdigit() and (d / "meta").exists()]
    if not steps:
        raise UserError(
            f"resume_from_checkpoint: {p} holds no complete checkpoint (step directories such as {p / '100'}); "
            "give a run's output_dir, its checkpoints directory or one step directory."
        )
    return p, max(steps)
