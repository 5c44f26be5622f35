"""Structured logs: one JSON object per line on stderr, for the API and the worker alike.

Each line carries what is known of its context: `request_id` (the API), `tenant_id`, `job_id` and `step` (the
worker), bound with `bound(...)` in context variables, so code deep in the service logs as before and the line still
says which request or job it belongs to. Secrets never reach a line: messages and tracebacks pass `redact`, which
masks API keys, bearer tokens and the signature and credential of presigned URLs, whatever logged them.

A formatter of our own (json.dumps of a fixed set of fields) rather than a library: it is 40 lines, and the fields,
their names and the redaction are exactly ours.
"""

import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

CONTEXT: dict[str, ContextVar[str | None]] = {
    name: ContextVar(name, default=None) for name in ("request_id", "tenant_id", "job_id", "step")
}
MASK = "[redacted]"
SECRETS = [
    re.compile(r"mcs_[A-Za-z0-9_-]{8,}"),  # API keys (`mcs_` + token_urlsafe); their 12-character prefix too
    re.compile(r"(?i)(bearer\s+)[^\s\"',]+"),  # any bearer token (the metrics token, a mistyped key)
    re.compile(r"(?i)((?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|awsaccesskeyid)=)[^&\s\"']+"),
]
HANDLER_NAME = "mcs-json"


def redact(text: str) -> str:
    """`text` with API keys, bearer tokens and presigned URLs' signatures masked."""
    for pattern in SECRETS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + MASK, text)
    return text


@contextmanager
def bound(**fields: str | None) -> Iterator[None]:
    """Log lines written inside the block carry these context fields (`request_id`, `tenant_id`, `job_id`,
    `step`); the previous values come back after it."""
    tokens = [(CONTEXT[name], CONTEXT[name].set(value)) for name, value in fields.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def bind(**fields: str | None) -> None:
    """Set context fields until the current task or request ends (the ASGI middleware resets them)."""
    for name, value in fields.items():
        CONTEXT[name].set(value)


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", "process", request_id?, tenant_id?, job_id?, step?, ...fields}` on one
    line; `extra={"fields": {...}}` adds fields (the access log's method, route, status, duration)."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
            "process": self.process,
            "pid": record.process,
        }
        line.update({name: value for name, var in CONTEXT.items() if (value := var.get()) is not None})
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(line, default=str, ensure_ascii=False)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is when a line is written (a test runner swaps it for each test)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(process: str, level: int = logging.INFO) -> None:
    """JSON lines on stderr for every logger (idempotent). uvicorn's own handlers go: its error log propagates to
    ours, and its access log is off, since `api.observability` writes one JSON line per request instead (uvicorn's
    would carry the query string)."""
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if h.get_name() != HANDLER_NAME]
    handler = _Stderr()
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(JsonFormatter(process))
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    access = logging.getLogger("uvicorn.access")
    access.handlers, access.propagate, access.disabled = [], False, True
    logging.captureWarnings(True)
    _quiet_progress_bars()


def _quiet_progress_bars() -> None:
    """Progress bars (transformers' "Loading weights") are not log lines: off, so stderr stays one JSON object a
    line. transformers reads the variable when it is imported; if it already is, it is told directly."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
