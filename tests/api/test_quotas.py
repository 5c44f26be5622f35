"""Tenant quotas through the real API and the worker's claim: stored bytes (403), queued jobs (429), running jobs
(held in the queue, offered again), each refusal naming the quota, its limit and its use; defaults from settings,
overrides per tenant."""

from datetime import timedelta

import pytest
import redis

from core.service.db.models import Job, JobStatus
from core.service.db.repositories import JobRuns, Jobs, Tenants
from core.service.db.session import session_scope
from core.service.quotas import check_submission, running_room
from core.service.settings import get_settings
from tests.api.test_jobs import _in_thread, queued_job_ids
from tests.fixtures.api import leftovers, zip_folder
from tests.fixtures.environment import REDIS_URL

INT8 = {"type": "quantize", "method": "rtn", "bits": 8}


def set_quota(tenant: str, **limits: int | None) -> None:
    with session_scope() as session:
        tenants = Tenants(session)
        tenants.set_quota(tenants.get_or_create(tenant).id, **limits)


def quotas(client, auth) -> dict[str, dict]:
    response = client.get("/v1/quotas", headers=auth)
    assert response.status_code == 200, response.text
    return {row["quota"]: row for row in response.json()}


def submit(client, auth, model_id: str):
    return client.post("/v1/jobs", json={"model_id": model_id, "steps": [INT8]}, headers=auth)


def test_defaults_come_from_settings_and_overrides_from_the_tenant(client, auth, monkeypatch):
    settings = get_settings()
    before = quotas(client, auth)
    assert before["queued_jobs"] == {"quota": "queued_jobs", "limit": settings.quota_queued_jobs, "used": 0}
    assert before["running_jobs"]["limit"] == settings.quota_running_jobs
    set_quota("alice", queued_jobs=3)
    assert quotas(client, auth)["queued_jobs"]["limit"] == 3
    set_quota("alice", queued_jobs=None)  # back to the default
    assert quotas(client, auth)["queued_jobs"]["limit"] == settings.quota_queued_jobs


def test_stored_bytes_quota_refuses_uploads_with_403_and_keeps_nothing(client, auth, upload, bert_folder):
    model = upload()
    size = model["size_bytes"]
    set_quota("alice", stored_bytes=size + 100)
    assert quotas(client, auth)["stored_bytes"] == {"quota": "stored_bytes", "limit": size + 100, "used": size}
    stored_before = leftovers()
    second = client.post("/v1/models", files={"file": ("b.zip", zip_folder(bert_folder), "application/zip")},
                         headers=auth)
    assert second.status_code == 403, second.text
    error = second.json()["error"]
    assert error["code"] == "quota_exceeded" and "stored-bytes quota" in error["message"]
    requested = error["details"].pop("requested")  # the second copy's stored size (its manifest differs a little)
    assert error["details"] == {"quota": "stored_bytes", "limit": size + 100, "used": size} and requested > 100
    assert leftovers() == stored_before  # the refused upload's files are gone

    dataset = client.post("/v1/datasets", files={"file": ("d.txt", b"x" * 200 + b"\n", "text/plain")},
                          headers=auth)
    assert dataset.status_code == 403 and dataset.json()["error"]["details"]["quota"] == "stored_bytes"
    chunked = client.post("/v1/uploads", json={"files": [
        {"path": "config.json", "size": 10, "sha256": "0" * 64},
        {"path": "model.safetensors", "size": 10_000, "sha256": "0" * 64}]}, headers=auth)
    assert chunked.status_code == 403 and chunked.json()["error"]["details"]["requested"] == 10_010
    assert client.get("/v1/models", headers=auth).json()["total"] == 1


def test_a_job_is_refused_while_storage_is_full(client, auth, upload):
    model = upload()
    set_quota("alice", stored_bytes=model["size_bytes"])
    response = submit(client, auth, model["id"])
    assert response.status_code == 403
    assert response.json()["error"]["details"] == {"quota": "stored_bytes", "limit": model["size_bytes"],
                                                    "used": model["size_bytes"]}
    set_quota("alice", stored_bytes=0)  # 0: no limit
    assert submit(client, auth, model["id"]).status_code == 202


