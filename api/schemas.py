"""Response and request bodies of the REST API v1 (the contract)."""

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core import errors
from core.compression.presets import preset_job
from core.compression.search import SearchSpec
from core.compression.spec import EvaluateSpec, JobSpec
from core.service.db.models import DeliveryStatus, JobEventType, JobStatus, SearchStatus, UploadStatus

# The codes a job's `error` can carry: the user's faults found while running, then the job machine's own endings.
JOB_FAILURE_CODES = tuple(cls.code for cls in (
    errors.InvalidSpec, errors.UnsupportedModel, errors.UnsafeInput, errors.InputUnreadable, errors.StepFailed,
    errors.NotFound, errors.JobCancelled, errors.WorkerLost, errors.JobTimeout, errors.OutOfMemory,
    errors.StorageFailed, errors.Unavailable, errors.InternalError,
))


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. `not_found`, `invalid_spec`, `rate_limited`")
    message: str = Field(description="what is wrong, for a human")
    details: Any = Field(None, description="structured context: the invalid fields, a job id, a size")


class ErrorOut(BaseModel):
    """Every error response: one body shape for every status."""

    error: ErrorDetail


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    architecture: str
    model_type: str
    num_parameters: int
    size_bytes: int
    sha256: str
    created_at: datetime
    status: Literal["importing", "ready", "failed"] = Field(
        description="an upload is ready at once; an import is importing until a worker stored it, or failed")
    source: str | None = Field(None, description="an import's source; once ready, resolved (hf://org/name@<commit>)")
    progress: dict[str, Any] | None = Field(
        None, description="an import's stage (queued, listing, downloading, checking, storing, done) and bytes_done "
                          "of bytes_total")
    error: dict[str, Any] | None = Field(None, description="why the import failed: code, message, details")


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    format: str
    num_samples: int
    size_bytes: int
    sha256: str
    created_at: datetime


class JobCreate(JobSpec):
    """A job: the uploaded model to compress and the recipe (ordered steps, or a named preset) to run on it."""

    model_id: str = Field(min_length=1, max_length=40)
    queue: Literal["cpu", "gpu"] | None = Field(None, description="worker pool; default from MCS_DEFAULT_QUEUE")
    preset: str | None = Field(None, max_length=64,
                               description="a named recipe (GET /v1/presets) instead of `steps`; the job's "
                                           "steps are the preset's")
    overrides: dict[str, Any] | None = Field(
        None, description='fields merged into every step of the preset that has them, e.g. '
                          '{"calibration": {"dataset_id": "dst_..."}}')

    @model_validator(mode="before")
    @classmethod
    def _steps_of_the_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or (data.get("preset") is None and data.get("overrides") is None):
            return data
        if data.get("preset") is None:
            raise ValueError("overrides apply to a preset: name one in `preset`")
        if "steps" in data:
            raise ValueError("give either `steps` or a `preset` (with `overrides`), not both")
        try:
            recipe = preset_job(data["preset"], data.get("overrides"))
        except errors.InvalidSpec as exc:
            raise ValueError(exc.message) from exc
        return {**recipe, **data, "steps": recipe["steps"]}  # an `export` of the request wins over the preset's


class PresetOut(BaseModel):
    name: str
    summary: str
    steps: list[dict[str, Any]]
    export: list[str] = Field(default_factory=list, description="formats a job of the preset adds to its artifact")
    measured: str = Field(description="what the benchmarks measured with it (docs/benchmarks.md)")


class StepOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    index: int
    type: str
    config: dict[str, Any]
    status: JobStatus
    started_at: datetime | None
    finished_at: datetime | None
    metrics: dict[str, Any] | None
    notes: list[str] | None


class ArtifactOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    size_bytes: int
    sha256: str
    url: str = ""


