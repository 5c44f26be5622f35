"""Enqueue jobs by task name, so the API process never imports torch-heavy worker code."""

import logging

from core.service.db.models import Job
from core.service.settings import get_settings
from worker.celery_app import RUN_JOB_TASK, app, send_options

log = logging.getLogger(__name__)


def enqueue(job: Job) -> bool:
    """Send the job id to its queue, with its own time limits when its estimate raised them (`send_options`); False
    when the broker refused it (the submission then withdraws the job and answers 503). Called only after the job
    row is committed: the worker must find it."""
    try:
        app.send_task(RUN_JOB_TASK, args=[job.id], **send_options(job, get_settings()))
        return True
    except Exception as exc:  # broker unreachable
        log.warning("could not enqueue job %s: %s", job.id, exc)
        return False


def broker_reachable() -> bool:
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:
        return False
