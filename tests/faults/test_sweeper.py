"""The sweeper and the failure classification, on the suite's PostgreSQL and Redis (no servers killed here)."""

import errno
import json
import os
import time
from datetime import timedelta

import pytest
import redis
import torch
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import update

from core.errors import InvalidSpec, StepFailed, Unavailable
from core.service.db.models import Job, JobStatus
from core.service.db.repositories import JobRuns
from core.service.db.session import session_scope
from core.service.settings import get_settings
from tests.fixtures.environment import REDIS_URL
from worker.celery_app import RUN_JOB_TASK, app
from worker.faults import failure_for, sweep, timeout_error
from worker.tasks import reconcile_queued

pytestmark = pytest.mark.faults
INT8 = {"type": "quantize"}


def claimed_with_expired_lease(client, auth, upload) -> str:
    model = upload()
    job_id = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [INT8]}, headers=auth).json()["id"]
    redis.Redis.from_url(REDIS_URL).delete("cpu")
    with session_scope() as session:
        assert JobRuns(session).claim(job_id, timedelta(seconds=-1), max_attempts=2) is not None
    return job_id


def queued_ids() -> list[str]:
    return [json.loads(m)["headers"]["argsrepr"].strip("[]'\"")
            for m in redis.Redis.from_url(REDIS_URL).lrange("cpu", 0, -1)]


def test_expired_lease_is_requeued_then_ends_worker_lost_at_the_cap(client, auth, upload):
    job_id = claimed_with_expired_lease(client, auth, upload)
    settings = get_settings()
    assert sweep(app, RUN_JOB_TASK, settings)[0] == 1
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).json()["status"] == "queued"
    assert queued_ids() == [job_id]
    with session_scope() as session:  # the requeued run's worker dies as well: second and last attempt
        assert JobRuns(session).claim(job_id, timedelta(seconds=-1), max_attempts=2) is not None
    assert sweep(app, RUN_JOB_TASK, settings)[0] == 0
    job = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert (job["status"], job["error"]["code"], job["attempts"]) == ("failed", "worker_lost", 2)
    assert sweep(app, RUN_JOB_TASK, settings) == (0, 0)  # nothing left to do: a second sweeper is a no-op


def raise_limits(job_id: str) -> dict:
    """Give the job the estimate of a long job: limits above the operator's, as pre-flight stores them."""
    estimate = {"seconds": 3400.0, "soft_time_limit_s": 6480, "hard_time_limit_s": 7200}
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(estimate=estimate))
    return estimate


def queued_time_limits() -> list[list[int | None]]:
    return [json.loads(m)["headers"]["timelimit"] for m in redis.Redis.from_url(REDIS_URL).lrange("cpu", 0, -1)]


def test_a_requeued_job_keeps_the_limits_its_estimate_raised(client, auth, upload):
    job_id = claimed_with_expired_lease(client, auth, upload)
    raise_limits(job_id)
    assert sweep(app, RUN_JOB_TASK, get_settings())[0] == 1
    assert queued_ids() == [job_id] and queued_time_limits() == [[7200, 6480]]


def test_the_reconciler_resends_a_job_with_the_limits_its_estimate_raised(client, auth, upload):
    model = upload()
    short, long = (client.post("/v1/jobs", json={"model_id": model["id"], "steps": [INT8]}, headers=auth).json()["id"]
                   for _ in range(2))
    raise_limits(long)
    redis.Redis.from_url(REDIS_URL).delete("cpu")  # the broker lost both messages
    assert reconcile_queued(older_than_s=0) == 2
    assert dict(zip(queued_ids(), queued_time_limits(), strict=True)) == {short: [None, None], long: [7200, 6480]}


def test_the_timeout_error_names_the_jobs_own_limit():
    settings = get_settings()
    raised = {"seconds": 3400.0, "soft_time_limit_s": 6480, "hard_time_limit_s": 7200}
    message = failure_for(SoftTimeLimitExceeded(), settings, raised)[0]["message"]
    assert message.startswith("the job ran past its soft time limit of 6480 s (estimated 3400 s; raised by")
    assert "hard time limit of 7200 s (estimated 3400 s;" in timeout_error("hard", raised, settings)["message"]
    short = {"seconds": 12.0, "soft_time_limit_s": 3240, "hard_time_limit_s": 3600}
    assert "hard time limit of 3600 s (estimated 12 s; MCS_JOB_SOFT_TIME_LIMIT_S" in timeout_error(
        "hard", short, settings)["message"]
    assert f"soft time limit of {settings.job_soft_time_limit_s} s (MCS_" in timeout_error(
        "soft", None, settings)["message"]


def test_a_live_lease_is_left_alone(client, auth, upload):
    job_id = claimed_with_expired_lease(client, auth, upload)
    with session_scope() as session:
        assert JobRuns(session).renew_lease(job_id, timedelta(seconds=60))
    assert sweep(app, RUN_JOB_TASK, get_settings()) == (0, 0)
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).json()["status"] == "running"


def test_stale_scratch_is_removed_but_not_a_running_jobs_folder(client, auth, upload):
    running_id = claimed_with_expired_lease(client, auth, upload)
    with session_scope() as session:
        JobRuns(session).renew_lease(running_id, timedelta(seconds=60))
    work = get_settings().work_dir
    old = time.time() - get_settings().scratch_max_age_s - 10
    for name in ("upload-dead", "dataset-dead", f"job-{running_id}", "job-job_gone", "upload-fresh", "other"):
        (work / name).mkdir(parents=True)
        (work / name / "part").write_bytes(b"x")
        if name != "upload-fresh":
            for path in (work / name / "part", work / name):
                os.utime(path, (old, old))
    assert sweep(app, RUN_JOB_TASK, get_settings()) == (0, 3)
    assert sorted(p.name for p in work.iterdir()) == sorted([f"job-{running_id}", "upload-fresh", "other"])


@pytest.mark.parametrize(("exc", "code", "status"), [
    (SoftTimeLimitExceeded(), "timeout", JobStatus.failed),
    (OSError(errno.ENOSPC, "No space left on device"), "storage", JobStatus.failed),
    (RuntimeError("Error while serializing: I/O error: File too large (os error 27)"), "storage", JobStatus.failed),
    (MemoryError(), "out_of_memory", JobStatus.failed),
    (torch.OutOfMemoryError("CUDA out of memory"), "out_of_memory", JobStatus.failed),
    (InvalidSpec("targets select nothing"), "invalid_spec", JobStatus.failed),
    (KeyError("bug"), "internal_error", JobStatus.failed),
])
def test_failures_are_named(exc, code, status):
    assert failure_for(exc, get_settings(), None)[0]["code"] == code


def test_wrapped_causes_are_named_and_infrastructure_faults_retry():
    try:
        try:
            torch.empty(2**62, dtype=torch.uint8)  # a real failed allocation from torch's CPU allocator
        except RuntimeError as inner:
            raise StepFailed(f"step quantize failed: {inner}") from inner
    except StepFailed as wrapped:
        assert failure_for(wrapped, get_settings(), None)[0]["code"] == "out_of_memory"
    assert failure_for(Unavailable("db down"), get_settings(), None) is None
    assert failure_for(ConnectionRefusedError(), get_settings(), None) is None