class EstimateOut(BaseModel):
    """What submission expected of the job (`core.compression.estimate`) and the time limits it chose from that."""

    peak_host_bytes: int = Field(description="peak host RAM of the job's process")
    peak_gpu_bytes: int = Field(description="peak GPU memory; 0 on the cpu queue")
    seconds: float = Field(description="expected run time (a guess on the safe side)")
    engine: Literal["in_memory", "streaming", "offloaded"]
    notes: list[str]
    soft_time_limit_s: int
    hard_time_limit_s: int


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    model_id: str | None
    status: JobStatus
    queue: str
    progress: float
    current_step: int | None
    message: str | None
    steps: list[StepOut]
    metrics: dict[str, Any] | None
    error: ErrorDetail | None = Field(description="why the job did not succeed: `code` is one of "
                                      f"{', '.join(f'`{code}`' for code in JOB_FAILURE_CODES)}")
    estimate: EstimateOut | None = Field(description="the pre-flight estimate; null for jobs submitted before it "
                                                     "existed")
    attempts: int
    cancel_requested: bool = Field(description="a cancel was accepted: a running job then ends `cancelled`, never "
                                               "`succeeded`")
    artifacts: list[ArtifactOut]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class EvaluationCreate(BaseModel):
    """A standalone evaluation on the tenant's own dataset: a model alone (each metric with its CI), or an artifact
    (by `artifact_id`, or the artifact of `job_id`) against the original model its job started from (every delta
    with its paired CI)."""

    model_config = ConfigDict(extra="forbid")

    model_id: str | None = Field(None, min_length=1, max_length=40)
    artifact_id: str | None = Field(None, min_length=1, max_length=40)
    job_id: str | None = Field(None, min_length=1, max_length=40)
    evaluate: EvaluateSpec
    queue: Literal["cpu", "gpu"] | None = Field(None, description="worker pool; default from MCS_DEFAULT_QUEUE")

    @model_validator(mode="after")
    def _one_subject(self) -> "EvaluationCreate":
        given = [name for name in ("model_id", "artifact_id", "job_id") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of model_id, artifact_id, job_id (got {', '.join(given) or 'none'})")
        return self


class EvaluationOut(BaseModel):
    """An evaluation job: its status like any job's (GET /v1/jobs/{id} shows it too, with no steps) and, once it
    succeeded, `result` (core.compression.evaluate: per metric the values, deltas and 95% CIs)."""

    id: str
    status: JobStatus
    queue: str
    progress: float
    message: str | None
    subject: dict[str, str] = Field(description="model_id, and for an artifact artifact_id and job_id")
    evaluate: dict[str, Any]
    result: dict[str, Any] | None
    warnings: list[str]
    error: ErrorDetail | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    page: int
    page_size: int
    total: int

    @classmethod
    def of(cls, found: tuple[Sequence[Any], int], convert: Callable[[Any], T], page: int, page_size: int) -> "Page[T]":
        """A page from a repository's `(rows, total)`, each row converted to its response body."""
        rows, total = found
        return cls(items=[convert(row) for row in rows], page=page, page_size=page_size, total=total)




class UploadFileIn(BaseModel):
    """One file of a chunked upload's manifest."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=255, description="a plain file name of the model folder, e.g. "
                      "`model-00001-of-00002.safetensors` (no folders)")
    size: int = Field(ge=0, description="bytes")
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="hex digest, checked when the file is complete")


class UploadCreate(BaseModel):
    """A chunked upload of a model folder: every file it will hold, PUT one by one afterwards."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
    files: list[UploadFileIn] = Field(min_length=1, description="must include config.json and a *.safetensors file")


class UploadFileOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    path: str
    size: int
    sha256: str
    received: int = Field(description="bytes received so far: the offset to resume at")
    complete: bool = Field(description="all bytes received and the sha256 matched")


class UploadOut(BaseModel):
    id: str
    name: str
    status: UploadStatus
    files: list[UploadFileOut]
    received_bytes: int
    total_bytes: int
    created_at: datetime
    expires_at: datetime


class WebhookCreate(BaseModel):
    """A webhook: where to POST the job events of the tenant's jobs, and which event types."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2000, description="http(s) URL whose host resolves to public "
                                                                "addresses only (unless the operator allows others)")
    events: list[JobEventType] = Field(min_length=1, description="event types to deliver, e.g. `[\"done\"]`")


class WebhookOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    url: str
    events: list[JobEventType]
    created_at: datetime


class WebhookCreated(WebhookOut):
    secret: str = Field(description="`whsec_...`: the key that signs deliveries; shown only in this response")


class DeliveryAttempt(BaseModel):
    attempt: int
    at: datetime
    status_code: int | None = Field(description="the receiver's HTTP status; null when no response came")
    error: str | None = Field(description="why the attempt failed; null for a 2xx")
    duration_ms: float


class DeliveryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(description="the `webhook-id` header, the same on every retry")
    job_id: str
    event_seq: int = Field(description="the event's `id:` in the job's event stream")
    event_type: JobEventType
    status: DeliveryStatus
    attempts: int
    attempt_log: list[DeliveryAttempt]
    created_at: datetime
    delivered_at: datetime | None


Scope = Literal["read", "write", "admin"]


class ApiKeyOut(BaseModel):
    """An API key, without its value (only its hash is stored)."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    prefix: str = Field(description="the key's first characters, to recognise it")
    name: str | None
    scopes: list[Scope] = Field(description="read: GET routes; write: also submit, upload, cancel, delete; "
                                            "admin: also /v1/admin")
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="`mcs_...`: the key itself; shown only in this response")


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
    scopes: list[Scope] = Field(["read", "write"], min_length=1, description="each grants the ones before it: "
                                                                             "write includes read, admin both")
    expires_at: datetime | None = Field(None, description="when the key stops working (with a time zone); "
                                                          "null: never")

    @model_validator(mode="after")
    def _aware(self) -> "ApiKeyCreate":
        if self.expires_at is not None and self.expires_at.tzinfo is None:
            raise ValueError("expires_at needs a time zone, e.g. 2027-01-01T00:00:00Z")
        return self


class ApiKeyRotate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_s: int = Field(0, ge=0, le=7 * 24 * 3600, description="the old key keeps working this long (at most a "
                                                                  "week); 0: revoked at once")


class QuotaOut(BaseModel):
    quota: Literal["stored_bytes", "running_jobs", "queued_jobs"]
    limit: int = Field(description="0: no limit")
    used: int


class SearchCreate(SearchSpec):
    """A search to a quality budget: trials (ordinary jobs, each with `evaluate`) until the budget is spent; the
    smallest (or fastest) recipe that meets the constraint wins. See core.compression.search for the space."""

    model_id: str = Field(min_length=1, max_length=40)
    queue: Literal["cpu", "gpu"] | None = Field(None, description="worker pool; default from MCS_DEFAULT_QUEUE")


class SearchOut(BaseModel):
    """A search: its request (with the space it got), every trial (recipe, job, size, the constrained metric with
    its 95% CI, whether it met the constraint), the per-weight sensitivity trial 0 measured, and `best`."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    model_id: str | None
    status: SearchStatus
    queue: str
    spec: dict[str, Any]
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None = Field(description="the best trial that met the constraint: its recipe (`steps`), "
                                        "job, artifact, size and metric; null while none has")
    sensitivity: dict[str, Any] | None = Field(description="per weight: parameters, modules and 1 - output cosine "
                                               "with it alone quantized at each width")
    message: str | None
    created_at: datetime
    finished_at: datetime | None
