"""Multi-process start-up: join JAX's distributed runtime when this process is one of several.

jaxpref runs multi-host the way JAX does (multi-controller): the same command starts on every host
(or once per GPU), every process calls :func:`initialize` before any other JAX work, feeds its own
slice of each global batch and takes part in every collective. Whether this process is one of
several is decided in this order:

1. ``JAXPREF_DISTRIBUTED=0`` (or ``distributed.enabled: false``): never initialise (one process).
2. ``JAXPREF_DISTRIBUTED=1`` (or ``distributed.enabled: true``): always call
   ``jax.distributed.initialize()``; JAX fills whatever is not given from the cluster it detects
   (Cloud TPU VM / GKE TPU metadata, SLURM, Open MPI, Kubernetes). The TPU pod launcher sets this.
3. A coordinator address in the config (``distributed.coordinator_address``) or in
   ``JAX_COORDINATOR_ADDRESS``: initialise with it, the process count from
   ``distributed.num_processes`` / ``JAX_NUM_PROCESSES`` and this process's id from
   ``distributed.process_id`` / ``JAX_PROCESS_ID`` (JAX auto-detects any that are missing).
4. Otherwise auto-detection of a launcher that started several processes: a SLURM step with
   ``SLURM_NTASKS`` > 1 (``srun``), Open MPI with ``OMPI_COMM_WORLD_SIZE`` > 1 (``mpirun``), or a
   Cloud TPU slice with more than one worker (``TPU_WORKER_HOSTNAMES``/``TPU_PROCESS_ADDRESSES`` with
   several entries, or JAX's own TPU-VM metadata check). None of these: a single process.

``local_device_ids`` (``distributed.local_device_ids`` or ``JAX_LOCAL_DEVICE_IDS``) limits the GPUs a
process uses. Under SLURM JAX assumes one process per GPU and makes only GPU ``SLURM_LOCALID``
visible; with one process per node list all of the node's GPUs (``JAX_LOCAL_DEVICE_IDS=0,1,...,7``).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from jaxpref.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

SWITCH_ENV = "JAXPREF_DISTRIBUTED"


@dataclass(frozen=True)
class DistributedSettings:
    """What to pass to ``jax.distributed.initialize``; None = from the environment / auto-detected."""

    enabled: bool | None = None  # None = auto (see the module docstring)
    coordinator_address: str | None = None  # "host:port" of process 0's coordinator service
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    initialization_timeout: int = 300  # seconds to wait for every process to connect


def settings_from_config(cfg: Any) -> DistributedSettings:
    """Settings from the config's ``distributed:`` section (missing section: all automatic)."""
    section = getattr(cfg, "distributed", None)
    if section is None:
        return DistributedSettings()
    ids = getattr(section, "local_device_ids", None)
    return DistributedSettings(
        enabled=getattr(section, "enabled", None),
        coordinator_address=getattr(section, "coordinator_address", None),
        num_processes=getattr(section, "num_processes", None),
        process_id=getattr(section, "process_id", None),
        local_device_ids=None if ids is None else tuple(int(i) for i in ids),
        initialization_timeout=int(getattr(section, "initialization_timeout", None) or 300),
    )


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer") from None


