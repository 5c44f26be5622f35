"""One httpx connection pool per client: the key on every request, errors raised as `ApiError`, and retries of
requests that are safe to send again (a dropped connection, 429 and 503 with their `Retry-After`)."""

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import httpx

from client.errors import CONNECTION_ERROR, ApiError

RETRY_STATUSES = (429, 503)
MAX_RETRY_AFTER_S = 30.0


def _user_agent() -> str:
    try:
        mine = version("model-compression-service")
    except PackageNotFoundError:
        mine = "dev"
    return f"mcs-client/{mine} httpx/{httpx.__version__}"


def backoff(attempt: int) -> float:
    """Seconds before retry number `attempt` (0-based): 0.5, 1, 2, 4, then 8."""
    return float(min(0.5 * 2**attempt, 8.0))


class Http:
    """The client's requests to one API with one key."""

    def __init__(self, url: str, key: str, *, timeout: float, max_retries: int,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.max_retries = max_retries
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self.transport = transport
        self.client = httpx.Client(base_url=url, transport=transport, follow_redirects=False, timeout=self.timeout,
                                   headers={"Authorization": f"Bearer {key}", "User-Agent": _user_agent()})
        self._external: httpx.Client | None = None

    @property
    def external(self) -> httpx.Client:
        """A client without the API key, for URLs the API redirects to (a presigned object-store URL)."""
        if self._external is None:
            self._external = httpx.Client(transport=self.transport, follow_redirects=True, timeout=self.timeout,
                                          headers={"User-Agent": _user_agent()})
        return self._external

    def close(self) -> None:
        self.client.close()
        if self._external is not None:
            self._external.close()

    def request(self, method: str, path: str, *, retry: bool = True, **kwargs: Any) -> httpx.Response:
        """Send a request and return its successful response; an error status raises `ApiError`. With `retry`
        (only for a request that is safe to repeat and whose body can be sent again), a dropped connection, a 429
        and a 503 are retried up to `max_retries` times."""
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries or not retry
            try:
                response = self.client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if last:
                    raise connection_error(method, path, exc) from exc
                time.sleep(backoff(attempt))
                continue
            if response.status_code in RETRY_STATUSES and not last:
                time.sleep(retry_after(response, attempt))
                continue
            if response.is_error:
                raise ApiError.from_response(response)
            return response
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    @contextmanager
    def stream(self, method: str, path: str, headers: Mapping[str, str] | None = None,
               accept: tuple[int, ...] = ()) -> Iterator[httpx.Response]:
        """A streamed response (not retried: the caller resumes). An error status raises `ApiError`, except the
        statuses in `accept`, which the caller handles."""
        with self.client.stream(method, path, headers=headers) as response:
            if response.is_error and response.status_code not in accept:
                raise ApiError.from_response(response)
            yield response


def retry_after(response: httpx.Response, attempt: int) -> float:
    """The response's `Retry-After` in seconds (capped), or the backoff when it has none."""
    value = response.headers.get("Retry-After", "")
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        return backoff(attempt)


def connection_error(method: str, path: str, exc: Exception, details: Any = None) -> ApiError:
    return ApiError(CONNECTION_ERROR, f"{method} {path}: {type(exc).__name__}: {exc or 'connection lost'}", details)
