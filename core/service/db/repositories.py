"""Every query lives here. Tenant-facing repositories filter by tenant in each query, so a route cannot forget it:
another tenant's id is indistinguishable from an unknown one (404)."""

import hashlib
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import CursorResult, Executable, bindparam, delete, func, select, update
from sqlalchemy.orm import Session, joinedload

from core.errors import Conflict, JobCancelled, NotFound, Unavailable, WorkerLost
from core.service.db.models import (
    TERMINAL,
    ApiKey,
    Artifact,
    Base,
    Dataset,
    DeliveryStatus,
    Job,
    JobEvent,
    JobEventType,
    JobStatus,
    JobStep,
    Model,
    ModelStatus,
    Search,
    Tenant,
    TenantQuota,
    Upload,
    UploadStatus,
    Webhook,
    WebhookDelivery,
    Worker,
    utcnow,
)

Row = TypeVar("Row", bound=Base)
# Keys of `Session.info` where a transaction collects what to announce once it committed (core/service/events.py)
NEW_EVENTS, NEW_DELIVERIES = "mcs_new_job_events", "mcs_new_webhook_deliveries"


def _affected(session: Session, statement: Executable) -> int:
    """Rows an UPDATE changed (SQLAlchemy types `execute` as a plain `Result`, which has no `rowcount`)."""
    result = session.execute(statement)
    assert isinstance(result, CursorResult)
    return result.rowcount


def hash_key(plaintext: str) -> str:
    # API keys are 256-bit random tokens, so a plain SHA-256 is enough (no password-style stretching needed).
    return hashlib.sha256(plaintext.encode()).hexdigest()


# The statements of every request's key check and of the job poll, built once: building a select and its cache key
# took a quarter of their ORM time per request (the compiled form is cached by SQLAlchemy either way).
KEY_QUERY = (
    select(Tenant, ApiKey)
    .join(ApiKey, ApiKey.tenant_id == Tenant.id)
    .where(ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None))
)
WHOLE_JOB_QUERY = (
    select(Job)
    .where(Job.id == bindparam("job_id"), Job.tenant_id == bindparam("tenant_id"))
    .options(joinedload(Job.steps), joinedload(Job.artifacts))
)


class Tenants:
    prefix_chars = 12  # "mcs_" and 8 random characters: stored in clear to name a key in `mcs keys list`

    def __init__(self, session: Session) -> None:
        self.session = session

    def get_or_create(self, name: str) -> Tenant:
        tenant = self.session.scalar(select(Tenant).where(Tenant.name == name))
        if tenant is None:
            tenant = Tenant(name=name)
            self.session.add(tenant)
            self.session.flush()
        return tenant

    def create_api_key(self, tenant: Tenant, scopes: Sequence[str] = ("read", "write"),
                       expires_at: datetime | None = None, name: str | None = None) -> str:
        """Return a new key in plain text (shown once); only its hash is stored. `scopes` as stored: the caller
        expands what a scope implies (core/service/keys.py)."""
        return self.add_api_key(tenant.id, scopes, expires_at, name)[1]

    def add_api_key(self, tenant_id: str, scopes: Sequence[str], expires_at: datetime | None,
                    name: str | None) -> tuple[ApiKey, str]:
        """The new key's row and its plain text."""
        plaintext = "mcs_" + secrets.token_urlsafe(32)
        row = ApiKey(tenant_id=tenant_id, key_hash=hash_key(plaintext), prefix=plaintext[:self.prefix_chars],
                     scopes=list(scopes), expires_at=expires_at, name=name)
        self.session.add(row)
        self.session.flush()
        return row, plaintext

    def for_api_key(self, plaintext: str) -> tuple[Tenant, ApiKey] | None:
        """The tenant and row of an unrevoked key (expired or not: the caller says which), in one query. Read from
        the database on every request, never cached, so a revocation holds at the next request on every process."""
        row = self.session.execute(KEY_QUERY, {"key_hash": hash_key(plaintext)}).first()
        return (row[0], row[1]) if row is not None else None

    def named(self, tenant_name: str) -> Tenant:
        tenant = self.session.scalar(select(Tenant).where(Tenant.name == tenant_name))
        if tenant is None:
            raise NotFound(f"no tenant is named {tenant_name!r}")
        return tenant

    def api_keys(self, tenant_name: str) -> Sequence[ApiKey]:
        """A tenant's keys, newest first, revoked ones included."""
        return self.keys_of(self.named(tenant_name).id)

    def keys_of(self, tenant_id: str) -> Sequence[ApiKey]:
        return self.session.scalars(
            select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at.desc(), ApiKey.id)
        ).all()

    def api_key(self, tenant_id: str, key_id: str) -> ApiKey:
        """One of the tenant's keys by id; another tenant's key is a 404 like an unknown id."""
        row = self.session.scalar(select(ApiKey).where(ApiKey.id == key_id, ApiKey.tenant_id == tenant_id)
                                  ) if "\x00" not in key_id else None
        if row is None:
            raise NotFound(f"API key {key_id!r} not found")
        return row

    def find_active_key(self, reference: str) -> ApiKey:
        """The one active key with this id (`key_...`), prefix (as `mcs keys list` shows it) or whole value. Two
        active keys with one prefix are a `Conflict`: give the id or the whole key."""
        if reference.startswith("key_"):
            match = ApiKey.id == reference
        elif len(reference) > self.prefix_chars:
            match = ApiKey.key_hash == hash_key(reference)
        else:
            match = ApiKey.prefix == reference
        keys = self.session.scalars(select(ApiKey).where(match, ApiKey.revoked_at.is_(None))).all()
        if not keys:
            raise NotFound(f"no active API key has the id, prefix or value {reference[:self.prefix_chars]!r}")
        if len(keys) > 1:
            raise Conflict(f"{len(keys)} active keys share the prefix {reference!r}; give the key's id")
        return keys[0]

    def revoke_api_key(self, reference: str) -> ApiKey:
        """Revoke the one active key `find_active_key` finds; the next request with it is a 401."""
        key = self.find_active_key(reference)
        key.revoked_at = utcnow()
        self.session.flush()
        return key

    def quota(self, tenant_id: str) -> TenantQuota | None:
        return self.session.get(TenantQuota, tenant_id)

    def set_quota(self, tenant_id: str, **limits: int | None) -> TenantQuota:
        """Set the named overrides (None: back to the setting's default); others stay as they are."""
        row = self.quota(tenant_id) or TenantQuota(tenant_id=tenant_id)
        for name, value in limits.items():
            setattr(row, name, value)
        self.session.add(row)
        self.session.flush()
        return row


