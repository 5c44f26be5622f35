"""Run the API and a Celery worker as real child processes (used by `mcs demo` and the end-to-end tests)."""

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


@contextmanager
def local_stack(env: dict[str, str], log_dir: Path, queues: str = "cpu") -> Iterator[str]:
    """Start `mcs serve` on a free port and `mcs worker -Q queues`; yield the API URL; stop both on exit."""
    port = free_port()
    env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    log_dir.mkdir(parents=True, exist_ok=True)
    commands = {
        "api": [sys.executable, "-m", "cli.main", "serve", "--port", str(port)],
        "worker": [sys.executable, "-m", "cli.main", "worker", "--queues", queues, "--concurrency", "1"],
    }
    processes = [spawn(cmd, env, log_dir / f"{name}.log") for name, cmd in commands.items()]
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, processes)
        yield url
    finally:
        stop_processes(processes)


def stop_processes(processes: list[subprocess.Popen]) -> None:
    """Terminate, wait up to 30 s each, kill what is left."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def spawn(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("ab") as handle:
        return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, processes: list[subprocess.Popen], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            raise RuntimeError(f"a service process exited early: {[p.args for p in processes if p.poll()]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the API at {url} did not become ready within {timeout_s:.0f} s")
