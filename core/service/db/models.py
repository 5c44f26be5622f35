"""Database tables (SQLAlchemy 2.0 typed models). Every query against them lives in repositories.py."""

import secrets
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """Random, unguessable ids (never sequential): a tenant cannot probe for another tenant's rows."""
    return f"{prefix}_{secrets.token_hex(12)}"


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class JobEventType(StrEnum):
    """What a job event says (`GET /v1/jobs/{id}/events`, webhooks): the stream ends after `done`."""

    status = "status"
    progress = "progress"
    step_started = "step.started"
    step_finished = "step.finished"
    done = "done"


class DeliveryStatus(StrEnum):
    pending = "pending"
    succeeded = "succeeded"
    failed = "failed"


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ten"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    # What the key may do (core/service/keys.py: read, write, admin); keys made before scopes existed got read+write
    scopes: Mapped[list[str]] = mapped_column(JSON, default=lambda: ["read", "write"])
    expires_at: Mapped[datetime | None]
    name: Mapped[str | None] = mapped_column(String(200))


class TenantQuota(Base):
    """A tenant's own quota limits; a null limit falls back to the MCS_QUOTA_* setting (core/service/quotas.py)."""

    __tablename__ = "tenant_quotas"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    stored_bytes: Mapped[int | None] = mapped_column(BigInteger)
    running_jobs: Mapped[int | None]
    queued_jobs: Mapped[int | None]


class ModelStatus(StrEnum):
    """An upload's model is `ready` at once; an import (`POST /v1/models` with a source) is `importing` until a
    worker has fetched, checked and stored it, then `ready` or `failed` (its `error` says why)."""

    importing = "importing"
    ready = "ready"
    failed = "failed"


class Model(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("mdl"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    architecture: Mapped[str] = mapped_column(String(200))
    model_type: Mapped[str] = mapped_column(String(100))
    num_parameters: Mapped[int] = mapped_column(BigInteger)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    # The repeated blocks' shape (core.compression.estimate.BlockShape) for the pre-flight estimate; null for a
    # model without repeated blocks and for models uploaded before it was recorded.
    block_shape: Mapped[dict[str, int] | None] = mapped_column(JSON, nullable=True)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    status: Mapped[str] = mapped_column(String(16), default=ModelStatus.ready, server_default=ModelStatus.ready)
    # An import's source as resolved (hf://org/name@<commit>, s3://bucket/prefix/); null for an upload.
    source: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    # An import's progress ({"stage", "bytes_done", "bytes_total"}) and, when it failed, its error ({"code",
    # "message", "details"}: the error tree's, core/errors.py).
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("dst"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(16))
    num_samples: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"), index=True)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued, index=True)
    queue: Mapped[str] = mapped_column(String(32))
    spec: Mapped[dict[str, Any]]
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    current_step: Mapped[int | None]
    message: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None]
    error: Mapped[dict[str, Any] | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    estimate: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None]
    lease_expires_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # the search this job is a trial of (core/service/searches.py); null for a job submitted on its own
    search_id: Mapped[str | None] = mapped_column(ForeignKey("searches.id", ondelete="SET NULL"), index=True)

    steps: Mapped[list["JobStep"]] = relationship(
        order_by="JobStep.index", cascade="all, delete-orphan", lazy="selectin"
    )
    artifacts: Mapped[list["Artifact"]] = relationship(order_by="Artifact.created_at", lazy="selectin")


class JobStep(Base):
    __tablename__ = "job_steps"
    __table_args__ = (UniqueConstraint("job_id", "index", name="uq_job_steps_job_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    index: Mapped[int]
    type: Mapped[str] = mapped_column(String(32))
    config: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued)
    metrics: Mapped[dict[str, Any] | None]
    notes: Mapped[list[str] | None] = mapped_column(JSON)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("art"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    storage_key: Mapped[str] = mapped_column(String(500), unique=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class UploadStatus(StrEnum):
    open = "open"
    completing = "completing"


class Upload(Base):
    """A chunked upload in progress: its manifest is fixed at creation; the bytes received so far live in its staging
    folder (their sizes are the progress), never in the database. Deleted once it became a model, failed or expired."""

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("upl"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    manifest: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default=UploadStatus.open)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class Worker(Base):
    """A worker's capacity, upserted at its start and on every sweep (the heartbeat); `id` is its Celery hostname.
    Submission refuses a job that no live worker of its queue can hold."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    queues: Mapped[list[str]] = mapped_column(JSON)
    ram_total_bytes: Mapped[int] = mapped_column(BigInteger)
    ram_available_bytes: Mapped[int] = mapped_column(BigInteger)
    gpu_name: Mapped[str | None] = mapped_column(String(200))
    gpu_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # what jobs can be timed on (core.compression.runtime_rules); null: reported before runtimes were advertised
    runtimes: Mapped[list[str] | None] = mapped_column(JSON)
    heartbeat_at: Mapped[datetime] = mapped_column(index=True)


class JobEvent(Base):
    """One event of a job, numbered 1, 2, ... per job (`seq`, the SSE `id:`) in commit order: the writer holds the
    job's row lock while it takes the next number, so a reader that saw `seq` n never later finds an n-1."""

    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_events_job_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int]
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Webhook(Base):
    """A tenant's webhook: a URL and the event types it wants. `secret` signs every delivery (Standard Webhooks);
    it is shown once, at creation."""

    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("whk"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2000))
    events: Mapped[list[str]] = mapped_column(JSON)
    secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One event for one webhook, with every attempt to deliver it (`attempt_log`). Its id is the `webhook-id`
    header, the same on every retry, so a receiver can drop duplicates."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("msg"))
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = mapped_column(String(40))
    event_seq: Mapped[int]
    event_type: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.pending)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    attempt_log: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    delivered_at: Mapped[datetime | None]


class SearchStatus(StrEnum):
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class Search(Base):
    """A search to a quality budget (core/service/searches.py): its request, every trial (an ordinary job linked by
    `Job.search_id`) with its recipe and measurements, the per-weight sensitivity trial 0 measured, and the best
    recipe that met the constraint. Trials change under this row's lock (SELECT ... FOR UPDATE)."""

    __tablename__ = "searches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("srch"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"), index=True)
    status: Mapped[str] = mapped_column(String(16), default=SearchStatus.running, index=True)
    queue: Mapped[str] = mapped_column(String(32))
    spec: Mapped[dict[str, Any]]
    trials: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    sensitivity: Mapped[dict[str, Any] | None]
    best: Mapped[dict[str, Any] | None]
    message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    finished_at: Mapped[datetime | None]
