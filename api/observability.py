"""Per request: a request id (the client's `X-Request-ID` when it is a sane one, else a new one; sent back in the
response), one JSON access-log line, and the HTTP metrics by route template (`core.service.metrics`).

`Observe` is the outermost middleware, so requests that `api.ratelimit.Admission` refuses (401, 429) are counted
and logged too; `BindTenant` sits inside Admission and puts the authenticated tenant into the log context."""

import logging
import re
import time
import uuid
from typing import Any

import fastapi.routing
from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.service import metrics
from core.service.logs import CONTEXT, bind

log = logging.getLogger("mcs.access")
REQUEST_ID_HEADER = "X-Request-ID"
SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # a proxy's or client's id; anything else is replaced
UNMATCHED = "unmatched"  # unknown paths share one label: raw paths would let a scanner grow the series forever
UPLOADS = {("POST", "/v1/models"), ("POST", "/v1/datasets"), ("PUT", "/v1/uploads/{upload_id}/files/{path}")}
DOWNLOADS = {("GET", "/v1/artifacts/{artifact_id}")}


class Observe:
    def __init__(self, app: ASGIApp, routed: FastAPI) -> None:
        self.app = app
        self.app_with_routes = routed
        self.templates: list[tuple[re.Pattern[str], str]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        seen: dict[str, Any] = {"status": 500, "sent": 0, "received": 0}

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen["received"] += len(message.get("body", b""))
            return message

        async def tagging_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            elif message["type"] == "http.response.body":
                seen["sent"] += len(message.get("body", b""))
            await send(message)

        tokens = [(var, var.set(None)) for var in CONTEXT.values()]
        bind(request_id=request_id)
        started = time.perf_counter()
        try:
            await self.app(scope, counting_receive, tagging_send)
        finally:
            self._record(scope, seen, time.perf_counter() - started)
            for var, token in reversed(tokens):
                var.reset(token)

    def _record(self, scope: Scope, seen: dict[str, Any], seconds: float) -> None:
        method, route, status = scope["method"], self._route(scope), str(seen["status"])
        metrics.HTTP_REQUESTS.labels(method, route, status).inc()
        metrics.HTTP_LATENCY.labels(method, route, status).observe(seconds)
        if (method, route) in UPLOADS:
            metrics.UPLOADED.labels(route).inc(seen["received"])
        if (method, route) in DOWNLOADS:
            metrics.DOWNLOADED.labels(route).inc(seen["sent"])
        tenant = scope.get("state", {}).get("tenant")
        log.info("%s %s %s", method, route, status, extra={"fields": {
            "method": method, "route": route, "path": scope["path"], "status": seen["status"],
            "duration_ms": round(seconds * 1000, 2), "bytes_in": seen["received"], "bytes_out": seen["sent"],
            **({"tenant_id": tenant.id} if tenant is not None else {})}})

    def _route(self, scope: Scope) -> str:
        """The matched route's template; a request refused before routing (401, 429), or routed to one of
        Starlette's own routes (/docs, /openapi.json), is matched here against the app's route templates."""
        route = scope.get("route")
        if route is not None:
            return str(getattr(route, "path", UNMATCHED))
        if self.templates is None:
            self.templates = [(compile_path(path)[0], path) for path in _route_paths(self.app_with_routes)]
        return next((path for regex, path in self.templates if regex.match(scope["path"])), UNMATCHED)


class BindTenant:
    """Log lines of an authenticated request name its tenant (set by Admission before the body is read)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tenant = scope.get("state", {}).get("tenant") if scope["type"] == "http" else None
        if tenant is not None:
            bind(tenant_id=tenant.id)
        await self.app(scope, receive, send)


def _route_paths(app: FastAPI) -> list[str]:
    """Every route's template. FastAPI from 0.165 keeps an included router as one entry (its routes are reached
    through `iter_route_contexts`); older versions list each route."""
    contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    routes = contexts(app.routes) if contexts is not None else app.routes
    return [path for route in routes if isinstance(path := getattr(route, "path", None), str)]


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate: str = value.decode("latin-1").strip()
            if SANE_REQUEST_ID.match(candidate):
                return candidate
    return uuid.uuid4().hex
