import hashlib
import json
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from sqlalchemy.exc import IntegrityError

from api import queue
from api.deps import V1_DEPENDENCIES, JobsDep, ModelsDep, PageNumber, PageSize, SessionDep, SettingsDep
from api.errors import V1_ERRORS, error_responses
from api.schemas import JobCreate, JobOut, Page
from core.db.models import Dataset, Job, JobStatus
from core.db.repositories import Datasets, Models
from core.errors import Conflict, InvalidSpec

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=V1_ERRORS,
                   dependencies=V1_DEPENDENCIES)
TRAINING_STEPS = ("distill", "lora")
MIN_TRAINING_SAMPLES = 2


@router.post("", status_code=202, response_model=JobOut, responses=error_responses(400, 404, 409, 413))
def create_job(
    body: JobCreate,
    request: Request,
    response: Response,
    jobs: JobsDep,
    models: ModelsDep,
    session: SessionDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobOut:
    """Submit a compression job. The recipe is validated here; the job runs on a worker of its queue."""
    request_hash = hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    if idempotency_key and (existing := jobs.by_idempotency_key(idempotency_key)):
        return _replay(existing, request_hash, request, response)
    models.get(body.model_id)
    # Stored as the user wrote it: the worker validates the same fields again and fills the same defaults, whereas
    # dumped defaults would count as given (e.g. a default `percentile` beside observer "mse" is refused).
    spec = body.model_dump(mode="json", exclude={"model_id", "queue"}, exclude_unset=True)
    _check_references(spec, Datasets(session, jobs.tenant_id), models)
    try:
        job = jobs.add_job(body.model_id, spec, body.queue or settings.default_queue, idempotency_key, request_hash)
        session.commit()
    except IntegrityError:  # a concurrent request with the same Idempotency-Key won the race
        session.rollback()
        return _replay(jobs.by_idempotency_key(idempotency_key or ""), request_hash, request, response)
    queue.enqueue(job)  # only after the commit: the worker must find the row
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_out(job, request)


@router.get("", response_model=Page[JobOut])
def list_jobs(
    jobs: JobsDep,
    request: Request,
    status: JobStatus | None = None,
    page: PageNumber = 1,
    page_size: PageSize = 20,
) -> Page[JobOut]:
    filters = [Job.status == status] if status else []
    return Page.of(jobs.page(page, page_size, *filters), lambda job: job_out(job, request), page, page_size)


@router.get("/{job_id}", response_model=JobOut, responses=error_responses(404))
def get_job(job_id: str, jobs: JobsDep, request: Request) -> JobOut:
    return job_out(jobs.get(job_id), request)


@router.post("/{job_id}/cancel", response_model=JobOut, responses=error_responses(404, 409))
def cancel_job(job_id: str, jobs: JobsDep, session: SessionDep, request: Request) -> JobOut:
    """Cancel: a queued job never starts; a running one stops at the next step boundary at the latest."""
    job = jobs.cancel(jobs.get(job_id))
    session.commit()
    return job_out(job, request)


def _check_references(spec: dict, datasets: Datasets, models: Models) -> None:
    """Every dataset or teacher model a step names must be the tenant's own (404 otherwise, like any id), and a
    training step needs a dataset with rows to hold out for evaluation."""
    for step in spec.get("steps", [spec]):
        for key, value in _walk(step):
            if key == "dataset_id" and isinstance(value, str):
                _check_dataset(datasets.get(value), step)
            elif key == "teacher" and isinstance(value, str) and value != "original":
                models.get(value)


def _check_dataset(dataset: Dataset, step: dict) -> None:
    if step.get("type") in TRAINING_STEPS and dataset.num_samples < MIN_TRAINING_SAMPLES:
        raise InvalidSpec(
            f"dataset {dataset.id!r} has {dataset.num_samples} sample(s); a {step['type']} step needs at least "
            f"{MIN_TRAINING_SAMPLES} (some are held out for evaluation)",
            [{"field": f"steps.{step['type']}.dataset_id", "message": "too few samples"}],
        )


def _walk(value: object) -> Iterator[tuple[str, object]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield key, item
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)


def job_out(job: Job, request: Request) -> JobOut:
    out = JobOut.model_validate(job)
    for artifact in out.artifacts:
        artifact.url = str(request.url_for("download_artifact", artifact_id=artifact.id))
    return out


def _replay(job: Job | None, request_hash: str, request: Request, response: Response) -> JobOut:
    if job is None:
        raise Conflict("a job with this Idempotency-Key is being created; retry")
    if job.request_hash != request_hash:
        raise Conflict("Idempotency-Key was already used with a different request body", {"job_id": job.id})
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_out(job, request)



