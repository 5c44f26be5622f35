"""A real API (uvicorn) and a real Celery worker on the suite's PostgreSQL and a Redis broker, started once for the
client and CLI tests, plus the faults they inject: an httpx transport that cuts a request or response halfway, as
a dropped connection would."""

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cli.stack import local_stack
from client import Client, Job, ModelOut
from tests.fixtures.environment import E2E_BROKER_URL
from tests.fixtures.services import create_key
from tests.models import save_model_folder, tiny_bert, tiny_tokenizer

INT8 = {"type": "quantize", "method": "rtn", "bits": 8, "granularity": "per_channel", "symmetric": True}
# Far longer than any test waits (50 epochs of distillation over the default corpus): time to cancel it running
LONG = {"type": "distill", "epochs": 50, "checkpoint_every": 100_000}


@dataclass(frozen=True)
class Live:
    url: str
    key: str

    def raw(self, path: str) -> dict:
        """The API's own JSON for a GET, to compare the client's and the CLI's output with."""
        response = httpx.get(self.url + path, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture(scope="package")
def live(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("client-stack")
    env = {"MCS_BROKER_URL": E2E_BROKER_URL, "MCS_ARTIFACT_DIR": str(root / "artifacts")}
    with local_stack(env, root / "logs") as url:
        yield Live(url, create_key(database_url, "client-tests"))


@pytest.fixture()
def api(live: Live) -> Iterator[Client]:
    """The client, with the test tenant's key."""
    with Client(live.url, live.key) as made:
        yield made


@pytest.fixture(scope="package")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT with a tokenizer (training steps need one)."""
    folder = save_model_folder(tiny_bert(), tmp_path_factory.mktemp("tiny-bert"))
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="package")
def model(live: Live, model_folder: Path) -> ModelOut:
    """The tiny BERT, uploaded once for the tests that only need some model."""
    with Client(live.url, live.key) as made:
        return made.models.upload(model_folder, "tiny-bert", progress=False)


@pytest.fixture(scope="package")
def succeeded_job(live: Live, model: ModelOut) -> Job:
    """An int8 job of the tiny BERT that succeeded."""
    with Client(live.url, live.key) as made:
        job = made.jobs.submit(model, [INT8]).wait(progress=False, timeout=240)
    assert job.status == "succeeded", job.error
    return job


def wait_running(api: Client, job_id: str, timeout_s: float = 120) -> None:
    """Until the worker reported progress on the job (it runs, and reads its cancel flag)."""
    deadline = time.monotonic() + timeout_s
    while (job := api.jobs.get(job_id)).status != "running" or job.progress <= 0:
        assert job.status in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.2)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _CutBody(httpx.SyncByteStream):
    """A byte stream that stops after `after` bytes with `error`, as a dropped connection does."""

    def __init__(self, inner: httpx.SyncByteStream, after: int, error: type[httpx.TransportError]) -> None:
        self.inner, self.after, self.error = inner, after, error

    def __iter__(self) -> Iterator[bytes]:
        left = self.after
        for chunk in self.inner:
            if len(chunk) >= left:
                if left:
                    yield chunk[:left]
                raise self.error("connection cut by the test")
            left -= len(chunk)
            yield chunk

    def close(self) -> None:
        self.inner.close()


class Faults(httpx.BaseTransport):
    """The real transport, recording each request (method, path, Content-Range, Range) and the status it got;
    `cut_put(name, after)` drops the connection of the next PUT of that file after `after` bytes of its body,
    `cut_get(after)` the next artifact download after `after` bytes, `flip_get()` corrupts one byte of the next."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.log: list[tuple[str, str, str | None, str | None, int | None]] = []
        self.put_cuts: dict[str, int] = {}
        self.get_cut: int | None = None
        self.flip = False

    def cut_put(self, name: str, after: int) -> None:
        self.put_cuts[name] = after

    def cut_get(self, after: int) -> None:
        self.get_cut = after

    def flip_get(self) -> None:
        self.flip = True

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        entry = [request.method, request.url.path, request.headers.get("Content-Range"),
                 request.headers.get("Range"), None]
        self.log.append(entry)
        name = request.url.path.rsplit("/", 1)[-1]
        if request.method == "PUT" and name in self.put_cuts:
            request.stream = _CutBody(request.stream, self.put_cuts.pop(name), httpx.WriteError)
        response = self.inner.handle_request(request)
        entry[4] = response.status_code
        if request.method == "GET" and "/v1/artifacts/" in request.url.path and response.status_code < 300:
            if self.get_cut is not None:
                response.stream = _CutBody(response.stream, self.get_cut, httpx.ReadError)
                self.get_cut = None
            elif self.flip:
                response.stream = _Flipped(response.stream)
                self.flip = False
        return response

    def requests(self, method: str, suffix: str) -> list[tuple]:
        return [tuple(entry) for entry in self.log if entry[0] == method and entry[1].endswith(suffix)]

    def close(self) -> None:
        self.inner.close()


class _Flipped(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream) -> None:
        self.inner, self.done = inner, False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            if not self.done and chunk:
                chunk, self.done = bytes([chunk[0] ^ 0xFF]) + chunk[1:], True
            yield chunk

    def close(self) -> None:
        self.inner.close()
