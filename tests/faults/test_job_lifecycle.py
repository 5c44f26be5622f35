"""The job lifecycle as a Hypothesis state machine: clients submit (and retry submissions, also while the broker is
down), cancel and poll through the real API; workers claim, finish, fail, hit infrastructure faults and vanish
through the worker's own repository (`JobRuns`), all on the suite's PostgreSQL. After every step: each job is in
exactly one known state, a terminal state never changes, a job never disappears, no job waits in `queued` with no
attempt left, a succeeded job has exactly one artifact and no other job has one, and the list endpoints agree
with single gets."""

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from uuid import uuid4

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

import api.queue
from core.errors import Unavailable
from core.service.db.models import Job, new_id
from core.service.db.repositories import JobRuns, Models, Tenants
from core.service.db.session import session_scope
from worker.faults import retries_exhausted

pytestmark = pytest.mark.faults
STATUSES = {"queued", "running", "succeeded", "failed", "cancelled"}
TERMINAL = {"succeeded", "failed", "cancelled"}
MAX_ATTEMPTS = 2
LEASE = timedelta(seconds=60)  # a live run's lease: only the `worker_vanishes` rule lets one expire
MAX_JOBS = 4  # few jobs per example: the steps then meet on the same jobs (takeovers, late ends, retries)
ENDED_FIELDS = ("status", "error", "artifacts", "finished_at", "attempts", "metrics")


@contextmanager
def broker_down() -> Iterator[None]:
    """The API's Celery app pointed at a port where no broker listens: sending is refused for real."""
    from celery import Celery

    dead = Celery("dead-broker", broker="redis://127.0.0.1:1/0")
    dead.conf.update(broker_connection_retry_on_startup=False,
                     broker_transport_options=api.queue.app.conf.broker_transport_options)
    live, api.queue.app = api.queue.app, dead
    try:
        yield
    finally:
        api.queue.app = live


def tenant_with_a_model() -> tuple[str, str]:
    """A fresh tenant (its lists hold exactly one example's jobs) and a model row of its own. The row is recorded
    through the repository rather than uploaded: no job here is compressed, and uploads are tested elsewhere."""
    with session_scope() as session:
        tenants = Tenants(session)
        tenant = tenants.get_or_create(f"lifecycle-{uuid4().hex}")
        model_id = new_id("mdl")
        Models(session, tenant.id).add(id=model_id, name="m", architecture="BertModel", model_type="bert",
                                       num_parameters=1, size_bytes=1, sha256="0" * 64,
                                       storage_key=f"models/{model_id}")
        return tenants.create_api_key(tenant), model_id


