"""Jobs: submit, list, show, watch, wait, cancel, download."""

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import PrivateAttr

from api.schemas import JobOut, JobStatus, ModelOut, Page
from client.errors import NO_ARTIFACT, WAIT_TIMEOUT, ApiError
from client.progress import Reporter, reporter
from client.recipes import Recipe, recipe_body

if TYPE_CHECKING:
    from client.client import Client
    from client.progress import ProgressArg

TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})
# Where job updates come from, in order: each yields snapshots (the job's JSON) until one is terminal. The event
# stream (`GET /v1/jobs/{id}/events`) goes first and raises `UpdatesUnavailable` where the API does not offer it (or
# it keeps dropping), so watching falls back to polling.
UpdateSource = Callable[["Client", str, float, float | None], Iterator[dict[str, Any]]]


class UpdatesUnavailable(Exception):
    """An update source the API does not offer: the next one is tried."""


def poll(client: "Client", job_id: str, interval: float, deadline: float | None) -> Iterator[dict[str, Any]]:
    """GET the job every `interval` seconds; yield each snapshot that differs from the last, end after a terminal
    one. Past `deadline` (time.monotonic()) it raises `ApiError` `wait_timeout`."""
    last = None
    while True:
        snapshot = client.http.json("GET", f"/v1/jobs/{job_id}")
        if snapshot != last:
            yield snapshot
            last = snapshot
        if snapshot["status"] in TERMINAL:
            return
        if deadline is not None and time.monotonic() >= deadline:
            raise ApiError(WAIT_TIMEOUT, f"job {job_id} is still {snapshot['status']} after the wait's timeout",
                           {"job_id": job_id, "status": snapshot["status"]})
        time.sleep(interval)


MAX_STREAM_FAILURES = 3


def events(client: "Client", job_id: str, interval: float, deadline: float | None) -> Iterator[dict[str, Any]]:
    """Follow the job's Server-Sent Events: each event updates the last snapshot, which is yielded; at `done` the
    job is fetched once more (artifacts, final fields) and yielded last. A dropped connection resumes with
    `Last-Event-ID`; after 3 drops in a row, or from an API without the route, it raises `UpdatesUnavailable`.
    Past `deadline` it raises `ApiError` `wait_timeout`."""
    snapshot = client.http.json("GET", f"/v1/jobs/{job_id}")
    yield snapshot
    last_id, failures = None, 0
    while snapshot["status"] not in TERMINAL:
        _check_deadline(job_id, deadline)
        failures += 1  # until this connection brings an event
        try:
            for event_id, kind, data in _stream(client, job_id, last_id, deadline):
                last_id, failures = event_id or last_id, 0
                if kind == "done":
                    snapshot = client.http.json("GET", f"/v1/jobs/{job_id}")
                else:
                    _apply(snapshot, kind, data)
                yield snapshot
        except httpx.TransportError as exc:
            _check_deadline(job_id, deadline)  # a read that timed out at the deadline
            if failures >= MAX_STREAM_FAILURES:
                raise UpdatesUnavailable(f"the event stream dropped {failures} times: {exc}") from exc
        if failures >= MAX_STREAM_FAILURES:
            raise UpdatesUnavailable(f"the event stream ended {failures} times without an event")
        time.sleep(min(interval * failures, 2.0))


def _stream(client: "Client", job_id: str, last_id: str | None,
            deadline: float | None) -> Iterator[tuple[str | None, str, Any]]:
    """(id, event, data) of one connection, parsed by hand: the few lines of text/event-stream we need do not
    warrant a dependency."""
    headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last_id} if last_id else {})}
    timeout = client.http.timeout
    if deadline is not None:  # a read waiting for the next event gives up at the deadline
        read = max(min(deadline - time.monotonic(), timeout.read or 60.0), 0.01)
        timeout = httpx.Timeout(connect=timeout.connect, read=read, write=timeout.write, pool=timeout.pool)
    with client.http.client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout) as response:
        # No route (an older API), or any error: polling takes over, with its retries and its error reporting
        if response.is_error or not response.headers.get("content-type", "").startswith("text/event-stream"):
            raise UpdatesUnavailable(f"no event stream for job {job_id} ({response.status_code})")
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            _check_deadline(job_id, deadline)
            if line and not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
            elif not line and "data" in fields:
                yield fields.get("id"), fields.get("event", "message"), json.loads(fields["data"])
                fields = {}


