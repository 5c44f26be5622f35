"""The Celery app: `celery -A worker.celery_app:app worker -Q cpu` (or `mcs worker`).

Reliability settings follow the job model: a message is acknowledged only after the job ended (acks_late), a
worker killed mid-job gives the message back (reject_on_worker_lost; the database caps re-runs), one job at a time
per process (prefetch 1), JSON only (never pickle), and the broker's visibility timeout sits above the longest hard
time limit a job can get so a long job is not redelivered while it is still running.

Every send of a job (submission, the reconciler, the sweeper's requeue) takes its options from `send_options`, so a
job whose estimate raised its time limits keeps them when it is sent again.
"""

import logging
from typing import Any

from celery import Celery
from celery.signals import celeryd_after_setup, setup_logging, worker_ready
from kombu import Queue

from core.service import events
from core.service.db.models import Job
from core.service.logs import configure_logging
from core.service.settings import Settings, get_settings

RUN_JOB_TASK = "worker.tasks.run_job"
DELIVER_WEBHOOK_TASK = "worker.webhooks.deliver_webhook"
# Every worker also takes webhook deliveries (short HTTP calls) from this queue, between jobs: a worker busy with a
# long job reserves nothing else (prefetch 1, acks_late). For prompt deliveries while every worker is busy, run one
# more: `mcs worker --queues webhooks --concurrency 4`.
WEBHOOK_QUEUE = "webhooks"
IMPORT_MODEL_TASK = "worker.imports.import_model"
# Every worker takes model imports (fetching a model from a bucket or a local Hugging Face cache: network and disk,
# no compute) from this queue too; an operator can run dedicated importers: `mcs worker --queues imports`.
IMPORT_QUEUE = "imports"


def create_celery() -> Celery:
    settings = get_settings()
    celery = Celery("mcs", broker=settings.broker_url, include=["worker.tasks", "worker.webhooks", "worker.imports"])
    celery.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.job_soft_time_limit_s,
        task_time_limit=settings.job_hard_time_limit_s,
        broker_transport_options=_transport_options(settings),
        broker_connection_retry_on_startup=True,
        task_queues=[Queue("cpu"), Queue("gpu"), Queue(WEBHOOK_QUEUE), Queue(IMPORT_QUEUE)],
        task_default_queue=settings.default_queue,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return celery


# A publisher (the API submitting a job) gives up on an unreachable broker after about a second, so the client gets
# its 503 at once instead of waiting through kombu's default reconnect backoff (2, 4, 6, ... s).
PUBLISH_FAILOVER = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


def _transport_options(settings: Settings) -> dict[str, float]:
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return {"visibility_timeout": visibility_timeout(settings), **PUBLISH_FAILOVER}
    # kombu's SQLAlchemy transport hands its options to create_engine, which rejects queue options.
    return {}


def visibility_timeout(settings: Settings) -> int:
    """1.1 x the longest hard limit a job can get, so Redis never hands a running job's message to another worker.

    Long is safe: a worker that dies mid-job does not leave its job waiting for Redis. Its heartbeat stops renewing
    the job's lease (MCS_JOB_LEASE_S), and the sweeper of any live worker requeues the job once the lease has expired
    (`worker.faults.sweep`, `JobRuns.sweep_expired`); the reconciler re-sends jobs still queued when a worker starts.
    The message Redis gives back much later finds the job taken or ended and does nothing (`JobRuns.claim`)."""
    return int(1.1 * max(settings.job_hard_time_limit_s, settings.job_max_hard_time_limit_s))


def job_time_limits(estimate: dict[str, Any] | None, settings: Settings) -> tuple[int, int]:
    """(soft, hard) limits of the job with this estimate: those its estimate raised (`core.service.capacity`), else
    the operator's MCS_JOB_SOFT_TIME_LIMIT_S and MCS_JOB_HARD_TIME_LIMIT_S."""
    estimate = estimate or {}
    if estimate.get("hard_time_limit_s", 0) <= settings.job_hard_time_limit_s:
        return settings.job_soft_time_limit_s, settings.job_hard_time_limit_s
    return estimate["soft_time_limit_s"], estimate["hard_time_limit_s"]


def send_options(job: Job, settings: Settings) -> dict[str, Any]:
    """`send_task`'s keyword arguments for `job`: its queue and, only when its estimate raised them, its own time
    limits; the other jobs keep the worker's settings. (Celery's retry re-sends the limits of the message it
    retries.)"""
    soft, hard = job_time_limits(job.estimate, settings)
    if hard == settings.job_hard_time_limit_s:
        return {"queue": job.queue}
    return {"queue": job.queue, "soft_time_limit": soft, "time_limit": hard}


app = create_celery()


def send_deliveries(delivery_ids: list[str]) -> None:
    """Hand new webhook deliveries to the delivery task (after the commit that created them). A broker that refuses
    leaves them `pending` in the delivery log."""
    for delivery_id in delivery_ids:
        try:
            app.send_task(DELIVER_WEBHOOK_TASK, args=[delivery_id], queue=WEBHOOK_QUEUE)
        except Exception as exc:  # broker unreachable: the job's own work must not fail for a webhook
            logging.getLogger(__name__).warning("could not send webhook delivery %s: %s", delivery_id, exc)


events.set_delivery_sender(send_deliveries)


@celeryd_after_setup.connect
def take_side_queues(sender: str, instance: Any, **_: Any) -> None:
    """Whatever queues a worker was started with (`-Q cpu`), it also consumes the webhook and import queues."""
    instance.app.amqp.queues.select_add(WEBHOOK_QUEUE)
    instance.app.amqp.queues.select_add(IMPORT_QUEUE)


@setup_logging.connect
def json_logs(loglevel: int | str | None = None, **_: Any) -> None:
    """A receiver of this signal means Celery configures no logging itself: JSON lines, as the API writes."""
    level = logging.getLevelName(loglevel) if isinstance(loglevel, str) else loglevel
    configure_logging("worker", level or logging.INFO)


@worker_ready.connect
def serve_metrics(**_: Any) -> None:
    """With MCS_WORKER_METRICS_PORT set, the worker's main process serves this host's metrics (those its pool
    processes wrote; `core.service.metrics`) for a Prometheus that scrapes workers on hosts without an API."""
    port = get_settings().worker_metrics_port
    if port:
        from prometheus_client import start_http_server

        from core.service.metrics import worker_registry

        start_http_server(port, registry=worker_registry())
