"""The client's one exception type: the API's error body (`{"error": {"code", "message", "details"}}`), or the same
three fields for what failed on this side (the connection, a checksum, a recipe file)."""

from typing import Any

import httpx
from pydantic import ValidationError

from api.schemas import ErrorOut

# Codes the client raises itself (status None); every other code is the API's own.
CONNECTION_ERROR = "connection_error"  # the API could not be reached, or the connection kept dropping
CHECKSUM_MISMATCH = "checksum_mismatch"  # a download did not match its sha256 ETag (also an API code for uploads)
MISSING_API_KEY = "missing_api_key"  # no key given, in MCS_API_KEY or in the config file
INVALID_RECIPE = "invalid_recipe"  # a recipe file that cannot be read or is not a mapping of steps
NO_ARTIFACT = "no_artifact"  # download of a job that has no artifact (yet)
WAIT_TIMEOUT = "wait_timeout"  # Job.wait(timeout=...) ran out before the job ended
UPLOAD_INTERRUPTED = "upload_interrupted"  # a chunked upload gave up; `details.upload_id` resumes it


class ApiError(Exception):
    """An error of the model compression service or of the way to it.

    `code` is stable and machine-readable (the API's, e.g. `not_found`, `validation_error`, `rate_limited`, or one
    of the client's own listed in `client.errors`); `message` is for a human; `details` is the structured context
    the API sent (the invalid fields, the bytes received so far); `status` is the HTTP status, None when no response
    came (or the failure is local).
    """

    def __init__(self, code: str, message: str, details: Any = None, status: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.details, self.status = code, message, details, status

    def __str__(self) -> str:
        where = f"HTTP {self.status}, " if self.status is not None else ""
        return f"{self.message} ({where}{self.code})"

    def __repr__(self) -> str:
        return f"ApiError(code={self.code!r}, message={self.message!r}, details={self.details!r}, status={self.status})"

    def to_json(self) -> dict[str, Any]:
        """The API's error body for this error."""
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}

    @classmethod
    def from_response(cls, response: httpx.Response) -> "ApiError":
        """The error a response carries: its error body, or `http_<status>` and the text when it has none (a proxy
        in between)."""
        try:
            body = ErrorOut.model_validate_json(response.read()).error
        except (ValidationError, ValueError):
            text = response.text.strip()[:500] or response.reason_phrase
            return cls(f"http_{response.status_code}", text, None, response.status_code)
        return cls(body.code, body.message, body.details, response.status_code)
