"""The compose file's worker health check, run for real: compose's own worker command starts a Celery worker on the
test broker, and compose's own check command (as `sh -c` runs it in the container, `$$` unescaped) must succeed
against it and fail once it is gone. Only the container is missing: HOSTNAME is set as Docker sets it."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cli.stack import spawn, stop_processes

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def python_celery(command: str) -> str:
    """The image has `celery` on PATH; here it is the venv's."""
    return command.replace("celery ", f"{sys.executable} -m celery ", 1)


def check(test: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    assert test[0] == "CMD-SHELL"
    command = python_celery(test[1].replace("$$", "$"))
    return subprocess.run(["sh", "-c", command], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_worker_health_check_pings_its_own_worker(database_url: str, tmp_path: Path) -> None:
    worker = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["worker"]
    env = {**os.environ, "HOSTNAME": socket.gethostname()}
    command = [sys.executable, "-m", *worker["command"]]
    process = spawn(command, env, tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 90
        while (result := check(worker["healthcheck"]["test"], env)).returncode != 0:
            assert process.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, result.stdout + result.stderr
            time.sleep(1)
        assert "pong" in result.stdout
    finally:
        stop_processes([process])
    assert check(worker["healthcheck"]["test"], env).returncode != 0  # no worker: unhealthy
