"""The stream in process, without a worker: a queued job's stream sends keepalive comments while nothing happens,
and a cancel (its `done`, announced on Redis, or found by polling the table when Redis is down) ends it."""

import threading
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from core.service.db.repositories import JobRuns, Jobs
from core.service.db.session import session_scope
from core.service.settings import get_settings
from tests.events.conftest import INT8


@pytest.fixture(params=["redis", "redis down"])
def quick_keepalive(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("MCS_SSE_KEEPALIVE_S", "0.2")
    if request.param == "redis down":  # nothing listens on port 1: streams and publishers fall back to the table
        monkeypatch.setenv("MCS_EVENTS_REDIS_URL", "redis://127.0.0.1:1/0")
        monkeypatch.setenv("MCS_SSE_POLL_S", "0.1")
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


def test_keepalives_until_a_cancel_ends_the_stream(client: TestClient, auth: dict[str, str], upload,
                                                  quick_keepalive: None) -> None:
    job = client.post("/v1/jobs", json={"model_id": upload()["id"], "steps": [INT8]}, headers=auth).json()
    body: list[str] = []
    reader = threading.Thread(target=lambda: body.append(
        client.get(f"/v1/jobs/{job['id']}/events", headers=auth).text))
    reader.start()
    time.sleep(1.0)
    with session_scope() as session:
        row = JobRuns(session).get(job["id"])
        assert row is not None
        Jobs(session, row.tenant_id).cancel(row)
    reader.join(timeout=30)

    assert not reader.is_alive() and body
    text = body[0]
    assert text.count(": keepalive") >= 2
    assert text.index("event: status") < text.index(": keepalive") < text.index("event: done")
    assert 'id: 2\nevent: done\ndata: {"status":"cancelled"' in text


def test_last_event_id_must_be_a_number(client: TestClient, auth: dict[str, str], upload) -> None:
    job = client.post("/v1/jobs", json={"model_id": upload()["id"], "steps": [INT8]}, headers=auth).json()
    response = client.get(f"/v1/jobs/{job['id']}/events", headers={**auth, "Last-Event-ID": "abc"})
    assert response.status_code == 422 and "last-event-id" in response.text
