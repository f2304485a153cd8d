"""The commands' shared plumbing: exit codes and the allocator re-exec."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jaxpref import cli
from jaxpref.errors import UserError

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc tuning is Linux-only")


@pytest.fixture
def execve(monkeypatch):
    calls = []
    monkeypatch.setattr(cli.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    monkeypatch.setattr(cli.sys, "orig_argv", ["python3", "-u", "-m", "jaxpref.train", "--config", "x.yaml"])
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(cli.NO_MALLOC_TUNING, raising=False)
    return calls


def test_reexec_sets_the_tunables_and_keeps_the_command_line(execve):
    cli.reexec_with_malloc_tuning()
    [(path, argv, env)] = execve
    assert path == sys.executable
    assert argv == [sys.executable, "-u", "-m", "jaxpref.train", "--config", "x.yaml"]
    assert env["GLIBC_TUNABLES"] == cli.MALLOC_TUNABLES
    assert env["PATH"] == os.environ["PATH"]


def test_reexec_respects_user_tunables_and_opt_out(execve, monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    cli.reexec_with_malloc_tuning()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv(cli.NO_MALLOC_TUNING, "1")
    cli.reexec_with_malloc_tuning()
    assert execve == []


def test_command_runs_with_tuned_malloc_and_same_pid(tmp_path):
    """End to end: the real re-exec happens once, keeps the PID, and the error path still exits 2."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, sys\n"
        "from jaxpref.cli import reexec_with_malloc_tuning, run_command\n"
        "from jaxpref.errors import UserError\n"
        "if __name__ == '__main__':\n"
        "    print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), flush=True)\n"
        "    reexec_with_malloc_tuning()\n"
        "    def fail():\n"
        "        raise UserError('bad input')\n"
        "    sys.exit(run_command(fail))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", cli.NO_MALLOC_TUNING)}
    done = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2, done.stderr
    first, second = done.stdout.split("\n")[:2]
    pid = first.split()[0]
    assert first == f"{pid} None"
    assert second == f"{pid} {cli.MALLOC_TUNABLES}"
    assert done.stderr.strip() == "error: bad input"


def test_run_command_maps_user_errors_to_exit_code_2(capsys):
    def fail():
        raise UserError("the config names no datasets; add a datasets: list")

    assert cli.run_command(fail) == 2
    assert "error: the config names no datasets" in capsys.readouterr().err
    assert cli.run_command(lambda: None) == 0
