"""`GET /v1/jobs/{id}/events`: the job's events as Server-Sent Events, from the `job_events` table.

Every event carries its number in the job (`id:`); a client that reconnects with `Last-Event-ID` gets every event
after that one, from whichever API process answers. The stream waits on Redis pub/sub for new events (reading the
table at least every MCS_SSE_POLL_S without Redis), sends a comment after MCS_SSE_KEEPALIVE_S of silence so proxies
keep the connection, and ends after the `done` event."""

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import StreamingResponse

from api.deps import V1_DEPENDENCIES, JobsDep, SettingsDep, with_connection
from api.errors import V1_ERRORS, error_responses
from core.service.db.models import JobEventType
from core.service.events import Event, Wakeup, read_after
from core.service.settings import Settings

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=V1_ERRORS, dependencies=V1_DEPENDENCIES)
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
EVENTS_DOC: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}, "description": (
    "`id: <n>` (1, 2, ... per job), `event: status|progress|step.started|step.finished|done`, `data: <JSON>`; "
    "`: keepalive` comments in between; the stream ends after `done`")}}


@router.get("/{job_id}/events", response_class=StreamingResponse, responses={**EVENTS_DOC, **error_responses(404)})
def job_events(
    job_id: str,
    jobs: JobsDep,
    settings: SettingsDep,
    last_event_id: Annotated[int, Header(ge=0, description="resume after this event's `id` (0: from the start)")] = 0,
) -> StreamingResponse:
    """The job's events as Server-Sent Events: `status` (queued, running, requeued, cancel requested),
    `progress` (at most about one a second), `step.started`, `step.finished` (with the step's metrics and notes) and
    `done` (final status, the job's metrics, its error). Without `Last-Event-ID` the stream starts at the job's
    first event."""
    jobs.get(job_id)  # another tenant's job is a 404 like an unknown one
    return StreamingResponse(stream(job_id, last_event_id, settings), media_type="text/event-stream",
                             headers=STREAM_HEADERS)


async def stream(job_id: str, after: int, settings: Settings) -> AsyncIterator[str]:
    yield "retry: 2000\n\n"
    async with Wakeup(job_id, settings) as wakeup:
        quiet_since = time.monotonic()
        while True:
            batch = await with_connection(read_after, job_id, after)
            for event in batch.events:
                yield sse(event)
                after, quiet_since = event.seq, time.monotonic()
                if event.type == JobEventType.done:
                    return
            if batch.ended is not None and batch.complete:  # the job ended before events were recorded
                yield sse(batch.ended)
                return
            if not batch.complete:
                continue
            silence = time.monotonic() - quiet_since
            if silence >= settings.sse_keepalive_s:
                yield ": keepalive\n\n"
                quiet_since = time.monotonic()
                continue
            # With Redis a message wakes the stream; the table is still read once per keepalive period in case a
            # message was lost (the writer's Redis was down).
            limit = settings.sse_keepalive_s - silence
            await wakeup.wait(limit if wakeup.live else min(limit, settings.sse_poll_s))


def sse(event: Event) -> str:
    """One event in the text/event-stream format (an event without a number has no `id:` line)."""
    head = f"id: {event.seq}\n" if event.seq else ""
    return f"{head}event: {event.type}\ndata: {json.dumps(event.data, separators=(',', ':'))}\n\n"
