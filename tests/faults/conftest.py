"""Fault tests run against their own PostgreSQL and Redis (started here on free ports, in temp folders), so they
can kill and restart them without disturbing the rest of the suite, and against real worker processes."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from cli.stack import free_port, spawn, wait_ready
from tests.api.conftest import auth, bert_folder, client, unlimited_app, upload  # noqa: F401 (shared fixtures)
from tests.e2e.test_service import create_key
from tests.models import save_model_folder, tiny_tokenizer

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def as_postgres(command: list[str]) -> list[str]:
    """initdb refuses to run as root: run the server binaries as the `postgres` user when we are root."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@dataclass
class Server:
    """A server process we own: stop (SIGKILL-free, but without persistence for Redis) and start again."""

    start_command: list[str]
    stop_command: list[str] | None
    log: Path
    url: str
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, wait: Callable[[], bool]) -> None:
        if self.stop_command:  # pg_ctl daemonizes and waits itself
            subprocess.run(self.start_command, check=True, capture_output=True)
        else:
            self.process = spawn(self.start_command, dict(os.environ), self.log)
        deadline = time.monotonic() + 30
        while not wait():
            assert time.monotonic() < deadline, f"{self.start_command[0]} did not start; see {self.log}"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.stop_command:
            subprocess.run(self.stop_command, check=True, capture_output=True)
        elif self.process is not None:
            self.process.kill()
            self.process.wait()


def _pg_ready(port: int) -> bool:
    return subprocess.run([str(PG_BIN / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode == 0


@pytest.fixture(scope="module")
def postgres() -> Iterator[Server]:
    root = Path(tempfile.mkdtemp(prefix="mcs-faults-pg-"))
    shutil.chown(root, "postgres") if os.geteuid() == 0 else None
    data, port = root / "data", free_port()
    subprocess.run(as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]),
                   check=True, capture_output=True)
    ctl = [str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "pg.log"), "-w"]
    server = Server(as_postgres([*ctl, "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"]),
                    as_postgres([*ctl, "-m", "fast", "stop"]), root / "pg.log",
                    f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres")
    server.start(lambda: _pg_ready(port))
    from core.db.migrate import upgrade

    upgrade(server.url)
    try:
        yield server
    finally:
        if _pg_ready(port):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    import redis

    root, port = tmp_path_factory.mktemp("redis"), free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(root)]
    server = Server(command, None, root / "redis.log", f"redis://127.0.0.1:{port}/0")
    ping = redis.Redis.from_url(server.url)
    server.start(lambda: _redis_ready(ping))
    try:
        yield server
    finally:
        server.stop()


def _redis_ready(ping) -> bool:
    try:
        return bool(ping.ping())
    except Exception:
        return False


@dataclass
class Stack:
    """The private servers plus the API and worker processes of one test, sharing one artifact folder."""

    env: dict[str, str]
    root: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start_api(self) -> httpx.Client:
        port = free_port()
        self.processes["api"] = spawn([sys.executable, "-m", "cli.main", "serve", "--port", str(port)],
                                      self.env, self.root / "api.log")
        wait_ready(f"http://127.0.0.1:{port}", [self.processes["api"]])
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        api.headers["Authorization"] = f"Bearer {create_key(self.env['MCS_DATABASE_URL'], 'faults')}"
        return api

    def start_worker(self) -> subprocess.Popen:
        self.processes["worker"] = spawn([sys.executable, "-m", "cli.main", "worker", "--queues", "cpu"],
                                         self.env, self.root / "worker.log")
        return self.processes["worker"]

    def pool_processes(self) -> list[psutil.Process]:
        return psutil.Process(self.processes["worker"].pid).children()

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture()
def stack(postgres: Server, redis_server: Server, tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Build a Stack with extra MCS_ settings; every process it started is stopped afterwards."""
    made: list[Stack] = []

    def make(**settings: str) -> Stack:
        env = {**os.environ, "MCS_DATABASE_URL": postgres.url, "MCS_BROKER_URL": redis_server.url,
               "MCS_ARTIFACT_DIR": str(tmp_path / "artifacts"), "MCS_JOB_LEASE_S": "3", "MCS_SWEEP_INTERVAL_S": "1",
               "MCS_RECONCILE_AFTER_S": "0", "PYTHONUNBUFFERED": "1",
               **{f"MCS_{k.upper()}": v for k, v in settings.items()}}
        made.append(Stack(env, tmp_path))
        return made[-1]

    yield make
    for built in made:
        built.stop()


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model large enough that compressing it takes seconds on a CPU: time to kill things mid-job."""
    config = LlamaConfig(vocab_size=4000, hidden_size=256, intermediate_size=1024, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    folder = save_model_folder(LlamaForCausalLM(config).eval(), tmp_path_factory.mktemp("slow-llama"))
    tiny_tokenizer().save_pretrained(folder)  # training steps need one
    return folder
