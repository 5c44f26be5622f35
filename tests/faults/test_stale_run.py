"""A run that stalled past its lease while the job was requeued and taken by a second run: the stale run writes
nothing (progress, steps, artifact file) and is told to stop; the live run is unaffected."""

from datetime import timedelta

import pytest
from sqlalchemy import update

from core.service.db.models import Job, utcnow
from core.service.db.repositories import JobRuns
from core.service.db.session import session_scope
from core.service.storage import get_store
from worker import tasks

pytestmark = pytest.mark.faults
INT8 = {"type": "quantize"}


def taken_over(client, auth, upload) -> str:
    """A job whose first run's lease expired, requeued and claimed by a second run (attempts == 2)."""
    model = upload()
    job_id = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [INT8]}, headers=auth).json()["id"]
    with session_scope() as session:
        runs = JobRuns(session)
        assert runs.claim(job_id, timedelta(seconds=-1), max_attempts=3) is not None
        assert runs.sweep_expired(max_attempts=3)  # requeued
        assert runs.claim(job_id, timedelta(seconds=60), max_attempts=3).attempts == 2
    return job_id


def test_a_stale_run_writes_no_progress_or_steps_and_is_told_to_stop(client, auth, upload):
    job_id = taken_over(client, auth, upload)
    with session_scope() as session:
        runs = JobRuns(session)
        assert runs.progress(job_id, 0.9, "stale", attempt=1) is True
        assert runs.stop_requested(job_id, attempt=1) is True
        runs.step_started(job_id, 0, attempt=1)
        runs.step_finished(job_id, 0, {"size_ratio": 0.1}, ["stale"], attempt=1)
    job = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert job["message"] != "stale" and job["progress"] != 0.9
    assert job["steps"][0]["status"] == "queued" and job["steps"][0]["metrics"] is None
    with session_scope() as session:  # the run that holds the job writes as before
        assert JobRuns(session).progress(job_id, 0.5, "live", attempt=2) is False
        JobRuns(session).step_started(job_id, 0, attempt=2)
    job = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert (job["message"], job["progress"], job["steps"][0]["status"]) == ("live", 0.5, "running")


def test_a_run_that_loses_the_job_at_the_end_deletes_its_file_and_records_nothing(client, auth, upload, tmp_path,
                                                                                   monkeypatch):
    model = upload()
    job_id = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [INT8]}, headers=auth).json()["id"]
    with session_scope() as session:
        first = JobRuns(session).claim(job_id, timedelta(seconds=60), max_attempts=3)
        session.expunge(first)

    real_execute = tasks.execute_job

    def run_then_lose_the_lease(*args, **kwargs):
        outcome = real_execute(*args, **kwargs)  # the real pipeline, then the takeover before `succeed`
        with session_scope() as session:
            session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(1)))
            assert JobRuns(session).sweep_expired(max_attempts=3)
            assert JobRuns(session).claim(job_id, timedelta(seconds=60), max_attempts=3).attempts == 2
        return outcome

    monkeypatch.setattr(tasks, "execute_job", run_then_lose_the_lease, raising=True)
    tasks._execute(first, get_store(), tmp_path / "work")
    job = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert (job["status"], job["attempts"], job["artifacts"]) == ("running", 2, [])
    assert not list(get_store().path(f"artifacts/{job_id}").rglob("*.zip"))  # no file left behind