def _env_switch() -> bool | None:
    value = os.environ.get(SWITCH_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{SWITCH_ENV}={value!r}: use 1 (always initialise), 0 (never) or auto")


def _count(entries: str | None) -> int:
    return len([e for e in (entries or "").split(",") if e.strip()])


def detect_launcher() -> str | None:
    """Name of a launcher that started this process as one of several, else None.

    Only environment variables are read (plus JAX's Cloud TPU VM check, which asks the VM's
    metadata server only when libtpu says it runs on a Cloud TPU VM).
    """
    env = os.environ
    slurm_step = all(k in env for k in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NODELIST"))
    if slurm_step and (_env_int("SLURM_NTASKS") or _env_int("SLURM_STEP_NUM_TASKS") or 1) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "openmpi"
    if max(_count(env.get("TPU_PROCESS_ADDRESSES")), _count(env.get("TPU_WORKER_HOSTNAMES"))) > 1:
        return "tpu"
    if env.get("TPU_SKIP_MDS_QUERY") is None:
        try:  # a private JAX module: if it moves, multi-worker TPU VMs need JAXPREF_DISTRIBUTED=1
            from jax._src.clusters import cloud_tpu_cluster as ctc

            on_tpu_vm = ctc.running_in_cloud_tpu_vm and ctc.GceTpuCluster.is_env_present()
            if on_tpu_vm and ctc.GceTpuCluster.get_process_count() > 1:
                return "tpu"
        except Exception as exc:  # noqa: BLE001 - detection must never break a single-host run
            logger.debug("Cloud TPU detection failed: %s", exc)
    return None


def initialize(settings: DistributedSettings | None = None) -> bool:
    """Join the distributed runtime if this process is one of several; True when multi-process.

    Must run before any other JAX call that touches devices (the CLIs call it first). Calling it
    again, or after JAX was initialised elsewhere, is a no-op.
    """
    s = settings or DistributedSettings()
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    enabled = s.enabled if s.enabled is not None else _env_switch()
    if enabled is False:
        return False
    address = s.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num = s.num_processes if s.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = s.process_id if s.process_id is not None else _env_int("JAX_PROCESS_ID")
    launcher = None
    if enabled is None:
        if address is None:
            launcher = detect_launcher()
            if launcher is None:
                return False
        elif num == 1:
            return False
    kwargs: dict[str, Any] = {
        "coordinator_address": address,
        "num_processes": num,
        "process_id": pid,
        "initialization_timeout": s.initialization_timeout,
    }
    if s.local_device_ids is not None:
        kwargs["local_device_ids"] = list(s.local_device_ids)
    shown = {k: v for k, v in kwargs.items() if v is not None}
    logger.info("joining the JAX distributed runtime (%s): %s", launcher or "configured", shown)
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, TypeError) as exc:
        raise UserError(
            f"jax.distributed.initialize failed: {exc}. Give distributed.coordinator_address (host:port of "
            "process 0), distributed.num_processes and distributed.process_id (or JAX_COORDINATOR_ADDRESS, "
            f"JAX_NUM_PROCESSES, JAX_PROCESS_ID), or set {SWITCH_ENV}=0 to run a single process."
        ) from exc
    logger.info(
        "process %d of %d: %d local / %d global devices (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
    return jax.process_count() > 1


def is_main_process() -> bool:
    """Process 0 writes logs, configs and exported models; every process writes checkpoint shards."""
    return jax.process_index() == 0


def check_shared_directory(path: str | os.PathLike, what: str = "output_dir") -> None:
    """Fail clearly unless every process sees ``path`` as the same directory.

    Orbax checkpoints are written by all processes into one directory and finalised by process 0,
    so on several hosts ``output_dir`` must be a shared filesystem (NFS, Filestore, a bucket
    mounted with gcsfuse at the same path everywhere). One process: nothing to check.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    path = Path(path)
    token = uuid.uuid4().hex if is_main_process() else ""
    token = _broadcast_str(token)
    probe = path / f".jaxpref_shared_{token}"
    if is_main_process():
        probe.write_text(token)
    multihost_utils.sync_global_devices("jaxpref: shared-directory probe written")
    seen = probe.exists() and probe.read_text() == token
    everyone = multihost_utils.process_allgather(jax.numpy.asarray([seen]))
    multihost_utils.sync_global_devices("jaxpref: shared-directory probe read")
    if is_main_process():
        probe.unlink(missing_ok=True)
    missing = [i for i, ok in enumerate(everyone.reshape(-1).tolist()) if not ok]
    if missing:
        raise UserError(
            f"{what} {path} is not shared: process(es) {missing} do not see what process 0 wrote there. "
            "Checkpoints of a multi-host run go into one directory that every host mounts at the same "
            "path (NFS, Filestore, a GCS bucket mounted with gcsfuse); point output_dir there."
        )


def _broadcast_str(text: str, length: int = 64) -> str:
    """Process 0's ``text`` (ASCII, at most ``length`` characters) on every process."""
    import numpy as np
    from jax.experimental import multihost_utils

    buf = np.zeros(length, np.uint8)
    raw = text.encode()[:length]
    buf[: len(raw)] = np.frombuffer(raw, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return bytes(out[out > 0].tolist()).decode()


def describe(devices: Sequence[Any] | None = None) -> str:
    """One line: process index/count and device counts (for logs and --dry_run)."""
    devices = list(devices) if devices is not None else jax.devices()
    return (
        f"process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} local / "
        f"{len(devices)} global {devices[0].platform} devices"
    )
