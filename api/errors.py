"""One handler maps the core error hierarchy (and request validation) to `{"error": {code, message, details}}`."""

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.schemas import ErrorOut
from core import errors

log = logging.getLogger(__name__)

STATUS: dict[type[errors.ServiceError], int] = {
    errors.InvalidSpec: 422,
    errors.InvalidRequest: 400,
    errors.UnsupportedModel: 422,
    errors.ChecksumMismatch: 422,
    errors.UnsafeInput: 400,
    errors.PayloadTooLarge: 413,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.QueueQuotaExceeded: 429,
    errors.NotFound: 404,
    errors.RequestTimeout: 408,
    errors.Conflict: 409,
    errors.PreconditionFailed: 412,
    errors.RangeNotSatisfiable: 416,
    errors.RateLimited: 429,
    errors.StorageFailed: 507,
    errors.Unavailable: 503,
}


DESCRIPTIONS = {
    400: "Malformed or unsafe input: an unreadable body or multipart form, a refused upload, two Authorization "
         "headers",
    401: "Missing, unknown, expired or revoked API key",
    403: "The key lacks the scope the request needs (`insufficient_scope`), or a tenant quota is used up "
         "(`quota_exceeded`; `details`: `quota`, `limit`, `used`)",
    404: "No such id for this tenant (another tenant's id looks the same)",
    408: "The request body stopped arriving for MCS_BODY_TIMEOUT_S",
    409: "Conflicts with the current state (a finished job, an active job, a reused Idempotency-Key, an upload "
         "offset that is not the bytes received so far)",
    412: "`If-Match` does not match the current ETag",
    413: "Request body or upload over its limit (MCS_MAX_UPLOAD_BYTES, MCS_MAX_JSON_BYTES, a chunked upload's "
         "declared sizes and MCS_MAX_MODEL_UPLOAD_BYTES)",
    416: "Malformed or unsatisfiable Range",
    422: "Invalid request: every bad field is listed in `details`",
    429: "Rate limit of this API key (or, without a valid key, of this client address) exceeded, or the tenant's "
         "queued-jobs quota is full (`quota_exceeded`); see Retry-After",
    500: "Unexpected server error, logged; code `internal_error`",
    503: "Database or job queue (broker) unreachable; see Retry-After",
    507: "The service is out of storage space",
}
QUEUE_RETRY_AFTER_S = 30  # a queued job usually starts within a job's length; nothing tells us more precisely
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "string"}}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer, all with the one error body."""
    return {status: {"model": ErrorOut, "description": DESCRIPTIONS[status],
                     **({"headers": RETRY_AFTER} if status == 429 else {})} for status in statuses}


# Every /v1 route needs one key with the right scope, validates its input, is rate limited and reads the database.
V1_ERRORS = error_responses(400, 401, 403, 422, 429, 500, 503)


def error_response(status: int, code: str, message: str, details: object = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": details}}
    return JSONResponse(body, status_code=status, headers=headers)


def status_for(exc: errors.ServiceError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def service_response(exc: errors.ServiceError) -> JSONResponse:
    """The error body and status of a service error, with the headers its status calls for."""
    return error_response(status_for(exc), exc.code, exc.message, exc.details, _headers_for(exc))


def _headers_for(exc: errors.ServiceError) -> dict[str, str] | None:
    if isinstance(exc, errors.Unauthorized):
        return {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, errors.InsufficientScope) and isinstance(exc.details, dict):  # RFC 6750, section 3
        return {"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{exc.details["required_scope"]}"'}
    if isinstance(exc, errors.QueueQuotaExceeded):
        return {"Retry-After": str(QUEUE_RETRY_AFTER_S)}
    if isinstance(exc, errors.RangeNotSatisfiable) and isinstance(exc.details, dict):
        return {"Content-Range": f"bytes */{exc.details['size']}"}
    if isinstance(exc, errors.RateLimited) and isinstance(exc.details, dict):
        return {"Retry-After": str(exc.details["retry_after_s"])}
    if isinstance(exc, errors.Unavailable):
        return {"Retry-After": "5"}
    return None


async def service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.ServiceError)
    return service_response(exc)


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [
        {"field": ".".join(str(p) for p in err["loc"]), "message": err["msg"], "type": err["type"]}
        for err in exc.errors()
    ]
    summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:10])
    return error_response(422, "validation_error", f"invalid request: {summary}", problems)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, f"http_{exc.status_code}", str(exc.detail), None, exc.headers)


async def database_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable: %s", exc)
    return error_response(503, "unavailable", "the database is unreachable; try again shortly",
                          headers={"Retry-After": "5"})


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """Anything else, in the one error body (Starlette still logs the traceback and re-raises after this answer)."""
    return error_response(500, "internal_error", "unexpected server error; it has been logged")


def install(app: FastAPI) -> None:
    app.add_exception_handler(Exception, internal_error)
    app.add_exception_handler(errors.ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(OperationalError, database_down)
