"""Bound every request body before anything buffers it, in size and in time: a lying or missing Content-Length
cannot fill the disk, a body that stops arriving cannot hold a connection for ever."""

import re
from typing import Annotated, NamedTuple

import anyio
from fastapi import Form
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import service_response
from core.errors import PayloadTooLarge, RequestTimeout

# A display name given in a form: printable, bounded (a NUL would be refused by PostgreSQL with a 500).
NameField = Annotated[str | None, Form(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]


DISCONNECT: Message = {"type": "http.disconnect"}
# The raw body of a chunked upload's file (PUT /v1/uploads/{id}/files/{name}): streamed to disk by its route, which
# also holds it to the file's declared size.
STREAMED_FILE = re.compile(r"^/v1/uploads/[^/]+/files/[^/]+$")


class Cap(NamedTuple):
    """A body size limit and the setting that sets it (named in the 413)."""

    max_bytes: int
    setting: str


class BodyLimits:
    """A multipart upload may be as large as MCS_MAX_UPLOAD_BYTES, a file of a chunked upload (`PUT` to
    `STREAMED_FILE`) as MCS_MAX_UPLOAD_FILE_BYTES, any other body (JSON) as MCS_MAX_JSON_BYTES. A
    declared length over the cap is answered at once; an undeclared (chunked) or lying one is counted as it
    arrives. A body whose next piece takes longer than MCS_BODY_TIMEOUT_S is a 408. Past a limit the app sees a
    disconnect (it stops reading and spools nothing more), its own answer is dropped and the client gets ours."""

    def __init__(self, app: ASGIApp, upload: Cap, json: Cap, timeout_s: float, streamed: Cap | None = None) -> None:
        self.app = app
        self.upload, self.json, self.timeout_s = upload, json, timeout_s
        self.streamed = streamed or json

    def _cap(self, scope: Scope, headers: dict[bytes, bytes]) -> Cap:
        if scope["method"] == "PUT" and STREAMED_FILE.match(scope["path"]):
            return self.streamed
        return self.upload if headers.get(b"content-type", b"").lower().startswith(b"multipart/") else self.json

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        cap = self._cap(scope, headers)
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cap.max_bytes):
            await _closing(_too_large(cap, declared.decode(errors="replace")))(scope, receive, send)
            return
        body = _GuardedBody(receive, send, cap, self.timeout_s)
        try:
            await self.app(scope, body.receive, body.send)
        except Exception:
            if body.refusal is None:
                raise
        if body.refusal is not None and not body.response_started:
            await _closing(body.refusal)(scope, receive, send)


def _too_large(cap: Cap, size: str) -> Response:
    message = f"request body of {size} bytes exceeds the limit of {cap.max_bytes:,} bytes ({cap.setting})"
    return service_response(PayloadTooLarge(message))


def _closing(response: Response) -> Response:
    """The rest of a refused body is never read: the server closes the connection instead of draining it."""
    response.headers["Connection"] = "close"
    return response


class _GuardedBody:
    def __init__(self, receive: Receive, send: Send, cap: Cap, timeout_s: float) -> None:
        self._receive, self._send, self.cap, self.timeout_s = receive, send, cap, timeout_s
        self.seen, self.complete, self.response_started = 0, False, False
        self.refusal: Response | None = None

    async def receive(self) -> Message:
        if self.refusal is not None:
            return DISCONNECT
        if self.complete:  # the body is in: what follows is a wait for the client to leave, with no time limit
            return await self._receive()
        with anyio.move_on_after(self.timeout_s):
            return self._count(await self._receive())
        timeout = RequestTimeout(f"the request body stopped arriving for {self.timeout_s:g} s (MCS_BODY_TIMEOUT_S)")
        return self._refuse(service_response(timeout))

    def _count(self, message: Message) -> Message:
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
            if self.seen > self.cap.max_bytes:
                return self._refuse(_too_large(self.cap, f"more than {self.cap.max_bytes:,}"))
        return message

    def _refuse(self, response: Response) -> Message:
        self.refusal = response
        return DISCONNECT

    async def send(self, message: Message) -> None:
        if self.refusal is not None and not self.response_started:
            return  # the app's answer to the cut-off body (a 400 or a disconnect error) is replaced by ours
        self.response_started = self.response_started or message["type"] == "http.response.start"
        await self._send(message)
