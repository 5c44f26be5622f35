"""The SSE stream of a real job on a real worker, read whole and read one event per connection (resuming with
Last-Event-ID across uvicorn's two worker processes)."""

import pytest

from tests.events.conftest import Live, read_events, submit

pytestmark = [pytest.mark.e2e]


def test_stream_follows_a_job_from_queued_to_done(live: Live, model_zip: bytes) -> None:
    with live.client() as api:
        job_id = submit(api, model_zip)
        events = read_events(api, job_id)  # the server ends the stream after `done`
        job = api.get(f"/v1/jobs/{job_id}").json()

    assert [event["id"] for event in events] == list(range(1, len(events) + 1))
    kinds = [event["event"] for event in events]
    assert kinds[0] == "status" and events[0]["data"]["status"] == "queued"
    assert {"status": "running", "attempt": 1} in [event["data"] for event in events]
    assert kinds.index("step.started") < kinds.index("step.finished") < kinds.index("done") == len(kinds) - 1
    finished = events[kinds.index("step.finished")]["data"]
    assert finished["index"] == 0 and finished["type"] == "quantize"
    assert finished["metrics"] == job["steps"][0]["metrics"]
    done = events[-1]["data"]
    assert done["status"] == "succeeded" == job["status"] and done["metrics"] == job["metrics"]


def test_reconnecting_with_last_event_id_misses_nothing(live: Live, model_zip: bytes) -> None:
    with live.client() as api:
        job_id = submit(api, model_zip)
        resumed: list[dict] = []
        while not resumed or resumed[-1]["event"] != "done":  # one event per connection, then hang up
            last = resumed[-1]["id"] if resumed else None
            resumed += read_events(api, job_id, last_event_id=last, limit=1)
        whole = read_events(api, job_id)
        after_three = read_events(api, job_id, last_event_id=3)

    assert resumed == whole
    assert [event["id"] for event in whole] == list(range(1, len(whole) + 1))
    assert after_three == whole[3:]


def test_another_tenants_job_is_a_404(live: Live, model_zip: bytes) -> None:
    with live.client("events-owner") as owner, live.client("events-other") as other:
        job_id = submit(owner, model_zip)
        response = other.get(f"/v1/jobs/{job_id}/events")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
        assert read_events(owner, job_id)[-1]["event"] == "done"


def test_the_client_waits_on_the_event_stream(live: Live, model_zip: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    from client import Client
    from client import jobs as client_jobs

    def no_polling(*args: object) -> None:
        raise AssertionError("the client polled although the API has an event stream")

    monkeypatch.setattr(client_jobs, "UPDATE_SOURCES", (client_jobs.events, no_polling))
    with live.client("events-client") as raw, Client(live.url, raw.headers["Authorization"][7:]) as api:
        job_id = submit(raw, model_zip)
        seen = [(job.status, job.progress) for job in api.jobs.get(job_id).watch()]
        job = api.jobs.get(job_id)
    assert seen[-1] == ("succeeded", 1.0) and job.status == "succeeded" and job.artifacts
    assert any(status == "running" for status, _ in seen)
