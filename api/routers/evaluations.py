from typing import Annotated

from fastapi import APIRouter, Header, Response

from api import queue
from api.deps import V1_DEPENDENCIES, JobsDep, SessionDep, SettingsDep
from api.errors import V1_ERRORS, error_responses
from api.schemas import ErrorDetail, EvaluationCreate, EvaluationOut
from core.service.db.models import Job, JobStatus
from core.service.evaluations import EVALUATION, EvaluationSubject, evaluation_of, submit_evaluation

router = APIRouter(prefix="/v1/evaluations", tags=["evaluations"], responses=V1_ERRORS,
                   dependencies=V1_DEPENDENCIES)


@router.post("", status_code=202, response_model=EvaluationOut,
             responses=error_responses(400, 404, 408, 409, 413, 503))
def create_evaluation(
    body: EvaluationCreate,
    response: Response,
    jobs: JobsDep,
    session: SessionDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200, pattern=r"^[!-~]+$",
                                                  description="visible ASCII, no spaces")] = None,
) -> EvaluationOut:
    """Evaluate a model or an artifact of yours on your own dataset. It runs as a job with no steps (on a worker
    of its queue); poll GET /v1/evaluations/{id}. Another tenant's model, artifact, job or dataset is a 404; a job
    without an artifact, or whose original model was deleted, a 409."""
    subject = EvaluationSubject(body.model_id, body.artifact_id, body.job_id)
    job = submit_evaluation(session, jobs.tenant_id, subject, body.evaluate, body.queue or settings.default_queue,
                            idempotency_key, queue.enqueue, settings)
    response.headers["Location"] = f"/v1/evaluations/{job.id}"
    return evaluation_out(job)


@router.get("/{evaluation_id}", response_model=EvaluationOut, responses=error_responses(404))
def get_evaluation(evaluation_id: str, jobs: JobsDep) -> EvaluationOut:
    return evaluation_out(evaluation_of(jobs, evaluation_id))


def evaluation_out(job: Job) -> EvaluationOut:
    metrics = job.metrics or {}
    return EvaluationOut(
        id=job.id, status=JobStatus(job.status), queue=job.queue, progress=job.progress, message=job.message,
        subject=job.spec[EVALUATION], evaluate=job.spec["evaluate"], result=metrics.get("evaluation"),
        warnings=metrics.get("warnings", []), error=ErrorDetail(**job.error) if job.error else None,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
    )
