"""One error hierarchy for the whole service.

`core` raises these; the API maps each class to an HTTP status in one handler and the worker decides
from `retryable` whether a failure is the user's (fail the job) or the infrastructure's (retry).
"""

from typing import Any


class ServiceError(Exception):
    """Base class: a stable machine-readable `code`, a human message naming the problem, optional details."""

    code = "error"
    retryable = False

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class InvalidSpec(ServiceError):
    code = "invalid_spec"


class InvalidRequest(ServiceError):
    code = "invalid_request"


class UnsupportedModel(ServiceError):
    code = "unsupported_model"


class UnsafeInput(ServiceError):
    code = "unsafe_input"


class PayloadTooLarge(ServiceError):
    code = "payload_too_large"


class Unauthorized(ServiceError):
    code = "unauthorized"


class Forbidden(ServiceError):
    """A valid key that may not do this."""

    code = "forbidden"


class InsufficientScope(Forbidden):
    """The key lacks the scope the request needs; `details` name it (`required_scope`) and the key's `scopes`."""

    code = "insufficient_scope"


class QuotaExceeded(Forbidden):
    """A tenant quota would be exceeded; `details`: `quota`, `limit` and `used` (core/service/quotas.py)."""

    code = "quota_exceeded"


class QueueQuotaExceeded(QuotaExceeded):
    """Too many of the tenant's jobs are waiting: a 429, since the queue drains by itself."""


class NotFound(ServiceError):
    code = "not_found"


class Conflict(ServiceError):
    code = "conflict"


class RangeNotSatisfiable(ServiceError):
    code = "range_not_satisfiable"


class RateLimited(ServiceError):
    """Too many requests for one API key; `details["retry_after_s"]` says when to come back."""

    code = "rate_limited"


class StepFailed(ServiceError):
    code = "step_failed"


class JobCancelled(ServiceError):
    """A cancel was accepted: the job ends `cancelled` (the one failure that is not the status `failed`)."""

    code = "cancelled"


class WorkerLost(ServiceError):
    """The worker running the job stopped (killed, out of memory, host lost) as often as MCS_JOB_MAX_ATTEMPTS."""

    code = "worker_lost"


class JobTimeout(ServiceError):
    """The job ran past MCS_JOB_SOFT_TIME_LIMIT_S or MCS_JOB_HARD_TIME_LIMIT_S."""

    code = "timeout"


class OutOfMemory(ServiceError):
    """A step ran out of host or device memory; not retried (it would again)."""

    code = "out_of_memory"


class InternalError(ServiceError):
    """An unexpected exception: a bug of ours, logged with its traceback."""

    code = "internal_error"


class StorageFailed(ServiceError):
    """Writing to scratch or artifact storage failed for good (disk full, quota, file too large)."""

    code = "storage"


class Unavailable(ServiceError):
    """Database, broker or storage unreachable: the request or task may succeed later."""

    code = "unavailable"
    retryable = True


class InputUnreadable(UnsupportedModel):
    """A stored input (the model folder, a dataset) cannot be read or parsed by the worker: the input is broken,
    so the job fails at once instead of being retried as if the infrastructure were at fault."""

    code = "input_unreadable"


class RequestTimeout(ServiceError):
    """A request body stopped arriving for longer than MCS_BODY_TIMEOUT_S."""

    code = "request_timeout"


class PreconditionFailed(ServiceError):
    """A conditional request (`If-Match`) does not hold for the current representation."""

    code = "precondition_failed"


class ChecksumMismatch(ServiceError):
    """An uploaded file is complete but its sha256 is not the one its manifest declared."""

    code = "checksum_mismatch"
