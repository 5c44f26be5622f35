"""Live job events: announced after the commit that recorded them, read back from the table by SSE streams.

The table (`job_events`, written by `core.service.db.repositories.JobEvents` in the transaction that changes the
job) is the truth: any API process can serve any stream and a reconnecting client resumes after its Last-Event-ID.
Redis pub/sub only wakes the streams waiting on a job (channel `mcs:job-events:<job id>`); without Redis, or while
it is down, a stream reads the table every MCS_SSE_POLL_S instead. New webhook deliveries are handed to the sender
the worker's Celery app registers (`set_delivery_sender`), also only after the commit: the task must find the row.
"""

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from types import TracebackType
from typing import Any

import redis
import redis.asyncio
from sqlalchemy import event
from sqlalchemy.orm import Session

from core.service.db.models import TERMINAL, JobEventType
from core.service.db.repositories import NEW_DELIVERIES, NEW_EVENTS, JobEvents
from core.service.db.session import session_scope
from core.service.settings import Settings, get_settings

log = logging.getLogger(__name__)
CHANNEL = "mcs:job-events:"
_senders: list[Callable[[list[str]], None]] = []


def redis_url(settings: Settings) -> str:
    """MCS_EVENTS_REDIS_URL, else the broker when it is Redis; '' when there is no Redis (streams poll)."""
    if settings.events_redis_url:
        return settings.events_redis_url
    return settings.broker_url if settings.broker_url.startswith(("redis://", "rediss://")) else ""


def set_delivery_sender(send: Callable[[list[str]], None]) -> None:
    """Register how new webhook deliveries (their ids) reach the delivery task: the worker's Celery app does."""
    _senders[:] = [send]


@cache
def _publisher(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)


def publish(job_ids: set[str]) -> None:
    """Wake the streams of these jobs; a failure only costs them a poll interval."""
    url = redis_url(get_settings())
    if not url:
        return
    try:
        for job_id in job_ids:
            _publisher(url).publish(CHANNEL + job_id, "1")
    except redis.RedisError as exc:
        log.warning("could not announce job events on Redis (streams fall back to polling): %s", exc)


@event.listens_for(Session, "after_commit")
def _announce(session: Session) -> None:
    job_ids, deliveries = session.info.pop(NEW_EVENTS, None), session.info.pop(NEW_DELIVERIES, None)
    if job_ids:
        publish(job_ids)
    if deliveries:
        for send in _senders:
            send(deliveries)


@event.listens_for(Session, "after_rollback")
def _forget(session: Session) -> None:
    session.info.pop(NEW_EVENTS, None)
    session.info.pop(NEW_DELIVERIES, None)


@dataclass(frozen=True)
class Event:
    seq: int
    type: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Batch:
    """Events after a point, and the job's end when it had ended before they were read (None while it runs)."""

    events: list[Event]
    ended: Event | None
    complete: bool


def read_after(job_id: str, seq: int, limit: int = 500) -> Batch:
    """The job's events numbered above `seq`. The job's status is read first: if it had ended, its `done` event
    (committed with the status) is among the events, unless the job ended before events were recorded; `ended` is
    then a `done` built from the job's row, without a number."""
    with session_scope() as session:
        events = JobEvents(session)
        state = events.job_state(job_id)
        rows = [Event(row.seq, row.type, row.data) for row in events.after(job_id, seq, limit)]
    ended = None
    if state is not None and state[0] in TERMINAL:
        ended = Event(0, JobEventType.done, {"status": state[0], "metrics": state[1], "error": state[2]})
    return Batch(rows, ended, complete=len(rows) < limit)


class Wakeup:
    """Waits until a job may have new events: a Redis message on its channel, or the timeout. Without Redis (or
    once it failed) it only sleeps, and the caller's reads of the table carry the stream."""

    def __init__(self, job_id: str, settings: Settings) -> None:
        self.channel, self.url = CHANNEL + job_id, redis_url(settings)
        self.client: redis.asyncio.Redis | None = None
        self.pubsub: Any = None

    @property
    def live(self) -> bool:
        return self.pubsub is not None

    async def __aenter__(self) -> "Wakeup":
        if self.url:
            try:
                self.client = redis.asyncio.Redis.from_url(self.url, socket_connect_timeout=1)
                self.pubsub = self.client.pubsub()
                await self.pubsub.subscribe(self.channel)
            except (redis.RedisError, OSError) as exc:
                log.warning("SSE: Redis unavailable, polling the events table: %s", exc)
                await self._close()
        return self

    async def wait(self, timeout: float) -> None:
        if self.pubsub is None:
            await asyncio.sleep(timeout)
            return
        try:
            await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
        except (redis.RedisError, OSError) as exc:
            log.warning("SSE: Redis subscription lost, polling the events table: %s", exc)
            await self._close()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._close()

    async def _close(self) -> None:
        pubsub, client, self.pubsub, self.client = self.pubsub, self.client, None, None
        try:
            if pubsub is not None:
                await pubsub.aclose()
            if client is not None:
                await client.aclose()
        except (redis.RedisError, OSError):
            pass
