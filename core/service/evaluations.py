"""Standalone evaluations (`POST /v1/evaluations`): an evaluation is an ordinary job with no steps, so it queues,
runs, retries, cancels, streams its events and is cleaned up like any job; no table of its own.

Its spec is `{"evaluation": {subject}, "evaluate": {...}}`: a compression recipe never has an `evaluation` key
(JobSpec forbids extra keys), which is how the worker and the routes tell the two apart. The job's `model_id` is the
model measured (a model alone) or the original a job's artifact was made from (the artifact is compared with it).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from core.compression.evaluate import COMPARATIVE
from core.compression.spec import EvaluateSpec, JobSpec, step_datasets
from core.errors import Conflict, InvalidSpec, NotFound
from core.service.db.models import Artifact, Job
from core.service.db.repositories import Artifacts, Jobs
from core.service.jobs import JobRequest, submit_job
from core.service.settings import Settings

EVALUATION = "evaluation"  # the spec key that makes a job an evaluation


@dataclass(frozen=True)
class EvaluationSubject:
    """What to evaluate: exactly one of a model (alone), an artifact, or a job's artifact (each against its job's
    original model)."""

    model_id: str | None = None
    artifact_id: str | None = None
    job_id: str | None = None


def is_evaluation(job: Job) -> bool:
    return EVALUATION in job.spec


def submit_evaluation(session: Session, tenant_id: str, subject: EvaluationSubject, evaluate: EvaluateSpec,
                      queue: str, idempotency_key: str | None, enqueue: Callable[[Job], bool],
                      settings: Settings) -> Job:
    """Resolve the subject within the tenant (another tenant's id is a 404 like an unknown one) and submit the
    evaluation job through `submit_job`, so the model lock, the metric/model-kind check, the dataset's ownership,
    the pre-flight and the queue-outage handling are the jobs' own."""
    if subject.model_id is not None:
        if unfit := [metric for metric in evaluate.metrics if metric in COMPARATIVE]:
            message = (f"evaluation metric(s) {', '.join(unfit)} compare a model with its original; give an "
                       "artifact_id or job_id to measure them")
            raise InvalidSpec(message, [{"field": "evaluate.metrics", "message": message}])
        model_id, recorded = subject.model_id, {"model_id": subject.model_id}
    else:
        artifact, source = _artifact_and_job(session, tenant_id, subject)
        _check_held_out(evaluate, source)
        if artifact is None:
            raise Conflict(f"job {source.id} has no artifact (status {source.status!r}); evaluate a job that "
                           "succeeded", {"job_id": source.id, "status": source.status})
        if source.model_id is None:
            raise Conflict(f"the original model of job {source.id} was deleted: the artifact has nothing to be "
                           "compared with")
        model_id = source.model_id
        recorded = {"model_id": model_id, "artifact_id": artifact.id, "job_id": source.id}
    spec = {EVALUATION: recorded, "evaluate": evaluate.model_dump(mode="json")}
    body = {"subject": {k: v for k, v in vars(subject).items() if v is not None}, **spec, "queue": queue}
    return submit_job(session, tenant_id, JobRequest(model_id, spec, queue, body), idempotency_key, enqueue, settings)


def _artifact_and_job(session: Session, tenant_id: str,
                      subject: EvaluationSubject) -> tuple[Artifact | None, Job]:
    """The artifact and the job that made it (None: that job has no artifact, it has not succeeded)."""
    jobs, artifacts = Jobs(session, tenant_id), Artifacts(session, tenant_id)
    if subject.artifact_id is not None:
        artifact: Artifact = artifacts.get(subject.artifact_id)
        return artifact, jobs.get(artifact.job_id)
    assert subject.job_id is not None
    job: Job = jobs.get(subject.job_id)
    return (job.artifacts[-1] if job.artifacts else None), job


def _check_held_out(evaluate: EvaluateSpec, source: Job) -> None:
    """The evaluation dataset must not be one the artifact's steps calibrated or trained on (a job's own
    `evaluate` is refused the same way); texts that merely overlap are flagged in the result."""
    try:
        calibrated = step_datasets(list(JobSpec.model_validate(source.spec).steps))
    except ValidationError:  # a recipe from an older version: the worker's overlap check still flags it
        return
    if evaluate.dataset_id in calibrated:
        message = (f"evaluate.dataset_id {evaluate.dataset_id!r} is a dataset job {source.id}'s steps calibrated "
                   "or trained on; evaluate on held-out data (upload a separate dataset)")
        raise InvalidSpec(message, [{"field": "evaluate.dataset_id", "message": message}])


def evaluation_of(jobs: Jobs, job_id: str) -> Job:
    """The tenant's evaluation job `job_id`; a compression job's id is a 404 here."""
    job: Job = jobs.get(job_id)
    if not is_evaluation(job):
        raise NotFound(f"evaluation {job_id!r} not found")
    return job


def source_steps(session: Session, tenant_id: str, job: Job) -> list[Any]:
    """The steps of the job whose artifact an evaluation job measures (none for a model alone): the worker checks
    the evaluation rows against the texts they calibrated or trained on."""
    source_id = job.spec[EVALUATION].get("job_id")
    if source_id is None:
        return []
    try:
        return list(JobSpec.model_validate(Jobs(session, tenant_id).get(source_id).spec).steps)
    except (ValidationError, NotFound):
        return []