def test_queued_jobs_quota_is_a_429_with_retry_after(client, auth, other_auth, upload):
    model = upload()
    set_quota("alice", queued_jobs=2)
    assert [submit(client, auth, model["id"]).status_code for _ in range(2)] == [202, 202]
    refused = submit(client, auth, model["id"])
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
    assert refused.json()["error"]["code"] == "quota_exceeded"
    assert refused.json()["error"]["details"] == {"quota": "queued_jobs", "limit": 2, "used": 2}
    assert len(queued_job_ids()) == 2  # the refused job was never created nor sent
    other_model = upload(headers=other_auth)  # another tenant's queue is its own
    assert submit(client, other_auth, other_model["id"]).status_code == 202


@pytest.fixture()
def broker() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


def test_running_jobs_quota_holds_a_job_in_the_queue_until_one_ends(client, auth, upload, broker):
    from worker.tasks import _claim

    model = upload()
    first, second = (submit(client, auth, model["id"]).json()["id"] for _ in range(2))
    set_quota("alice", running_jobs=1)
    settings = get_settings()
    assert _claim(first, settings).status == JobStatus.running
    broker.flushdb()
    assert _claim(second, settings) is None  # the tenant runs its one allowed job
    assert client.get(f"/v1/jobs/{second}", headers=auth).json()["status"] == "queued"
    assert quotas(client, auth)["running_jobs"] == {"quota": "running_jobs", "limit": 1, "used": 1}
    offered = broker.lrange("cpu", 0, -1)  # offered again later (a countdown message), not dropped
    assert len(offered) == 1 and second.encode() in offered[0] and b'"eta": "' in offered[0]

    with session_scope() as session:
        session.get(Job, first).status = JobStatus.succeeded
    assert _claim(second, settings).status == JobStatus.running
    assert _claim(second, settings) is None  # a duplicate delivery is still ignored, not held
    assert broker.llen("cpu") == 1


def test_concurrent_submissions_cannot_both_take_the_last_queued_place(client, auth, upload):
    model = upload()
    set_quota("alice", queued_jobs=1)
    with session_scope() as session:
        tenant_id = Tenants(session).named("alice").id
    with session_scope() as submitting:  # a submission between its quota check and its commit
        check_submission(submitting, tenant_id, get_settings())
        thread, answer = _in_thread(lambda: submit(client, auth, model["id"]))
        thread.join(0.5)
        assert thread.is_alive(), "the second submission must wait for the first one's tenant lock"
        Jobs(submitting, tenant_id).add_job(model["id"], {"steps": [INT8]}, "cpu", None, None)
    thread.join(10)
    assert answer[0].status_code == 429, answer[0].text


def test_concurrent_claims_cannot_both_start_the_last_allowed_job(client, auth, upload, broker):
    from worker.tasks import _claim

    model = upload()
    first, second = (submit(client, auth, model["id"]).json()["id"] for _ in range(2))
    set_quota("alice", running_jobs=1)
    settings = get_settings()
    with session_scope() as claiming:  # a worker between its quota check and its claim's commit
        runs = JobRuns(claiming)
        assert running_room(claiming, runs.get(first), settings)
        thread, claimed = _in_thread(lambda: _claim(second, settings))
        thread.join(0.5)
        assert thread.is_alive(), "the second claim must wait for the first one's tenant lock"
        assert runs.claim(first, timedelta(seconds=60), settings.job_max_attempts) is not None
    thread.join(10)
    assert claimed == [None]
    assert client.get(f"/v1/jobs/{second}", headers=auth).json()["status"] == "queued"


def test_mcs_quotas_set_and_show(client, auth, capsys):
    from cli.main import main

    assert main(["quotas", "set", "--tenant", "alice", "--queued-jobs", "7", "--stored-bytes", "1000"]) == 0
    shown = capsys.readouterr().out
    assert "queued_jobs   limit               7  used 0" in shown and "stored_bytes  limit            1000" in shown
    assert quotas(client, auth)["queued_jobs"]["limit"] == 7
    assert main(["quotas", "set", "--tenant", "alice", "--queued-jobs", "default"]) == 0
    assert quotas(client, auth)["queued_jobs"]["limit"] == get_settings().quota_queued_jobs
    assert quotas(client, auth)["stored_bytes"]["limit"] == 1000  # left as it was
    assert main(["quotas", "show", "--tenant", "nobody"]) == 1
    with pytest.raises(SystemExit):
        main(["quotas", "set", "--tenant", "alice", "--running-jobs", "-1"])