class Usage:
    """What a tenant uses now, for its quotas."""

    def __init__(self, session: Session, tenant_id: str) -> None:
        self.session = session
        self.tenant_id = tenant_id

    def stored_bytes(self) -> int:
        """Bytes of the tenant's models, datasets and artifacts."""
        total = 0
        for table in (Model, Dataset, Artifact):
            total += self.session.scalar(
                select(func.coalesce(func.sum(table.size_bytes), 0)).where(table.tenant_id == self.tenant_id)
            ) or 0
        return int(total)

    def jobs(self, status: JobStatus, other_than: str | None = None) -> int:
        """The tenant's jobs in `status`, but for `other_than` (a job whose expired lease is being claimed again)."""
        query = select(func.count()).select_from(Job).where(Job.tenant_id == self.tenant_id, Job.status == status,
                                                            Job.id != (other_than or ""))
        return self.session.scalar(query) or 0

    def lock_tenant(self) -> None:
        """Serialise this tenant's quota checks until the transaction ends (a no-op on SQLite, which has one writer).
        FOR NO KEY UPDATE: inserts of rows that reference the tenant (their foreign key's KEY SHARE) do not wait."""
        self.session.execute(select(Tenant.id).where(Tenant.id == self.tenant_id).with_for_update(key_share=True))


class _TenantScoped:
    """Base for repositories that only ever see one tenant's rows."""

    row_type: type[Model] | type[Job] | type[Dataset] | type[Artifact] | type[Webhook] | type[Search]
    noun: str

    def __init__(self, session: Session, tenant_id: str) -> None:
        self.session = session
        self.tenant_id = tenant_id

    def get(self, row_id: str) -> Any:
        return self._one(row_id)

    def _one(self, row_id: str) -> Any:
        if "\x00" in row_id:  # PostgreSQL text cannot hold a NUL, so no such row exists (and the query would fail)
            raise NotFound(f"{self.noun} {row_id!r} not found")
        row = self.session.scalar(
            select(self.row_type).where(self.row_type.id == row_id, self.row_type.tenant_id == self.tenant_id)
        )
        if row is None:
            raise NotFound(f"{self.noun} {row_id!r} not found")
        return row

    def add(self, **fields: Any) -> Any:
        row = self.row_type(tenant_id=self.tenant_id, **fields)
        self.session.add(row)
        self.session.flush()
        return row

    def delete(self, row: Base) -> None:
        self.session.delete(row)
        self.session.flush()

    def page(self, page: int, page_size: int, *filters: Any) -> tuple[Sequence[Any], int]:
        where = (self.row_type.tenant_id == self.tenant_id, *filters)
        total = self.session.scalar(select(func.count()).select_from(self.row_type).where(*where)) or 0
        rows = self.session.scalars(
            select(self.row_type)
            .where(*where)
            .order_by(self.row_type.created_at.desc(), self.row_type.id)
            .offset((page - 1) * page_size)
            .limit(page_size)
        ).all()
        return rows, total


