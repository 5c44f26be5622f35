from typing import Annotated

from fastapi import APIRouter, Header, Request, Response

from api import queue
from api.deps import V1_DEPENDENCIES, JobsDep, PageNumber, PageSize, SessionDep, SettingsDep, TenantDep, read
from api.errors import V1_ERRORS, error_responses
from api.routers.artifacts import artifact_url
from api.schemas import JobCreate, JobOut, Page
from core.service.db.models import Job, JobStatus
from core.service.db.repositories import Jobs
from core.service.jobs import JobRequest, submit_job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=V1_ERRORS,
                   dependencies=V1_DEPENDENCIES)


@router.post("", status_code=202, response_model=JobOut, responses=error_responses(400, 404, 408, 409, 413, 503))
def create_job(
    body: JobCreate,
    request: Request,
    response: Response,
    jobs: JobsDep,
    session: SessionDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200, pattern=r"^[!-~]+$",
                                                  description="visible ASCII, no spaces")] = None,
) -> JobOut:
    """Submit a compression job. The recipe is validated here; the job runs on a worker of its queue. A
    broker that refuses the job is a 503: nothing was submitted, retry (with the same Idempotency-Key)."""
    job_request = JobRequest(
        model_id=body.model_id,
        # stored as written: dumped defaults would count as given (a default `percentile` beside observer "mse")
        spec=body.model_dump(mode="json", exclude={"model_id", "queue", "preset", "overrides"}, exclude_unset=True),
        queue=body.queue or settings.default_queue,
        body=body.model_dump(mode="json"),
    )
    job = submit_job(session, jobs.tenant_id, job_request, idempotency_key, queue.enqueue, settings)
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
async def get_job(job_id: str, tenant: TenantDep, request: Request) -> JobOut:
    job = await read(request.scope, lambda session: Jobs(session, tenant.id).get_whole(job_id))
    return job_out(job, request)


@router.post("/{job_id}/cancel", response_model=JobOut, responses=error_responses(404, 409))
def cancel_job(job_id: str, jobs: JobsDep, session: SessionDep, request: Request) -> JobOut:
    """Cancel: a queued job ends `cancelled` at once; a running one is flagged (`cancel_requested`), stops at its
    next check and ends `cancelled`, never `succeeded`, even when its last step was finishing. A job that already
    ended is a 409."""
    job = jobs.cancel(jobs.get(job_id))
    session.commit()
    return job_out(job, request)


def job_out(job: Job, request: Request) -> JobOut:
    out = JobOut.model_validate(job)
    for artifact in out.artifacts:
        artifact.url = artifact_url(request, artifact.id)
    return out
