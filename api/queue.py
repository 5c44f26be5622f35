"""Enqueue jobs by task name, so the API process never imports torch-heavy worker code."""

import logging

from core.service.db.models import Job
from worker.celery_app import RUN_JOB_TASK, app

log = logging.getLogger(__name__)


def enqueue(job: Job) -> bool:
    """Send the job id to its queue; False when the broker refused it (the submission then withdraws the job and
    answers 503). Called only after the job row is committed: the worker must find it. The job's time limits come
    from its estimate (`core.service.capacity.time_limits`) when that raised them."""
    try:
        app.send_task(RUN_JOB_TASK, args=[job.id], queue=job.queue, **time_limits(job))
        return True
    except Exception as exc:  # broker unreachable
        log.warning("could not enqueue job %s: %s", job.id, exc)
        return False


def time_limits(job: Job) -> dict[str, int]:
    """Per-message limits only for a job whose estimate raised them: the others keep the worker's own settings."""
    estimate = job.estimate or {}
    if estimate.get("hard_time_limit_s", 0) <= (app.conf.task_time_limit or 0):
        return {}
    return {"soft_time_limit": estimate["soft_time_limit_s"], "time_limit": estimate["hard_time_limit_s"]}


def broker_reachable() -> bool:
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:
        return False