def ready(model: Model) -> Model:
    """The model, if a job may use it: an import still running or failed is a 409 that says so."""
    if model.status == ModelStatus.importing:
        raise Conflict(f"model {model.id!r} is still importing; wait until GET /v1/models/{model.id} says ready",
                       {"model_id": model.id, "status": model.status})
    if model.status == ModelStatus.failed:
        raise Conflict(f"model {model.id!r} failed to import ({(model.error or {}).get('message', 'see its error')}); "
                       "import it again", {"model_id": model.id, "status": model.status})
    return model


class Models(_TenantScoped):
    row_type = Model
    noun = "model"

    def get_for_new_job(self, model_id: str) -> Model:
        """The model, share-locked until the transaction ends: a concurrent delete (which locks it for update,
        see `Jobs.active_for_model`) waits for the new job's commit and then sees it, or wins and this is a 404."""
        row = self.session.scalar(
            select(Model).where(Model.id == model_id, Model.tenant_id == self.tenant_id).with_for_update(read=True)
        ) if "\x00" not in model_id else None
        if row is None:
            raise NotFound(f"model {model_id!r} not found")
        return ready(row)

    def get_ready(self, model_id: str) -> Model:
        return ready(self.get(model_id))

    def exists(self, model_id: str) -> bool:
        query = select(Model.id).where(Model.id == model_id, Model.tenant_id == self.tenant_id)
        return "\x00" not in model_id and self.session.scalar(query) is not None


class Jobs(_TenantScoped):
    row_type = Job
    noun = "job"

    def add_job(self, model_id: str, spec: dict[str, Any], queue: str, idempotency_key: str | None,
                request_hash: str | None, estimate: dict[str, Any] | None = None) -> Job:
        job = Job(tenant_id=self.tenant_id, model_id=model_id, spec=spec, queue=queue,
                  idempotency_key=idempotency_key, request_hash=request_hash, status=JobStatus.queued,
                  estimate=estimate)
        job.steps = [
            JobStep(index=i, type=step["type"], config=step, status=JobStatus.queued)
            for i, step in enumerate(spec.get("steps", []))  # an evaluation job has none
        ]
        self.session.add(job)
        self.session.flush()
        JobEvents(self.session).append(job.id, JobEventType.status, {"status": JobStatus.queued})
        return job

    def by_idempotency_key(self, key: str) -> Job | None:
        return self.session.scalar(select(Job).where(Job.tenant_id == self.tenant_id, Job.idempotency_key == key))

    def get_whole(self, job_id: str) -> Job:
        """The job with its steps and artifacts in one statement (joined, where `get` loads them in two more): one
        round trip for the status poll that clients repeat, and one snapshot under `read_scope`."""
        if "\x00" in job_id:
            raise NotFound(f"job {job_id!r} not found")
        job = self.session.scalars(WHOLE_JOB_QUERY, {"job_id": job_id, "tenant_id": self.tenant_id}).unique().first()
        if job is None:
            raise NotFound(f"job {job_id!r} not found")
        return job

    def active_for_model(self, model_id: str) -> int:
        """Queued or running jobs of the model. The model row is locked for update first, until the transaction
        ends, so no job can be submitted for it between this count and its deletion (see `Models.get_for_new_job`)."""
        self.session.execute(select(Model.id).where(Model.id == model_id).with_for_update())
        query = select(func.count()).select_from(Job).where(
            Job.tenant_id == self.tenant_id, Job.model_id == model_id, Job.status.not_in(TERMINAL)
        )
        return self.session.scalar(query) or 0

    def cancel(self, job: Job) -> Job:
        """Queued jobs end at once; running ones are flagged, stop at the next check, and can then only end
        `cancelled` (a run that finishes meanwhile records no success: see `JobRuns.succeed`). Both updates are
        guarded by the status, so a job that ended since it was read is a 409, never a flag on an ended job."""
        now = utcnow()
        flagged = _affected(
            self.session,
            update(Job).where(Job.id == job.id, Job.status == JobStatus.queued)
            .values(status=JobStatus.cancelled, finished_at=now, cancel_requested=True)
        ) or _affected(
            self.session,
            update(Job).where(Job.id == job.id, Job.status == JobStatus.running).values(cancel_requested=True)
        )
        self.session.flush()
        self.session.refresh(job)
        if not flagged:
            raise Conflict(f"job {job.id} already ended with status {job.status!r}; it cannot be cancelled")
        if job.status == JobStatus.cancelled:
            JobEvents(self.session).done(job.id, JobStatus.cancelled)
        else:
            JobEvents(self.session).append(job.id, JobEventType.status,
                                           {"status": job.status, "cancel_requested": True})
        return job


