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
    """Settings from the config's ``distributed:`` section (its defaults: all automatic)."""
    section = cfg.distributed
    ids = section.local_device_ids
    return DistributedSettings(
        enabled=section.enabled,
        coordinator_address=section.coordinator_address,
        num_processes=section.num_processes,
        process_id=section.process_id,
        local_device_ids=None if ids is None else tuple(int(i) for i in ids),
        initialization_timeout=int(section.initialization_timeout),
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
    barrier("backends-ready", s.initialization_timeout)
    # One all-device collective while the processes are aligned: CPU (gloo) collectives set up their
    # connections on first use and give up when a peer arrives more than 30 s later.
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxpref: distributed start")
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


def _client() -> Any:
    """JAX's coordination-service client (None on one process). Its key-value store and barriers
    need no device collectives, whose CPU (gloo) start-up gives up after 30 s of skew."""
    try:
        from jax._src import distributed as jax_distributed

        return jax_distributed.global_state.client
    except (ImportError, AttributeError):  # pragma: no cover - a future JAX without it
        return None


def barrier(name: str, timeout_s: int = 600) -> None:
    """Wait until every process reaches ``name`` (no-op on one process)."""
    client = _client()
    if client is not None and jax.process_count() > 1:
        client.wait_at_barrier(f"jaxpref:{name}", timeout_s * 1000)


def check_shared_directory(path: str | os.PathLike, what: str = "output_dir", timeout_s: int = 600) -> None:
    """Fail clearly unless every process sees ``path`` as the same directory.

    Orbax checkpoints are written by all processes into one directory and finalised by process 0,
    so on several hosts ``output_dir`` must be a shared filesystem (NFS, Filestore, a bucket
    mounted with gcsfuse at the same path everywhere). Process 0 writes a probe file with a random
    token, every process looks for it and reports through the coordination service. One process:
    nothing to check.
    """
    client = _client()
    if jax.process_count() == 1 or client is None:
        return
    path = Path(path)
    ms = timeout_s * 1000
    if is_main_process():
        token = uuid.uuid4().hex
        (path / f".jaxpref_shared_{token}").write_text(token)
        client.key_value_set("jaxpref/shared_dir/token", token)
    token = client.blocking_key_value_get("jaxpref/shared_dir/token", ms)
    probe = path / f".jaxpref_shared_{token}"
    seen = probe.exists() and probe.read_text() == token
    client.key_value_set(f"jaxpref/shared_dir/{jax.process_index()}", "1" if seen else "0")
    results = [client.blocking_key_value_get(f"jaxpref/shared_dir/{i}", ms) for i in range(jax.process_count())]
    barrier("shared-dir-checked", timeout_s)
    if is_main_process():
        probe.unlink(missing_ok=True)
    missing = [i for i, r in enumerate(results) if r != "1"]
    if missing:
        raise UserError(
            f"{what} {path} is not shared: process(es) {missing} do not see what process 0 wrote there. "
            "Checkpoints of a multi-host run go into one directory that every host mounts at the same "
            "path (NFS, Filestore, a GCS bucket mounted with gcsfuse); point output_dir there."
        )


def describe(devices: Sequence[Any] | None = None) -> str:
    """One line: process index/count and device counts (for logs and --dry_run)."""
    devices = list(devices) if devices is not None else jax.devices()
    return (
        f"process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} local / "
        f"{len(devices)} global {devices[0].platform} devices"
    )
