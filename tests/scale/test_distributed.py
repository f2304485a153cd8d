"""When jaxpref joins jax.distributed, with what arguments; resuming across process counts.

``jax.distributed.initialize`` itself is replaced by a recorder here (a real two-process run is in
test_multiprocess.py): these tests pin down the decision table of ``jaxpref.distributed``.
"""

from __future__ import annotations

from pathlib import Path

import jax
import pytest

from jaxpref import distributed
from jaxpref.checkpoint import data_state_for_process, find_checkpoint_root
from jaxpref.errors import ConfigError, UserError

LAUNCHER_ENV = (
    "JAXPREF_DISTRIBUTED",
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "SLURM_JOB_ID",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS",
    "OMPI_MCA_orte_hnp_uri",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
)


@pytest.fixture
def calls(monkeypatch):
    """Clean launcher environment; records jax.distributed.initialize calls instead of making them."""
    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")  # never ask a metadata server from a test
    recorded: list[dict] = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
    return recorded


def test_single_process_by_default(calls):
    assert distributed.detect_launcher() is None
    assert distributed.initialize() is False
    assert calls == []


@pytest.mark.parametrize(
    "env, launcher",
    [
        (
            dict(SLURM_JOB_ID="7", SLURM_PROCID="1", SLURM_LOCALID="1", SLURM_STEP_NODELIST="n[1-2]", SLURM_NTASKS="4"),
            "slurm",
        ),
        (dict(OMPI_MCA_orte_hnp_uri="123.0;tcp://10.0.0.1:5000", OMPI_COMM_WORLD_SIZE="2"), "openmpi"),
        (dict(TPU_WORKER_HOSTNAMES="t1-w-0,t1-w-1,t1-w-2,t1-w-3"), "tpu"),
    ],
)
def test_launchers_with_several_processes_initialize(calls, monkeypatch, env, launcher):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert distributed.detect_launcher() == launcher
    distributed.initialize()
    # JAX fills in the rest from the same environment
    assert calls == [dict(coordinator_address=None, num_processes=None, process_id=None, initialization_timeout=300)]


@pytest.mark.parametrize(
    "env",
    [
        dict(SLURM_JOB_ID="7", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_STEP_NODELIST="n1", SLURM_NTASKS="1"),
        dict(SLURM_JOB_ID="7", SLURM_NTASKS="8"),  # inside sbatch but not a step started by srun
        dict(OMPI_MCA_orte_hnp_uri="x", OMPI_COMM_WORLD_SIZE="1"),
        dict(TPU_WORKER_HOSTNAMES="localhost"),  # a single-host TPU VM
    ],
)
def test_one_process_launches_do_not_initialize(calls, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert distributed.initialize() is False and calls == []


def test_explicit_coordinator_from_env_and_config(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    distributed.initialize()
    assert calls[-1] == dict(
        coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3, initialization_timeout=300
    )
    # config keys win over the environment; local_device_ids passed through
    settings = distributed.DistributedSettings(
        coordinator_address="h0:99", num_processes=2, process_id=1, local_device_ids=(0, 1), initialization_timeout=5
    )
    distributed.initialize(settings)
    assert calls[-1] == dict(
        coordinator_address="h0:99", num_processes=2, process_id=1, initialization_timeout=5, local_device_ids=[0, 1]
    )


def test_switches(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")  # a coordinator for one process: nothing to join
    assert distributed.initialize() is False and calls == []
    monkeypatch.setenv("JAXPREF_DISTRIBUTED", "0")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    assert distributed.initialize() is False and calls == []
    monkeypatch.setenv("JAXPREF_DISTRIBUTED", "1")  # always: e.g. the TPU pod launcher
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    distributed.initialize()
    assert len(calls) == 1
    monkeypatch.setenv("JAXPREF_DISTRIBUTED", "maybe")
    with pytest.raises(ConfigError, match="JAXPREF_DISTRIBUTED"):
        distributed.initialize()
    monkeypatch.setenv("JAXPREF_DISTRIBUTED", "auto")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "h:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES"):
        distributed.initialize()


def test_initialize_errors_become_user_errors(calls, monkeypatch):
    def fail(**kw):
        raise ValueError("Number of processes must be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", fail)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "h:1")
    with pytest.raises(UserError, match="distributed.num_processes"):
        distributed.initialize()


def test_settings_from_config():
    from jaxpref.config import load_config

    cfg = load_config(
        Path(__file__).resolve().parents[2] / "configs" / "sft.yaml",
        ["distributed.coordinator_address=h0:8476", "distributed.local_device_ids=[0,1,2,3]"],
    )
    s = distributed.settings_from_config(cfg)
    assert (s.coordinator_address, s.local_device_ids, s.enabled, s.initialization_timeout) == (
        "h0:8476",
        (0, 1, 2, 3),
        None,
        300,
    )


def test_data_state_across_process_counts():
    # same count: each process its own
    assert data_state_for_process([{"i": 1}, {"i": 2}], 1, 2) == {"i": 2}
    # the pipeline's state is the next global batch: equal on every process, so it carries over
    assert data_state_for_process([{"next_index": 6}] * 2, 0, 1) == {"next_index": 6}
    assert data_state_for_process([{"next_index": 6}], 3, 4) == {"next_index": 6}
    with pytest.raises(UserError, match="Resume with 2 processes"):
        data_state_for_process([{"next_index": 6}, {"next_index": 7}], 0, 1)


def test_find_checkpoint_root_picks_the_latest_complete_step(tmp_path):
    root = tmp_path / "out" / "checkpoints"
    for step in (3, 12):
        (root / str(step) / "meta").mkdir(parents=True)
    (root / "20.orbax-checkpoint-tmp-1").mkdir()  # a save cut short
    (root / "30").mkdir()  # no meta: not complete
    assert find_checkpoint_root(tmp_path / "out") == (root, 12)
    assert find_checkpoint_root(root) == (root, 12)
    assert find_checkpoint_root(root / "3") == (root, 3)
    with pytest.raises(UserError, match="no complete checkpoint"):
        find_checkpoint_root(tmp_path)