class Datasets(_TenantScoped):
    row_type = Dataset
    noun = "dataset"


class Artifacts(_TenantScoped):
    row_type = Artifact
    noun = "artifact"


class Uploads:
    """A tenant's chunked uploads. An expired one is as gone as an unknown id (404)."""

    def __init__(self, session: Session, tenant_id: str) -> None:
        self.session = session
        self.tenant_id = tenant_id

    def get(self, upload_id: str) -> Upload:
        row = None if "\x00" in upload_id else self.session.scalar(
            select(Upload).where(Upload.id == upload_id, Upload.tenant_id == self.tenant_id,
                                 Upload.expires_at > utcnow())
        )
        if row is None:
            raise NotFound(f"upload {upload_id!r} not found (or expired)")
        return row

    def add(self, name: str, manifest: list[dict[str, Any]], ttl: timedelta) -> Upload:
        row = Upload(tenant_id=self.tenant_id, name=name, manifest=manifest, expires_at=utcnow() + ttl)
        self.session.add(row)
        self.session.flush()
        return row

    def delete(self, row: Upload) -> None:
        self.session.delete(row)
        self.session.flush()

    def expired_ids(self) -> list[str]:
        query = select(Upload.id).where(Upload.tenant_id == self.tenant_id, Upload.expires_at <= utcnow())
        return list(self.session.scalars(query))

    def delete_ids(self, upload_ids: list[str]) -> None:
        self.session.execute(delete(Upload).where(Upload.tenant_id == self.tenant_id, Upload.id.in_(upload_ids)))

    def set_status(self, row: Upload, expected: UploadStatus, status: UploadStatus) -> bool:
        """Guarded transition: of two concurrent completes, one finds the upload `open` and takes it."""
        changed = _affected(
            self.session,
            update(Upload).where(Upload.id == row.id, Upload.tenant_id == self.tenant_id, Upload.status == expected)
            .values(status=status)
        )
        self.session.flush()
        self.session.refresh(row)
        return bool(changed)


class Workers:
    """Worker capacity rows (not tenant data): each worker reports its own, submission reads the live ones."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def report(self, worker_id: str, queues: list[str], ram_total_bytes: int, ram_available_bytes: int,
               gpu_name: str | None, gpu_memory_bytes: int | None, runtimes: Sequence[str] = ("torch",)) -> Worker:
        """Insert or refresh the worker's row, stamped now (its heartbeat)."""
        row = self.session.get(Worker, worker_id) or Worker(id=worker_id)
        row.queues, row.gpu_name, row.gpu_memory_bytes = queues, gpu_name, gpu_memory_bytes
        row.runtimes = list(runtimes)
        row.ram_total_bytes, row.ram_available_bytes = ram_total_bytes, ram_available_bytes
        row.heartbeat_at = utcnow()
        self.session.add(row)
        self.session.flush()
        return row

    def live(self, queue: str, since: datetime) -> list[Worker]:
        """Workers of `queue` whose last heartbeat is after `since` (the queue is matched here: JSON is not indexed,
        and a deployment has few workers)."""
        rows = self.session.scalars(select(Worker).where(Worker.heartbeat_at >= since))
        return [row for row in rows if queue in row.queues]


def attempts_exhausted(attempts: int) -> dict[str, Any]:
    return Unavailable(f"the job was tried {attempts} times and the database, broker or storage failed each time; "
                       "it is not retried again").as_dict()


def worker_lost(attempts: int) -> dict[str, Any]:
    return WorkerLost(f"the worker running this job stopped {attempts} times (killed, out of memory, or its host "
                      "was lost); it is not retried again").as_dict()


