"""The Celery app: `celery -A worker.celery_app:app worker -Q cpu` (or `mcs worker`).

Reliability settings follow the job model: a message is acknowledged only after the job ended (acks_late), a
worker killed mid-job gives the message back (reject_on_worker_lost; the database caps re-runs), one job at a time
per process (prefetch 1), JSON only (never pickle), and the broker's visibility timeout sits above the hard time
limit so a long job is not redelivered while it is still running.
"""

from celery import Celery
from kombu import Queue

from core.service.settings import Settings, get_settings

RUN_JOB_TASK = "worker.tasks.run_job"


def create_celery() -> Celery:
    settings = get_settings()
    celery = Celery("mcs", broker=settings.broker_url, include=["worker.tasks"])
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
        task_queues=[Queue("cpu"), Queue("gpu")],
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
        return {"visibility_timeout": int(settings.job_hard_time_limit_s * 1.1), **PUBLISH_FAILOVER}
    # kombu's SQLAlchemy transport hands its options to create_engine, which rejects queue options.
    return {}


app = create_celery()
