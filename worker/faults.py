"""What the worker does when things break: name the failure, keep a live job's lease, sweep what dead ones left.

- `failure_for(exc)` turns an exception (and its causes: steps wrap what they raise) into the job's terminal error,
  or None for an infrastructure fault that the task retries (database, broker, transient storage errors).
- `Heartbeat` renews the lease of the job being run, so a lease that expires means its worker is gone.
- `Sweeper` runs in each worker's main process: it requeues (or ends `worker_lost`) running jobs whose lease
  expired, removes upload and job scratch left by a killed API or worker, and reports the worker's capacity.
"""

import logging
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, Literal

import torch
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

from core.errors import (
    InternalError,
    JobCancelled,
    JobTimeout,
    OutOfMemory,
    ServiceError,
    StorageFailed,
    Unavailable,
)
from core.service.db.models import Job, JobStatus
from core.service.db.repositories import JobRuns
from core.service.db.session import session_scope
from core.service.s3_staging import remove_orphaned_staging
from core.service.scratch import remove_stale_scratch
from core.service.searches import advance_running_searches
from core.service.settings import Settings
from core.service.storage import get_store
from core.service.storage.s3 import S3ArtifactStore
from core.service.uploads import DISK_FULL
from worker.capacity import report_capacity
from worker.celery_app import job_time_limits, send_options

log = logging.getLogger(__name__)
INFRASTRUCTURE_FAULTS = (Unavailable, OperationalError, OSError)
Failure = tuple[dict[str, Any], JobStatus]


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from (a failing step wraps its cause in StepFailed)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def failure_for(exc: BaseException, settings: Settings, estimate: dict[str, Any] | None) -> Failure | None:
    """The job's terminal error for `exc`, or None when it is an infrastructure fault worth retrying; the job's
    `estimate` names the time limit it ran past."""
    chain = list(causes(exc))
    if any(isinstance(e, SoftTimeLimitExceeded) for e in chain):
        return timeout_error("soft", estimate, settings), JobStatus.failed
    if disk := next((e for e in chain if _disk_full(e)), None):
        return StorageFailed(f"storage is full or over quota: {disk}").as_dict(), JobStatus.failed
    if any(_out_of_memory(e) for e in chain):
        return OutOfMemory(f"the job ran out of memory: {exc}; try a smaller model, batch or a worker with more "
                           "memory").as_dict(), JobStatus.failed
    if isinstance(exc, JobCancelled):
        return exc.as_dict(), JobStatus.cancelled
    if isinstance(exc, INFRASTRUCTURE_FAULTS):
        return None
    if isinstance(exc, ServiceError):
        return exc.as_dict(), JobStatus.failed
    return InternalError(f"{type(exc).__name__}: {exc}").as_dict(), JobStatus.failed


def retries_exhausted(exc: BaseException) -> dict[str, Any]:
    """The error of a job whose infrastructure fault outlasted every retry."""
    if isinstance(exc, OSError) and not isinstance(exc, OperationalError):
        return StorageFailed(f"storage kept failing: {exc}").as_dict()
    return Unavailable(f"the database or broker stayed unreachable: {exc}").as_dict()


def timeout_error(kind: Literal["soft", "hard"], estimate: dict[str, Any] | None,
                  settings: Settings) -> dict[str, Any]:
    """The error naming the limit the job ran under (its own when its estimate raised it) and where it came from."""
    soft, hard = job_time_limits(estimate, settings)
    source = "MCS_JOB_SOFT_TIME_LIMIT_S / MCS_JOB_HARD_TIME_LIMIT_S"
    if hard > settings.job_hard_time_limit_s:
        source = "raised by the estimate, up to MCS_JOB_MAX_HARD_TIME_LIMIT_S"
    if estimate and "seconds" in estimate:
        source = f"estimated {estimate['seconds']:.0f} s; {source}"
    limit = soft if kind == "soft" else hard
    return JobTimeout(f"the job ran past its {kind} time limit of {limit} s ({source})").as_dict()


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL
    # libraries with native writers (safetensors) report the OS error only in their message
    return any(f"(os error {code})" in str(exc) for code in DISK_FULL)


def _out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return True
    # torch's CPU allocator reports a failed allocation as a plain RuntimeError
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


class Heartbeat:
    """Renew a running job's lease every third of its length, from a thread, while the job runs."""

    def __init__(self, job_id: str, lease_s: int) -> None:
        self.job_id, self.lease = job_id, timedelta(seconds=lease_s)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopped.set()
        self.thread.join()

    def _beat(self) -> None:
        while not self.stopped.wait(self.lease.total_seconds() / 3):
            try:
                with session_scope() as session:
                    JobRuns(session).renew_lease(self.job_id, self.lease)
            except Exception as exc:  # the database is down: the run itself will notice and retry
                log.warning("job %s: could not renew its lease: %s", self.job_id, exc)


class Sweeper:
    """A daemon thread in the worker's main process calling `sweep` every MCS_SWEEP_INTERVAL_S, and reporting the
    worker's capacity as often (its heartbeat: a worker silent for 3 intervals no longer counts at submission)."""

    def __init__(self, celery: Celery, task_name: str, settings: Settings) -> None:
        self.celery, self.task_name, self.settings = celery, task_name, settings
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="mcs-sweeper", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)

    def _enqueue(self, job: Job) -> bool:
        """Send a search's next trial (core.service.searches), as the API's submission does."""
        try:
            self.celery.send_task(self.task_name, args=[job.id], **send_options(job, self.settings))
            return True
        except Exception as exc:  # broker unreachable: the job is withdrawn, the trial recorded as refused
            log.warning("could not enqueue job %s: %s", job.id, exc)
            return False

    def _loop(self) -> None:
        while not self.stopped.wait(self.settings.sweep_interval_s):
            report_capacity()
            try:
                sweep(self.celery, self.task_name, self.settings)
                advance_running_searches(self._enqueue, self.settings)
            except Exception as exc:  # the database is down: try again next round
                log.warning("sweep skipped: %s", exc)


def sweep(celery: Celery, task_name: str, settings: Settings) -> tuple[int, int]:
    """One round: requeue or end jobs with expired leases, end queued jobs with no attempt left, remove stale
    scratch. Returns (requeued, removed)."""
    with session_scope() as session:
        runs = JobRuns(session)
        requeued = [(job.id, send_options(job, settings)) for job in runs.sweep_expired(settings.job_max_attempts)]
        runs.end_exhausted_queued(settings.job_max_attempts)
        running = runs.running_ids()
    for job_id, options in requeued:  # after the commit, like the API: the delivery must find the row queued
        celery.send_task(task_name, args=[job_id], **options)
        log.warning("job %s lost its worker; requeued", job_id)
    _sweep_upload_staging(settings)
    return len(requeued), remove_stale_scratch(settings, running)


def _sweep_upload_staging(settings: Settings) -> None:
    """In the bucket: the staging of chunked uploads whose row is gone (on local disk: remove_stale_scratch)."""
    store = get_store()
    if isinstance(store, S3ArtifactStore):
        with session_scope() as session:
            removed = remove_orphaned_staging(session, store, settings)
        if removed:
            log.warning("removed the staging of %d chunked upload(s) that had no row", removed)
