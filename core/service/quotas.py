"""Tenant quotas: bytes stored, jobs running at once, jobs waiting.

Limits are the MCS_QUOTA_* settings unless the tenant has its own (`tenant_quotas`, set with `mcs quotas set`);
0 means no limit. What each one does when reached:
- `stored_bytes` (models + datasets + artifacts): an upload that would go over it, a chunked upload that declares
  more than is left, and a job submitted while the tenant is at or over it (its artifact would add more) are refused
  with 403 `quota_exceeded`: only deleting something frees room, so retrying does not help.
- `queued_jobs`: a submission while that many of the tenant's jobs wait is refused with 429 `quota_exceeded` and
  Retry-After: the queue drains by itself.
- `running_jobs`: never refuses a request. A worker does not claim a job whose tenant already runs that many; the
  job stays `queued` and is offered to the workers again after MCS_QUOTA_RECHECK_S. One tenant cannot take every
  worker, and nobody has to resubmit.
Every refusal's `details` name the quota, its `limit` and what is `used`.
"""

from dataclasses import asdict, dataclass

from sqlalchemy.orm import Session

from core.errors import QueueQuotaExceeded, QuotaExceeded
from core.service.db.models import Job, JobStatus
from core.service.db.repositories import Tenants, Usage
from core.service.settings import Settings

QUOTAS = ("stored_bytes", "running_jobs", "queued_jobs")


@dataclass(frozen=True)
class QuotaUse:
    quota: str
    limit: int  # 0: no limit
    used: int


def limits(session: Session, tenant_id: str, settings: Settings) -> dict[str, int]:
    """The tenant's limits: its own where set, the settings' otherwise."""
    own = Tenants(session).quota(tenant_id)
    defaults = {"stored_bytes": settings.quota_stored_bytes, "running_jobs": settings.quota_running_jobs,
                "queued_jobs": settings.quota_queued_jobs}
    return {name: value if (value := getattr(own, name, None)) is not None else default
            for name, default in defaults.items()}


def usage(session: Session, tenant_id: str, settings: Settings) -> list[QuotaUse]:
    """Each quota with its limit and what the tenant uses now."""
    limit, now = limits(session, tenant_id, settings), Usage(session, tenant_id)
    used = {"stored_bytes": now.stored_bytes(), "running_jobs": now.jobs(JobStatus.running),
            "queued_jobs": now.jobs(JobStatus.queued)}
    return [QuotaUse(name, limit[name], used[name]) for name in QUOTAS]


def check_storage(session: Session, tenant_id: str, adding: int, settings: Settings) -> None:
    """Refuse storing `adding` more bytes when the tenant would go over its stored-bytes quota."""
    limit = limits(session, tenant_id, settings)["stored_bytes"]
    if not limit:
        return
    used = Usage(session, tenant_id).stored_bytes()
    if used + adding > limit:
        use = QuotaUse("stored_bytes", limit, used)
        raise QuotaExceeded(f"storing {adding:,} more bytes would exceed the stored-bytes quota: {used:,} of "
                            f"{limit:,} bytes used; delete models, datasets or jobs' artifacts to make room",
                            {**asdict(use), "requested": adding})


def check_submission(session: Session, tenant_id: str, settings: Settings) -> None:
    """A new job needs room to store its artifact and a place in the tenant's queue. The tenant's row stays locked
    until the submission commits, so two concurrent submissions cannot both take the last place."""
    Usage(session, tenant_id).lock_tenant()
    limit = limits(session, tenant_id, settings)
    used_bytes = Usage(session, tenant_id).stored_bytes() if limit["stored_bytes"] else 0
    if limit["stored_bytes"] and used_bytes >= limit["stored_bytes"]:
        raise QuotaExceeded(f"the stored-bytes quota is used up ({used_bytes:,} of {limit['stored_bytes']:,} bytes), "
                            "so a job could not store its artifact; delete models, datasets or jobs' artifacts",
                            asdict(QuotaUse("stored_bytes", limit["stored_bytes"], used_bytes)))
    queued = Usage(session, tenant_id).jobs(JobStatus.queued) if limit["queued_jobs"] else 0
    if limit["queued_jobs"] and queued >= limit["queued_jobs"]:
        raise QueueQuotaExceeded(f"{queued} of this tenant's jobs are already queued (the queued-jobs quota is "
                                 f"{limit['queued_jobs']}); submit again once some have started",
                                 asdict(QuotaUse("queued_jobs", limit["queued_jobs"], queued)))


def running_room(session: Session, job: Job, settings: Settings) -> bool:
    """Whether a queued job's tenant may start one more job now (the worker asks before it claims; anything but a
    queued job is the claim's to judge). Locks the tenant's row until the claim commits, so two workers cannot both
    start the tenant's last allowed job."""
    if job.status != JobStatus.queued:
        return True
    limit = limits(session, job.tenant_id, settings)["running_jobs"]
    if not limit:
        return True
    usage_now = Usage(session, job.tenant_id)
    usage_now.lock_tenant()
    return usage_now.jobs(JobStatus.running, other_than=job.id) < limit