def cancelled(message: str) -> dict[str, Any]:
    return JobCancelled(message).as_dict()


class JobRuns:
    """The worker's side of a job: claim it once, record progress and steps, end it in exactly one state."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def claim(self, job_id: str, lease: timedelta, max_attempts: int) -> Job | None:
        """Guarded UPDATE: a queued job, or a running one whose lease expired (its worker died), is taken by one
        delivery only; a duplicate delivery of a live job gets None and does nothing."""
        now = utcnow()
        claimable = (Job.status == JobStatus.queued) | (
            (Job.status == JobStatus.running) & (Job.lease_expires_at < now)
        )
        claimed = _affected(
            self.session,
            update(Job)
            .where(Job.id == job_id, claimable, Job.attempts < max_attempts, Job.cancel_requested.is_(False))
            .values(status=JobStatus.running, attempts=Job.attempts + 1, started_at=now,
                    lease_expires_at=now + lease, error=None)
        )
        self.session.flush()
        if not claimed:
            return None
        job = self.session.get(Job, job_id, populate_existing=True)
        if job is not None:
            JobEvents(self.session).append(job_id, JobEventType.status,
                                           {"status": JobStatus.running, "attempt": job.attempts})
        return job

    def get(self, job_id: str) -> Job | None:
        return self.session.get(Job, job_id, populate_existing=True)

    def settle_unclaimed(self, job_id: str, max_attempts: int) -> str:
        """A delivery that could not claim its job ends it if nobody else will: its worker died too often, a cancel
        came before it started, or it is queued with no attempt left. Returns what happened, for the log."""
        job = self.get(job_id)
        if job is None:
            return "missing"
        if job.status == JobStatus.running and job.lease_expires_at and job.lease_expires_at < utcnow():
            self.fail(job_id, worker_lost(job.attempts))
        elif job.status == JobStatus.queued and job.cancel_requested:
            self.fail(job_id, cancelled("cancelled before it started"), JobStatus.cancelled)
        elif job.status == JobStatus.queued and job.attempts >= max_attempts:
            self.fail(job_id, attempts_exhausted(job.attempts))
        else:
            return f"{job.status}: duplicate delivery ignored"
        return "ended"

    def end_exhausted_queued(self, max_attempts: int) -> int:
        """End queued jobs that have no attempt left (a delivery would only ignore them): never stuck in `queued`."""
        exhausted = (Job.status == JobStatus.queued) & (Job.attempts >= max_attempts)
        ids = self.session.scalars(select(Job.id).where(exhausted)).all()
        return sum(self._end(job_id, JobStatus.failed, None, exhausted, error=attempts_exhausted(max_attempts))
                   for job_id in ids)

    def model_of(self, job: Job) -> Model:
        model = self.session.get(Model, job.model_id) if job.model_id else None
        if model is None:
            raise NotFound(f"model {job.model_id!r} of job {job.id} no longer exists")
        return model

    def progress(self, job_id: str, fraction: float, message: str, attempt: int | None = None) -> bool:
        """Record progress of a running job; returns whether the run should stop: cancellation was requested, or
        (with `attempt`) that run no longer holds the job, so its progress is not written either."""
        progress, message = round(min(max(fraction, 0.0), 1.0), 4), message[:500]
        recorded = _affected(
            self.session,
            update(Job).where(*self._held(job_id, attempt)).values(progress=progress, message=message)
        )
        if recorded:
            JobEvents(self.session).append(job_id, JobEventType.progress, {"progress": progress, "message": message})
        return not recorded or self.stop_requested(job_id, attempt)

    def stop_requested(self, job_id: str, attempt: int | None = None) -> bool:
        """Cancellation was requested, or (with `attempt`) that run no longer holds the job."""
        row = self.session.execute(
            select(Job.cancel_requested, Job.status, Job.attempts).where(Job.id == job_id)
        ).one_or_none()
        if row is None:
            return True
        held = row.status == JobStatus.running and (attempt is None or row.attempts == attempt)
        return bool(row.cancel_requested) or not held

    def step_started(self, job_id: str, index: int, attempt: int | None = None) -> None:
        now = utcnow()
        if not _affected(self.session, update(Job).where(*self._held(job_id, attempt)).values(current_step=index)):
            return  # a run that lost the job leaves its steps alone
        self.session.execute(
            update(JobStep).where(JobStep.job_id == job_id, JobStep.index == index)
            .values(status=JobStatus.running, started_at=now, finished_at=None, metrics=None)
        )
        JobEvents(self.session).append(job_id, JobEventType.step_started,
                                       {"index": index, "type": self._step_type(job_id, index)})

    def step_finished(self, job_id: str, index: int, metrics: dict[str, Any], notes: list[str],
                      attempt: int | None = None) -> None:
        held = select(Job.id).where(*self._held(job_id, attempt)).exists()
        if _affected(
            self.session,
            update(JobStep).where(JobStep.job_id == job_id, JobStep.index == index, held)
            .values(status=JobStatus.succeeded, finished_at=utcnow(), metrics=metrics, notes=notes)
        ):
            JobEvents(self.session).append(job_id, JobEventType.step_finished, {
                "index": index, "type": self._step_type(job_id, index), "metrics": metrics, "notes": notes})

    def _step_type(self, job_id: str, index: int) -> str | None:
        return self.session.scalar(select(JobStep.type).where(JobStep.job_id == job_id, JobStep.index == index))

    @staticmethod
    def _held(job_id: str, attempt: int | None) -> list[Any]:
        """The job is running, and with `attempt`, by that run (a stalled run's lease may have been taken over)."""
        where = [Job.id == job_id, Job.status == JobStatus.running]
        return where + ([Job.attempts == attempt] if attempt is not None else [])

    def succeed(self, job: Job, metrics: dict[str, Any], artifact: dict[str, Any] | None) -> bool:
        """Record the artifact and end the job in one transaction; the artifact key is fixed per job, so a
        retried job replaces its row instead of leaving a second one. Records nothing and returns False when this
        run no longer holds the job (it ended, or its lease expired and it was requeued or taken by another run), or
        when a cancel was accepted meanwhile: the job then ends `cancelled`, as the cancel's 200 promised."""
        if not self._end(job.id, JobStatus.succeeded, job.attempts, Job.cancel_requested.is_(False), metrics=metrics,
                         progress=1.0, message="done"):
            error = cancelled("cancelled as the job was finishing; its result is discarded")
            if self._end(job.id, JobStatus.cancelled, job.attempts, Job.cancel_requested.is_(True), error=error):
                self._end_steps(job.id, JobStatus.cancelled)
            return False
        if artifact is None:  # an evaluation job makes no artifact
            return True
        existing = self.session.scalar(select(Artifact).where(Artifact.storage_key == artifact["storage_key"]))
        if existing is not None:
            self.session.delete(existing)
            self.session.flush()
        self.session.add(Artifact(tenant_id=job.tenant_id, job_id=job.id, **artifact))
        return True

    def fail(self, job_id: str, error: dict[str, Any], status: JobStatus = JobStatus.failed,
             attempt: int | None = None) -> None:
        """End a job that has not ended yet; with `attempt`, only while that run still holds it (see `succeed`)."""
        if self._end(job_id, status, attempt, error=error):
            self._end_steps(job_id, status)

    def _end_steps(self, job_id: str, status: JobStatus) -> None:
        self.session.execute(
            update(JobStep).where(JobStep.job_id == job_id, JobStep.status == JobStatus.running)
            .values(status=status, finished_at=utcnow())
        )

    def release_or_end(self, job_id: str, attempt: int | None, max_attempts: int, error: dict[str, Any],
                       last_try: bool = False) -> bool:
        """After an infrastructure fault: True when the task should retry (the run `attempt` held the job: it goes
        back to `queued`; None: the claim itself failed), or False once the job ended, another run holds it, a cancel
        was accepted (it ends `cancelled`) or it has no attempt left (it ends `failed` with `error`): never waiting in
        `queued` for nothing."""
        job = self.get(job_id)
        held = job is not None and job.status == JobStatus.running and job.attempts == attempt
        if job is None or job.status in TERMINAL or (attempt is not None and not held):
            return False
        if job.cancel_requested:  # nobody would run it again: end it as the accepted cancel promised
            self.fail(job_id, cancelled("cancelled; its last run had failed"), JobStatus.cancelled)
            return False
        if last_try or job.attempts >= max_attempts:
            self.fail(job_id, error)
            return False
        if attempt is not None and _affected(
            self.session,
            update(Job).where(*self._held(job_id, attempt)).values(status=JobStatus.queued, lease_expires_at=None)
        ):
            JobEvents(self.session).append(job_id, JobEventType.status, {"status": JobStatus.queued})
        return True

    def renew_lease(self, job_id: str, lease: timedelta) -> bool:
        """The heartbeat of a live run; False once the job is no longer running (ended or taken over)."""
        renewed = _affected(
            self.session,
            update(Job).where(Job.id == job_id, Job.status == JobStatus.running)
            .values(lease_expires_at=utcnow() + lease)
        )
        return bool(renewed)

    def sweep_expired(self, max_attempts: int) -> list[Job]:
        """Running jobs whose lease expired lost their worker: put each back in the queue, or end it `failed`
        with `worker_lost` once it used up its attempts. Returns the requeued jobs (to send to the broker).
        Every change is guarded by the expiry, so a job renewed meanwhile or swept by another worker is left."""
        now = utcnow()
        expired = (Job.status == JobStatus.running) & (Job.lease_expires_at < now)
        jobs = self.session.scalars(select(Job).where(expired)).all()
        return [job for job in jobs if self._sweep_one(job, expired, max_attempts, now)]

    def _sweep_one(self, job: Job, expired: Any, max_attempts: int, now: datetime) -> bool:
        """Requeue (True) or end one expired job."""
        guarded = update(Job).where(Job.id == job.id, expired)
        if job.attempts < max_attempts and not job.cancel_requested:
            if not _affected(self.session, guarded.values(status=JobStatus.queued, lease_expires_at=None)):
                return False
            JobEvents(self.session).append(job.id, JobEventType.status,
                                           {"status": JobStatus.queued, "reason": "worker_lost"})
            return True
        status, error = JobStatus.failed, worker_lost(job.attempts)
        if job.cancel_requested:
            status, error = JobStatus.cancelled, cancelled("cancelled; its worker had stopped")
        if _affected(self.session, guarded.values(status=status, finished_at=now, lease_expires_at=None,
                                               error=error)):
            self._end_steps(job.id, status)
            JobEvents(self.session).done(job.id, status, error=error)
        return False

    def running_ids(self) -> set[str]:
        return set(self.session.scalars(select(Job.id).where(Job.status == JobStatus.running)))

    def stale_queued(self, older_than: datetime) -> Sequence[Job]:
        query = select(Job).where(Job.status == JobStatus.queued, Job.created_at < older_than)
        return self.session.scalars(query).all()

    def _end(self, job_id: str, status: JobStatus, attempt: int | None = None, *guards: Any, **values: Any) -> bool:
        where = [Job.id == job_id, Job.status.not_in(TERMINAL), *guards]
        if attempt is not None:  # a run whose lease expired may still finish: the job is no longer its to end
            where += [Job.status == JobStatus.running, Job.attempts == attempt]
        ended = _affected(
            self.session,
            update(Job).where(*where).values(status=status, finished_at=utcnow(), lease_expires_at=None, **values)
        )
        if ended:
            JobEvents(self.session).done(job_id, status, values.get("metrics"), values.get("error"))
        return bool(ended)


class JobEvents:
    """A job's events (`GET /v1/jobs/{id}/events`), appended in the transaction that changes the job, so the
    stream and the job never disagree. Each event also becomes a pending delivery for every webhook of the job's
    tenant that wants its type; both are announced once the transaction committed (`core.service.events`)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def append(self, job_id: str, event_type: JobEventType, data: dict[str, Any]) -> JobEvent | None:
        """Append the job's next event. The job's row is locked first (its writer usually holds the lock already),
        so the numbers follow the commit order: a reader never finds a gap filled later."""
        tenant_id = self.session.scalar(select(Job.tenant_id).where(Job.id == job_id).with_for_update())
        if tenant_id is None:
            return None
        last = self.session.scalar(select(func.max(JobEvent.seq)).where(JobEvent.job_id == job_id))
        event = JobEvent(job_id=job_id, seq=(last or 0) + 1, type=str(event_type), data=data, created_at=utcnow())
        self.session.add(event)
        self.session.flush()
        self.session.info.setdefault(NEW_EVENTS, set()).add(job_id)
        self._fan_out(tenant_id, event)
        return event

    def done(self, job_id: str, status: JobStatus, metrics: dict[str, Any] | None = None,
             error: dict[str, Any] | None = None) -> None:
        """The last event of a job: its final status, metrics summary and error."""
        self.append(job_id, JobEventType.done, {"status": status, "metrics": metrics, "error": error})

    def _fan_out(self, tenant_id: str, event: JobEvent) -> None:
        hooks = self.session.scalars(select(Webhook).where(Webhook.tenant_id == tenant_id)).all()
        for hook in (hook for hook in hooks if event.type in hook.events):
            delivery = WebhookDelivery(webhook_id=hook.id, job_id=event.job_id, event_seq=event.seq,
                                       event_type=event.type, payload=event_payload(event), attempt_log=[],
                                       status=DeliveryStatus.pending, attempts=0)
            self.session.add(delivery)
            self.session.flush()
            self.session.info.setdefault(NEW_DELIVERIES, []).append(delivery.id)

    def job_state(self, job_id: str) -> tuple[str, dict[str, Any] | None, dict[str, Any] | None] | None:
        """The job's (status, metrics, error), None for no such job."""
        row = self.session.execute(select(Job.status, Job.metrics, Job.error).where(Job.id == job_id)).one_or_none()
        return None if row is None else (row[0], row[1], row[2])

    def after(self, job_id: str, seq: int, limit: int = 500) -> Sequence[JobEvent]:
        """The job's events numbered above `seq`, oldest first."""
        query = (select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > seq)
                 .order_by(JobEvent.seq).limit(limit))
        return self.session.scalars(query).all()