class JobLifecycle(RuleBasedStateMachine):
    jobs = Bundle("jobs")
    runs = Bundle("runs")  # claimed runs: the Job a worker holds, as the worker holds it (loaded at claim time)

    def __init__(self, client: TestClient) -> None:
        super().__init__()
        self.client = client
        key, self.model_id = tenant_with_a_model()
        self.headers = {"Authorization": f"Bearer {key}"}
        self.seen: dict[str, dict] = {}  # job id -> the job as last polled
        self.cancel_requested: set[str] = set()
        self.idempotent: dict[str, tuple[dict, str]] = {}  # Idempotency-Key -> (body, job id)

    def _get(self, job_id: str) -> dict:
        response = self.client.get(f"/v1/jobs/{job_id}", headers=self.headers)
        assert response.status_code == 200, f"job {job_id} disappeared: {response.text}"
        return response.json()

    def _listed(self, status: str | None = None) -> dict[str, dict]:
        query = {"page_size": 100, **({"status": status} if status else {})}
        response = self.client.get("/v1/jobs", params=query, headers=self.headers)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["total"] == len(body["items"])  # the steps below never make more than 100 jobs
        return {job["id"]: job for job in body["items"]}

    @initialize(target=jobs)
    def first_job(self) -> str:
        return self.submit(key=None, bits=8)

    @precondition(lambda self: len(self.seen) < MAX_JOBS)
    @rule(target=jobs, key=st.sampled_from([None, "retry-a", "retry-b"]), bits=st.sampled_from([4, 8]))
    def submit(self, key: str | None, bits: int) -> str:
        """Submit a job; with an Idempotency-Key already used, this is a client's retry: the same job, or a 409 for
        a different body, and never a second job."""
        body = {"model_id": self.model_id, "steps": [{"type": "quantize", "method": "rtn", "bits": bits}]}
        headers = {**self.headers, **({"Idempotency-Key": key} if key else {})}
        response = self.client.post("/v1/jobs", json=body, headers=headers)
        if key in self.idempotent:
            first_body, job_id = self.idempotent[key]
            if body == first_body:
                assert response.status_code == 202 and response.json()["id"] == job_id, response.text
            else:
                assert response.status_code == 409 and response.json()["error"]["code"] == "conflict"
            return multiple()
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["status"] == "queued" and job["attempts"] == 0 and response.headers["Location"].endswith(job["id"])
        self.seen[job["id"]] = job
        if key:
            self.idempotent[key] = (body, job["id"])
        return job["id"]

    @rule(key=st.sampled_from([None, "retry-a", "retry-c"]))
    def submit_while_broker_down(self, key: str | None) -> None:
        """With the broker down a new job is a 503 and nothing is created (the key stays free); a retry of a job
        that already exists replays it."""
        body = {"model_id": self.model_id, "steps": [{"type": "quantize", "method": "rtn", "bits": 8}]}
        headers = {**self.headers, **({"Idempotency-Key": key} if key else {})}
        with broker_down():
            response = self.client.post("/v1/jobs", json=body, headers=headers)
        if key in self.idempotent:
            assert response.status_code in (202, 409), response.text
            return
        assert response.status_code == 503 and response.json()["error"]["code"] == "unavailable", response.text

    @rule(job_id=jobs)
    def cancel(self, job_id: str) -> None:
        """A queued job ends `cancelled` at once, a running one is flagged, an ended one is a 409 (unchanged)."""
        before = self.seen[job_id]["status"]
        response = self.client.post(f"/v1/jobs/{job_id}/cancel", headers=self.headers)
        if before in TERMINAL:
            assert response.status_code == 409 and response.json()["error"]["code"] == "conflict", response.text
            return
        assert response.status_code == 200, response.text
        assert response.json()["status"] == {"queued": "cancelled", "running": "running"}[before]
        assert response.json()["cancel_requested"] is True
        self.cancel_requested.add(job_id)

    @rule(target=runs, job_id=jobs)
    def worker_claims(self, job_id: str) -> Job:
        """A delivery claims the job: only a queued, uncancelled job under its attempt cap can be taken. A delivery
        that cannot claim settles the job as the worker does, and a live or ended job is left as it was."""
        before = self.seen[job_id]
        with session_scope() as session:
            runs = JobRuns(session)
            job = runs.claim(job_id, LEASE, MAX_ATTEMPTS)
            if job is None:
                runs.settle_unclaimed(job_id, MAX_ATTEMPTS)
        claimable = before["status"] == "queued" and job_id not in self.cancel_requested
        assert (job is not None) == (claimable and before["attempts"] < MAX_ATTEMPTS)
        if job is None:
            assert self._get(job_id)["status"] == before["status"]
        return job if job is not None else multiple()

    @rule(run=consumes(runs), last_try=st.booleans())
    def infrastructure_fault(self, run: Job, last_try: bool) -> None:
        """The run hits a database, broker or storage fault: the job goes back to `queued` for the task's retry,
        or ends `failed` when it has no attempt (or task retry) left; a run that no longer holds it changes
        nothing."""
        before = self.seen[run.id]
        with session_scope() as session:
            retry = JobRuns(session).release_or_end(run.id, run.attempts, MAX_ATTEMPTS,
                                                    retries_exhausted(Unavailable("database gone")), last_try)
        after = self._get(run.id)
        holds = before["status"] == "running" and before["attempts"] == run.attempts
        if not holds:
            assert not retry and after["status"] == before["status"]
        elif run.id in self.cancel_requested:
            assert not retry and after["status"] == "cancelled"
        elif last_try or run.attempts >= MAX_ATTEMPTS:
            assert not retry and (after["status"], after["error"]["code"]) == ("failed", "unavailable")
        else:
            assert retry and after["status"] == "queued"

    @rule(run=consumes(runs), succeeded=st.booleans())
    def worker_ends(self, run: Job, succeeded: bool) -> None:
        """A run ends its job, unless the job ended or was taken over meanwhile: then nothing changes."""
        before = self.seen[run.id]
        with session_scope() as session:
            runs = JobRuns(session)
            if succeeded:
                runs.succeed(run, {"size_ratio": 0.5}, {"name": "m.zip", "storage_key": f"artifacts/{run.id}/model.zip",
                                                       "sha256": "0" * 64, "size_bytes": 1})
            else:
                runs.fail(run.id, {"code": "step_failed", "message": "a step failed"}, attempt=run.attempts)
        after = self._get(run.id)
        holds = before["status"] == "running" and before["attempts"] == run.attempts
        success = "cancelled" if run.id in self.cancel_requested else "succeeded"  # a cancel's 200 is kept
        expected = (success if succeeded else "failed") if holds else before["status"]
        assert after["status"] == expected, (before, after, run.attempts)

    @rule(run=runs)
    def lease_expires(self, run: Job) -> None:
        """The run's worker stops renewing its lease (killed, or stalled and may come back: the run stays in the
        bundle and can still try to end its job). The sweeper retries the job (queued again), or ends it
        `failed`/`worker_lost` at the attempt cap, or `cancelled` if a cancel was asked for."""
        before = self.seen[run.id]
        with session_scope() as session:
            runs = JobRuns(session)
            runs.renew_lease(run.id, timedelta(seconds=-1))  # renews only a running job, whichever run holds it
            runs.sweep_expired(MAX_ATTEMPTS)
        after = self._get(run.id)
        if before["status"] != "running":
            assert after["status"] == before["status"]
        elif run.id in self.cancel_requested:
            assert after["status"] == "cancelled"
        elif before["attempts"] < MAX_ATTEMPTS:
            assert after["status"] == "queued" and after["attempts"] == before["attempts"]
        else:
            assert (after["status"], after["error"]["code"]) == ("failed", "worker_lost")

    @rule(status=st.sampled_from(sorted(STATUSES)))
    def poll_by_status(self, status: str) -> None:
        """The `status=` filter lists exactly the jobs whose single get has that status."""
        listed = self._listed(status)
        assert set(listed) == {job_id for job_id in self.seen if self._get(job_id)["status"] == status}

    @invariant()
    def every_job_is_consistent(self) -> None:
        listed = self._listed()
        assert set(listed) == set(self.seen), "the list must hold every job, and only this tenant's"
        for job_id, before in self.seen.items():
            job = self._get(job_id)
            assert job["status"] in STATUSES
            assert listed[job_id] == job, "the list and the single get disagree"
            if before["status"] in TERMINAL:
                assert {f: job[f] for f in ENDED_FIELDS} == {f: before[f] for f in ENDED_FIELDS}, "an ended job changed"
            assert len(job["artifacts"]) == (1 if job["status"] == "succeeded" else 0), job
            assert (job["finished_at"] is not None) == (job["status"] in TERMINAL), job
            assert not (job["status"] == "queued" and job["attempts"] >= MAX_ATTEMPTS), f"stuck in queued: {job}"
            if job["status"] == "succeeded":
                assert job_id not in self.cancel_requested, "a job whose cancel was accepted must not succeed"
            self.seen[job_id] = job


def test_job_lifecycle_invariants(unlimited_app):
    with TestClient(unlimited_app) as client:
        run_state_machine_as_test(
            lambda: JobLifecycle(client),
            settings=settings(max_examples=20, stateful_step_count=25, deadline=None, database=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]),
        )
