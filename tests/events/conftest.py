"""A live stack for the event tests: uvicorn with two worker processes (so a reconnecting stream may land on the
other one) and a real Celery worker, on the suite's PostgreSQL and a Redis broker (also the events' pub/sub)."""

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from cli.stack import free_port, spawn, stop_processes, wait_ready
from tests.fixtures.api import zip_folder
from tests.fixtures.environment import E2E_BROKER_URL
from tests.fixtures.services import create_key
from tests.models import save_model_folder, tiny_bert

INT8 = {"type": "quantize", "method": "rtn", "bits": 8, "granularity": "per_channel", "symmetric": True}


@dataclass(frozen=True)
class Live:
    url: str
    database_url: str

    def client(self, tenant: str = "events") -> httpx.Client:
        key = create_key(self.database_url, tenant)
        return httpx.Client(base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {key}"})


@pytest.fixture(scope="package")
def live(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("events-stack")
    port = free_port()
    env = {**os.environ, "MCS_BROKER_URL": E2E_BROKER_URL, "MCS_ARTIFACT_DIR": str(root / "artifacts"),
           "MCS_WEBHOOK_ALLOW_PRIVATE": "true", "MCS_WEBHOOK_RETRY_BASE_S": "0.2", "MCS_RATE_LIMIT_PER_MINUTE": "0",
           "PYTHONUNBUFFERED": "1"}
    processes = [
        spawn([sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(port), "--workers", "2"], env,
              root / "api.log"),
        spawn([sys.executable, "-m", "cli.main", "worker", "--queues", "cpu", "--concurrency", "1"], env,
              root / "worker.log"),
    ]
    try:
        wait_ready(f"http://127.0.0.1:{port}", processes)
        yield Live(f"http://127.0.0.1:{port}", database_url)
    finally:
        stop_processes(processes)


@pytest.fixture(scope="package")
def model_zip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return zip_folder(save_model_folder(tiny_bert(), tmp_path_factory.mktemp("events-bert")))


def submit(api: httpx.Client, model_zip: bytes, steps: list[dict] | None = None) -> str:
    model = api.post("/v1/models", files={"file": ("m.zip", model_zip, "application/zip")})
    assert model.status_code == 201, model.text
    job = api.post("/v1/jobs", json={"model_id": model.json()["id"], "steps": steps or [INT8]})
    assert job.status_code == 202, job.text
    return str(job.json()["id"])


def read_events(api: httpx.Client, job_id: str, last_event_id: int | None = None, limit: int | None = None,
                timeout_s: float = 120) -> list[dict]:
    """Events of one SSE connection ({"id", "event", "data"}, parsed by hand), until the server ends the stream or
    `limit` events were read (the connection is then dropped)."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    events: list[dict] = []
    fields: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    with api.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=30) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            assert time.monotonic() < deadline, events
            if line:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
                continue
            if "event" in fields:
                events.append({"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])})
                if limit is not None and len(events) >= limit:
                    return events
            fields = {}
    return events
