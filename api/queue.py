"""Enqueue jobs by task name, so the API process never imports torch-heavy worker code."""

import logging
from dataclasses import asdict
from typing import Any

from core.service.db.models import Job, Model
from core.service.imports import S3Credentials
from core.service.settings import get_settings
from worker.celery_app import IMPORT_MODEL_TASK, IMPORT_QUEUE, RUN_JOB_TASK, app, send_options

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


def enqueue_import(model: Model, credentials: S3Credentials | None) -> bool:
    """Send the import to the import queue; the request's S3 keys travel in the message only, and its kwargsrepr
    (what Celery logs and shows in `inspect`) hides them. False when the broker refused it."""
    kwargs: dict[str, Any] = {"s3": asdict(credentials)} if credentials else {}
    try:
        app.send_task(IMPORT_MODEL_TASK, args=[model.id, model.tenant_id], kwargs=kwargs,
                      kwargsrepr="{'s3': '<hidden>'}" if credentials else None, queue=IMPORT_QUEUE)
        return True
    except Exception as exc:  # broker unreachable
        log.warning("could not enqueue the import of model %s: %s", model.id, exc)
        return False


def broker_reachable() -> bool:
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:
        return False
