"""Jobs: submit, list, show, watch, wait, cancel, download."""

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import PrivateAttr

from api.schemas import JobOut, JobStatus, ModelOut, Page
from client.errors import NO_ARTIFACT, WAIT_TIMEOUT, ApiError
from client.progress import Reporter, reporter
from client.recipes import Recipe, recipe_body

if TYPE_CHECKING:
    from client.client import Client
    from client.progress import ProgressArg

TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})
# Where job updates come from, in order: each yields snapshots (the job's JSON) until one is terminal. Only polling
# exists today; an event stream (`GET /v1/jobs/{id}/events`) goes first in this tuple when the API offers it and
# raises `UpdatesUnavailable` where it does not, so watching falls back to polling.
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


UPDATE_SOURCES: tuple[UpdateSource, ...] = (poll,)


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


__all__ = ["TERMINAL", "UPDATE_SOURCES", "Job", "Jobs", "Reporter", "UpdatesUnavailable", "poll"]
