"""Every query lives here. Tenant-facing repositories filter by tenant in each query, so a route cannot forget it:
another tenant's id is indistinguishable from an unknown one (404)."""

import hashlib
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from core.db.models import TERMINAL, ApiKey, Artifact, Base, Dataset, Job, JobStatus, JobStep, Model, Tenant, utcnow
from core.errors import Conflict, NotFound

Row = TypeVar("Row", bound=Base)


def hash_key(plaintext: str) -> str:
    # API keys are 256-bit random tokens, so a plain SHA-256 is enough (no password-style stretching needed).
    return hashlib.sha256(plaintext.encode()).hexdigest()


class Tenants:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get_or_create(self, name: str) -> Tenant:
        tenant = self.session.scalar(select(Tenant).where(Tenant.name == name))
        if tenant is None:
            tenant = Tenant(name=name)
            self.session.add(tenant)
            self.session.flush()
        return tenant

    def create_api_key(self, tenant: Tenant) -> str:
        """Return a new key in plain text (shown once); only its hash is stored."""
        plaintext = "mcs_" + secrets.token_urlsafe(32)
        self.session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(plaintext), prefix=plaintext[:12]))
        self.session.flush()
        return plaintext

    def for_api_key(self, plaintext: str) -> Tenant | None:
        query = (
            select(Tenant)
            .join(ApiKey, ApiKey.tenant_id == Tenant.id)
            .where(ApiKey.key_hash == hash_key(plaintext), ApiKey.revoked_at.is_(None))
        )
        return self.session.scalar(query)


class _TenantScoped:
    """Base for repositories that only ever see one tenant's rows."""

    row_type: type[Base]
    noun: str

    def __init__(self, session: Session, tenant_id: str) -> None:
        self.session = session
        self.tenant_id = tenant_id

    def get(self, row_id: str) -> Any:
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


class Models(_TenantScoped):
    row_type = Model
    noun = "model"


class Jobs(_TenantScoped):
    row_type = Job
    noun = "job"

    def add_job(self, model_id: str, spec: dict[str, Any], queue: str, idempotency_key: str | None,
                request_hash: str | None) -> Job:
        job = Job(tenant_id=self.tenant_id, model_id=model_id, spec=spec, queue=queue,
                  idempotency_key=idempotency_key, request_hash=request_hash, status=JobStatus.queued)
        job.steps = [
            JobStep(index=i, type=step["type"], config=step, status=JobStatus.queued)
            for i, step in enumerate(spec["steps"])
        ]
        self.session.add(job)
        self.session.flush()
        return job

    def by_idempotency_key(self, key: str) -> Job | None:
        return self.session.scalar(select(Job).where(Job.tenant_id == self.tenant_id, Job.idempotency_key == key))

    def active_for_model(self, model_id: str) -> int:
        query = select(func.count()).select_from(Job).where(
            Job.tenant_id == self.tenant_id, Job.model_id == model_id, Job.status.not_in(TERMINAL)
        )
        return self.session.scalar(query) or 0

    def cancel(self, job: Job) -> Job:
        """Queued jobs end at once; running ones are flagged and stop at the next step boundary."""
        if job.status in TERMINAL:
            raise Conflict(f"job {job.id} already ended with status {job.status!r}; it cannot be cancelled")
        now = utcnow()
        cancelled = self.session.execute(
            update(Job).where(Job.id == job.id, Job.status == JobStatus.queued)
            .values(status=JobStatus.cancelled, finished_at=now, cancel_requested=True)
        ).rowcount
        if not cancelled:
            self.session.execute(update(Job).where(Job.id == job.id).values(cancel_requested=True))
        self.session.flush()
        self.session.refresh(job)
        return job


class Datasets(_TenantScoped):
    row_type = Dataset
    noun = "dataset"


class Artifacts(_TenantScoped):
    row_type = Artifact
    noun = "artifact"


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
        claimed = self.session.execute(
            update(Job)
            .where(Job.id == job_id, claimable, Job.attempts < max_attempts, Job.cancel_requested.is_(False))
            .values(status=JobStatus.running, attempts=Job.attempts + 1, started_at=now,
                    lease_expires_at=now + lease, error=None)
        ).rowcount
        self.session.flush()
        return self.session.get(Job, job_id, populate_existing=True) if claimed else None

    def get(self, job_id: str) -> Job | None:
        return self.session.get(Job, job_id, populate_existing=True)

    def model_of(self, job: Job) -> Model:
        model = self.session.get(Model, job.model_id) if job.model_id else None
        if model is None:
            raise NotFound(f"model {job.model_id!r} of job {job.id} no longer exists")
        return model

    def progress(self, job_id: str, fraction: float, message: str) -> bool:
        """Record progress of a running job; returns whether cancellation was requested."""
        self.session.execute(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.running)
            .values(progress=round(min(max(fraction, 0.0), 1.0), 4), message=message[:500])
        )
        return self.cancel_requested(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

    def step_started(self, job_id: str, index: int) -> None:
        now = utcnow()
        self.session.execute(update(Job).where(Job.id == job_id).values(current_step=index))
        self.session.execute(
            update(JobStep).where(JobStep.job_id == job_id, JobStep.index == index)
            .values(status=JobStatus.running, started_at=now, finished_at=None, metrics=None)
        )

    def step_finished(self, job_id: str, index: int, metrics: dict[str, Any], notes: list[str]) -> None:
        self.session.execute(
            update(JobStep).where(JobStep.job_id == job_id, JobStep.index == index)
            .values(status=JobStatus.succeeded, finished_at=utcnow(), metrics=metrics, notes=notes)
        )

    def succeed(self, job: Job, metrics: dict[str, Any], artifact: dict[str, Any]) -> None:
        """Record the artifact and end the job in one transaction; the artifact key is fixed per job, so a
        retried job replaces its row instead of leaving a second one."""
        existing = self.session.scalar(select(Artifact).where(Artifact.storage_key == artifact["storage_key"]))
        if existing is not None:
            self.session.delete(existing)
            self.session.flush()
        self.session.add(Artifact(tenant_id=job.tenant_id, job_id=job.id, **artifact))
        self._end(job.id, JobStatus.succeeded, metrics=metrics, progress=1.0, message="done")

    def fail(self, job_id: str, error: dict[str, Any], status: JobStatus = JobStatus.failed) -> None:
        self._end(job_id, status, error=error)
        self.session.execute(
            update(JobStep).where(JobStep.job_id == job_id, JobStep.status == JobStatus.running)
            .values(status=status, finished_at=utcnow())
        )

    def release(self, job_id: str) -> None:
        """Put a job back in the queue after an infrastructure fault, for the retried task to claim."""
        self.session.execute(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.running)
            .values(status=JobStatus.queued, lease_expires_at=None)
        )

    def stale_queued(self, older_than: datetime) -> Sequence[Job]:
        query = select(Job).where(Job.status == JobStatus.queued, Job.created_at < older_than)
        return self.session.scalars(query).all()

    def _end(self, job_id: str, status: JobStatus, **values: Any) -> None:
        self.session.execute(
            update(Job).where(Job.id == job_id, Job.status.not_in(TERMINAL))
            .values(status=status, finished_at=utcnow(), lease_expires_at=None, **values)
        )
