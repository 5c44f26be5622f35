"""`Client`: the model compression service over HTTP."""

from pathlib import Path
from types import TracebackType

import httpx

from client.artifacts import Artifacts
from client.config import resolve
from client.http import Http
from client.jobs import Jobs
from client.presets import Presets
from client.searches import Searches
from client.uploads import Datasets, Models


class Client:
    """A client of one service with one API key.

    `url` and `key` default to `MCS_API_URL` / `MCS_API_KEY`, then to the config file (`client.config`); the URL
    last to `http://127.0.0.1:8000`. `timeout` is per network operation (connect, a read, a write), not per
    request; requests that are safe to repeat are retried `max_retries` times after a dropped connection, a 429 or a
    503. `transport` replaces httpx's (tests, proxies).

        with Client() as mcs:
            model = mcs.models.upload("SmolLM2-135M/")
            job = mcs.jobs.submit(model, "recipe.yaml").wait()
            job.download("out/")

    Its parts: `models`, `datasets`, `jobs`, `artifacts`. Every error is a `client.ApiError`.
    """

    def __init__(self, url: str | None = None, key: str | None = None, *, timeout: float = 60.0,
                 max_retries: int = 3, transport: httpx.BaseTransport | None = None,
                 config_file: Path | None = None) -> None:
        settings = resolve(url, key, config_file)
        self.url = settings.url
        self.http = Http(settings.url, settings.key, timeout=timeout, max_retries=max_retries, transport=transport)
        self.models = Models(self)
        self.datasets = Datasets(self)
        self.jobs = Jobs(self)
        self.artifacts = Artifacts(self)
        self.presets = Presets(self)
        self.searches = Searches(self)

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"