def event_payload(event: JobEvent) -> dict[str, Any]:
    """A webhook's body for an event: the Standard Webhooks shape (`type`, `timestamp`, `data`)."""
    return {"type": event.type, "timestamp": event.created_at.isoformat(),
            "data": {"job_id": event.job_id, "event_id": event.seq, **event.data}}


class Webhooks(_TenantScoped):
    row_type = Webhook
    noun = "webhook"

    def deliveries(self, webhook: Webhook, page: int, page_size: int) -> tuple[Sequence[WebhookDelivery], int]:
        """The webhook's delivery log, newest first."""
        where = WebhookDelivery.webhook_id == webhook.id
        total = self.session.scalar(select(func.count()).select_from(WebhookDelivery).where(where)) or 0
        rows = self.session.scalars(
            select(WebhookDelivery).where(where)
            .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id)
            .offset((page - 1) * page_size).limit(page_size)
        ).all()
        return rows, total


class Deliveries:
    """The delivery task's side of a webhook delivery (not tenant-scoped: it takes an id it was sent)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def pending(self, delivery_id: str) -> tuple[WebhookDelivery, Webhook] | None:
        """The delivery and its webhook while it is still pending (a duplicate task finds None)."""
        row = self.session.execute(
            select(WebhookDelivery, Webhook).join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == DeliveryStatus.pending)
        ).one_or_none()
        return None if row is None else (row[0], row[1])

    def record(self, delivery_id: str, attempt: dict[str, Any], status: DeliveryStatus) -> None:
        delivery = self.session.get(WebhookDelivery, delivery_id, with_for_update=True)
        if delivery is None:
            return
        delivery.attempts += 1
        delivery.attempt_log = [*delivery.attempt_log, attempt]
        delivery.status = status
        if status == DeliveryStatus.succeeded:
            delivery.delivered_at = utcnow()
        self.session.flush()


class Searches(_TenantScoped):
    """A tenant's searches (core/service/searches.py) and the jobs that are their trials."""

    row_type = Search
    noun = "search"

    def locked(self, search_id: str) -> Search:
        """The search, locked for update until the transaction ends: trials are recorded and planned one
        transaction at a time, whichever worker or request gets there first."""
        row = self.session.scalar(select(Search).where(Search.id == search_id, Search.tenant_id == self.tenant_id)
                                  .with_for_update().execution_options(populate_existing=True)
                                  ) if "\x00" not in search_id else None
        if row is None:
            raise NotFound(f"search {search_id!r} not found")
        return row

    def trial_jobs(self, search_id: str) -> dict[str, Job]:
        rows = self.session.scalars(select(Job).where(Job.search_id == search_id, Job.tenant_id == self.tenant_id))
        return {job.id: job for job in rows}

    def link(self, job_id: str, search_id: str) -> None:
        self.session.execute(update(Job).where(Job.id == job_id, Job.tenant_id == self.tenant_id)
                             .values(search_id=search_id))


def search_of_job(session: Session, job_id: str) -> tuple[str, str] | None:
    """(tenant id, search id) of a job that is a search's trial; None for any other job."""
    row = session.execute(select(Job.tenant_id, Job.search_id).where(Job.id == job_id)).one_or_none()
    return None if row is None or row[1] is None else (row[0], row[1])


def running_searches(session: Session) -> list[tuple[str, str]]:
    """(tenant id, search id) of every running search, for the sweeper's advance (worker/faults.py)."""
    rows = session.execute(select(Search.tenant_id, Search.id).where(Search.status == "running")).all()
    return [(row[0], row[1]) for row in rows]
