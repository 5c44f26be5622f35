"""Prometheus metrics (prometheus-client), in its multiprocess mode.

Every process of a host (uvicorn workers, the Celery worker's pool processes, which are the ones that run jobs)
writes its counters and histograms to files in one folder: PROMETHEUS_MULTIPROC_DIR if set, else
`MCS_VAR_DIR/metrics`. `GET /metrics` on the API adds up every file there, so the step durations a worker observed
show up on the API of the same host; a worker on a host of its own serves the same sums on MCS_WORKER_METRICS_PORT.
Clear the folder when the host (re)starts, not while processes run (prometheus-client's rule).

What lives in the database or the broker (jobs by state and queue, queue depth, worker heartbeats) is read when
Prometheus scrapes (`ServiceCollector`): one grouped query, and LLEN on Redis.

Labels are bounded and never name a tenant, a key or a job: route templates (`/v1/jobs/{job_id}`, never the path),
methods, statuses, queues, step types and methods, outcomes.
"""

import os
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = ["CONTENT_TYPE_LATEST", "DOWNLOADED", "HTTP_LATENCY", "HTTP_REQUESTS", "JOB_DURATION", "STEP_DURATION",
           "UPLOADED", "ServiceCollector", "registry", "render", "worker_registry"]


def _multiprocess_dir() -> Path:
    """PROMETHEUS_MULTIPROC_DIR, or its default under MCS_VAR_DIR (set in the environment, so the processes this one
    starts inherit it)."""
    from core.service.settings import get_settings

    folder = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or get_settings().var_dir.resolve() / "metrics")
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    return folder


MULTIPROC_DIR = _multiprocess_dir()
# prometheus-client chose its value class from the environment when it was first imported, maybe before the folder
# was set: choose again, so the metrics below are written to the folder whoever imported it first
values.ValueClass = values.get_value_class()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
JOB_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600, 12 * 3600, 48 * 3600)
QUEUES = ("cpu", "gpu")
KOMBU_PRIORITY_SEPARATOR, KOMBU_PRIORITY_STEPS = "\x06\x16", (3, 6, 9)  # kombu's Redis lists of queue `q`: q, q␆␖3…

HTTP_REQUESTS = Counter("mcs_http_requests_total", "HTTP requests answered, by route template, method and status",
                        ["method", "route", "status"])
HTTP_LATENCY = Histogram("mcs_http_request_duration_seconds", "Time to answer an HTTP request (to the end of the "
                         "body), by route template, method and status", ["method", "route", "status"],
                         buckets=LATENCY_BUCKETS)
UPLOADED = Counter("mcs_uploaded_bytes_total", "Request body bytes received by the upload routes", ["route"])
DOWNLOADED = Counter("mcs_downloaded_bytes_total", "Response body bytes sent by the artifact download route",
                     ["route"])
JOB_DURATION = Histogram("mcs_job_duration_seconds", "A job's run on a worker, from claim to its end, by queue and "
                         "outcome (succeeded, failed, cancelled, retried)", ["queue", "outcome"],
                         buckets=JOB_BUCKETS)
STEP_DURATION = Histogram("mcs_step_duration_seconds", "One recipe step on a worker, by step type and method",
                          ["step", "method"], buckets=JOB_BUCKETS)


class ServiceCollector(Collector):
    """Gauges read at scrape time: jobs by state and queue, broker queue depth, live workers and the age of each
    queue's latest worker heartbeat. A source that does not answer is reported as `mcs_metrics_source_up 0` and
    its gauges are left out, so a scrape never fails because the database or Redis is down."""

    def __init__(self, broker_url: str, live_after_s: float) -> None:
        self.broker_url = broker_url
        self.live_after_s = live_after_s

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("mcs_metrics_source_up", "Whether a source of the scrape-time gauges answered",
                               labels=["source"])
        for source, families in (("database", self._database), ("broker", self._broker)):
            try:
                collected = list(families())
            except Exception:
                up.add_metric([source], 0)
                continue
            up.add_metric([source], 1)
            yield from collected
        yield up

    def _database(self) -> Iterator[Metric]:
        from core.service.db.models import utcnow
        from core.service.db.session import session_scope

        with session_scope() as session:
            counts, heartbeats = _job_counts(session), _worker_heartbeats(session)
        jobs = GaugeMetricFamily("mcs_jobs", "Jobs by state and queue", labels=["state", "queue"])
        for (state, queue), count in sorted(counts.items()):
            jobs.add_metric([state, queue], count)
        yield jobs
        now, live_after = utcnow(), timedelta(seconds=self.live_after_s)
        live = GaugeMetricFamily("mcs_workers_live", "Workers whose capacity heartbeat is recent (3 sweep "
                                 "intervals), by queue", labels=["queue"])
        age = GaugeMetricFamily("mcs_worker_heartbeat_age_seconds", "Seconds since the latest heartbeat of any "
                                "worker of the queue", labels=["queue"])
        for queue, seen in sorted(heartbeats.items()):
            live.add_metric([queue], sum(now - at <= live_after for at in seen))
            age.add_metric([queue], max((now - max(seen)).total_seconds(), 0.0))
        yield live
        yield age

    def _broker(self) -> Iterator[Metric]:
        if not self.broker_url.startswith(("redis://", "rediss://")):
            return  # the embedded SQLite broker: `mcs_jobs{state="queued"}` is the queue
        import redis

        client = redis.Redis.from_url(self.broker_url, socket_timeout=1, socket_connect_timeout=1)
        depth = GaugeMetricFamily("mcs_queue_depth", "Messages waiting in the broker's queue", labels=["queue"])
        try:
            for queue in QUEUES:
                names = [queue, *(f"{queue}{KOMBU_PRIORITY_SEPARATOR}{step}" for step in KOMBU_PRIORITY_STEPS)]
                depth.add_metric([queue], sum(int(client.llen(name)) for name in names))
        finally:
            client.close()
        yield depth


def _job_counts(session: "Session") -> dict[tuple[str, str], int]:
    """Jobs by (state, queue); every state and known queue is present, 0 when empty, so a series does not vanish."""
    from sqlalchemy import func, select

    from core.service.db.models import Job, JobStatus

    counts = {(str(state), queue): 0 for state in JobStatus for queue in QUEUES}
    for state, queue, count in session.execute(select(Job.status, Job.queue, func.count()).group_by(
            Job.status, Job.queue)):
        counts[(state, queue)] = count
    return counts


def _worker_heartbeats(session: "Session") -> dict[str, list[datetime]]:
    """Every worker's last heartbeat, by each queue it consumes (a deployment has few workers)."""
    from sqlalchemy import select

    from core.service.db.models import Worker

    seen: dict[str, list[datetime]] = {}
    for queues, at in session.execute(select(Worker.queues, Worker.heartbeat_at)):
        for queue in queues:  # SQLite gives naive datetimes back; they are UTC
            seen.setdefault(queue, []).append(at if at.tzinfo else at.replace(tzinfo=UTC))
    return seen


def registry(broker_url: str, live_after_s: float) -> CollectorRegistry:
    """What `/metrics` serves: every process's counters and histograms, plus the scrape-time gauges."""
    built = CollectorRegistry()
    MultiProcessCollector(built, path=str(MULTIPROC_DIR))
    built.register(ServiceCollector(broker_url, live_after_s))
    return built


def worker_registry() -> CollectorRegistry:
    """What a worker's own metrics port serves: this host's counters and histograms."""
    built = CollectorRegistry()
    MultiProcessCollector(built, path=str(MULTIPROC_DIR))
    return built


def render(collected: CollectorRegistry) -> bytes:
    return generate_latest(collected)
