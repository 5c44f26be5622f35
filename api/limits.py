"""Bound every request body before anything buffers it: a lying or missing Content-Length cannot fill the disk."""

from typing import Annotated

from fastapi import Form
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from core.errors import PayloadTooLarge

# A display name given in a form: printable, bounded (a NUL would be refused by PostgreSQL with a 500).
NameField = Annotated[str | None, Form(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]


class BodySizeLimit:
    """A declared length over the cap is answered at once; an undeclared (chunked) or lying one is counted as it
    arrives. Past the cap the app sees a disconnect (it stops reading and spools nothing more), its own answer is
    dropped and the client gets the 413."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_large(declared.decode(errors="replace"))(scope, receive, send)
            return
        body = _CountedBody(receive, send, self.max_bytes)
        try:
            await self.app(scope, body.receive, body.send)
        except Exception:
            if not body.exceeded:
                raise
        if body.exceeded and not body.response_started:
            await self._too_large(f"more than {self.max_bytes:,}")(scope, receive, send)

    def _too_large(self, size: str) -> Response:
        message = f"request body of {size} bytes exceeds the limit of {self.max_bytes:,} bytes (MCS_MAX_UPLOAD_BYTES)"
        return error_response(413, PayloadTooLarge.code, message)


class _CountedBody:
    def __init__(self, receive: Receive, send: Send, max_bytes: int) -> None:
        self._receive, self._send, self.max_bytes = receive, send, max_bytes
        self.seen, self.exceeded, self.response_started = 0, False, False

    async def receive(self) -> Message:
        if self.exceeded:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.max_bytes:
                self.exceeded = True
                return {"type": "http.disconnect"}
        return message

    async def send(self, message: Message) -> None:
        if self.exceeded and not self.response_started:
            return  # the app's answer to the cut-off body (a 400 or a disconnect error) is replaced by our 413
        self.response_started = self.response_started or message["type"] == "http.response.start"
        await self._send(message)