def _check_deadline(job_id: str, deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise ApiError(WAIT_TIMEOUT, f"job {job_id} did not end within the wait's timeout", {"job_id": job_id})


def _apply(snapshot: dict[str, Any], kind: str, data: dict[str, Any]) -> None:
    """Fold one event into the job's JSON, as a GET would show it."""
    if kind == "status":
        snapshot["status"] = data["status"]
        snapshot["cancel_requested"] = snapshot["cancel_requested"] or bool(data.get("cancel_requested"))
        snapshot["attempts"] = data.get("attempt", snapshot["attempts"])
    elif kind == "progress":
        snapshot.update(progress=data["progress"], message=data["message"])
    elif kind in ("step.started", "step.finished") and 0 <= data["index"] < len(snapshot["steps"]):
        step = snapshot["steps"][data["index"]]
        if kind == "step.started":
            snapshot["current_step"] = data["index"]
            step.update(status="running", metrics=None)
        else:
            step.update(status="succeeded", metrics=data["metrics"], notes=data["notes"])


UPDATE_SOURCES: tuple[UpdateSource, ...] = (events, poll)


class Job(JobOut):
    """A job as the API returns it (`api.schemas.JobOut`: status, progress, steps, metrics, error, artifacts),
    bound to the client that fetched it. `reload`, `watch` and `wait` refresh its fields in place."""

    _client: Any = PrivateAttr(default=None)

    @classmethod
    def bound(cls, client: "Client", data: dict[str, Any]) -> "Job":
        job = cls.model_validate(data)
        job._client = client
        return job

    @property
    def done(self) -> bool:
        """The job ended: succeeded, failed or cancelled."""
        return self.status in TERMINAL

    def reload(self) -> "Job":
        """Fetch the job again; its fields are updated in place."""
        return self._update(self._client.http.json("GET", f"/v1/jobs/{self.id}"))

    def watch(self, interval: float = 0.5, timeout: float | None = None) -> Iterator["Job"]:
        """Yield this job (updated in place) each time it changes, until it ended (the last one yielded)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for source in UPDATE_SOURCES:
            try:
                for snapshot in source(self._client, self.id, interval, deadline):
                    yield self._update(snapshot)
                return
            except UpdatesUnavailable:
                continue

    def wait(self, progress: "ProgressArg" = True, timeout: float | None = None, interval: float = 0.5) -> "Job":
        """Block until the job ended and return it (it does not raise for a failed or cancelled job: look at
        `status` and `error`). `progress`: True shows a bar on a terminal and lines otherwise (stderr), False
        nothing, or a `client.progress.Reporter`. After `timeout` seconds it raises `ApiError` `wait_timeout`."""
        with reporter(progress) as shown:
            for job in self.watch(interval, timeout):
                shown.job(job)
        return self

    def cancel(self) -> "Job":
        """Cancel: a queued job ends `cancelled` at once; a running one gets `cancel_requested` and ends
        `cancelled` at its next check (`wait()` for it). A job that already ended is an `ApiError` `conflict`."""
        return self._update(self._client.http.json("POST", f"/v1/jobs/{self.id}/cancel"))

    def download(self, dest: str | Path = ".", progress: "ProgressArg" = True) -> Path:
        """Download the job's artifact (a zip of the compressed model folder) into the folder `dest` (created if
        needed), or to `dest` itself when it names a `.zip` file; resumes an interrupted download with `Range` and
        checks the file against its sha256 `ETag`. Returns the file's path. A job without an artifact (not
        succeeded) is an `ApiError` `no_artifact`."""
        if not self.artifacts:
            raise ApiError(NO_ARTIFACT, f"job {self.id} is {self.status} and has no artifact to download",
                           {"job_id": self.id, "status": self.status})
        path: Path = self._client.artifacts.download(self.artifacts[0], dest, progress=progress)
        return path

    def _update(self, data: dict[str, Any]) -> "Job":
        fresh = JobOut.model_validate(data)
        for name in JobOut.model_fields:
            setattr(self, name, getattr(fresh, name))
        return self


class Jobs:
    """`client.jobs`."""

    def __init__(self, client: "Client") -> None:
        self._client = client

    def submit(self, model: str | ModelOut, recipe: Recipe, *, queue: str | None = None,
               idempotency_key: str | None = None) -> Job:
        """Submit a compression job: `model` (an id or a model) and `recipe` (a mapping with `steps`, a list of
        steps, a `JobSpec`, or the path of a YAML/JSON file holding one). `queue`: `cpu` or `gpu` (default: the
        recipe file's, else the server's). The request carries an `Idempotency-Key` (random unless given), so a
        retry after a dropped connection never submits twice."""
        body = recipe_body(recipe)
        body["model_id"] = model if isinstance(model, str) else model.id
        if queue is not None:
            body["queue"] = queue
        headers = {"Idempotency-Key": idempotency_key or f"mcs-client-{uuid.uuid4()}"}
        return Job.bound(self._client, self._client.http.json("POST", "/v1/jobs", json=body, headers=headers))

    def get(self, job_id: str) -> Job:
        return Job.bound(self._client, self._client.http.json("GET", f"/v1/jobs/{job_id}"))

    def list(self, status: JobStatus | str | None = None, *, page: int = 1, page_size: int = 20) -> Page[Job]:
        """One page of the tenant's jobs, newest first, optionally of one status."""
        params: dict[str, Any] = {"page": page, "page_size": page_size}
        if status is not None:
            params["status"] = str(JobStatus(status))
        data = self._client.http.json("GET", "/v1/jobs", params=params)
        return Page[Job](items=[Job.bound(self._client, item) for item in data["items"]],
                         page=data["page"], page_size=data["page_size"], total=data["total"])

    def iter(self, status: JobStatus | str | None = None, page_size: int = 100) -> Iterator[Job]:
        """Every job (of one status), page after page."""
        page = 1
        while True:
            found = self.list(status, page=page, page_size=page_size)
            yield from found.items
            if page * page_size >= found.total or not found.items:
                return
            page += 1

    def cancel(self, job_id: str) -> Job:
        """Cancel a job by id (see `Job.cancel`)."""
        return Job.bound(self._client, self._client.http.json("POST", f"/v1/jobs/{job_id}/cancel"))

    def wait(self, job_id: str, progress: "ProgressArg" = True, timeout: float | None = None) -> Job:
        """Wait for a job by id (see `Job.wait`)."""
        return self.get(job_id).wait(progress, timeout)


__all__ = ["TERMINAL", "UPDATE_SOURCES", "Job", "Jobs", "Reporter", "UpdatesUnavailable", "events", "poll"]
