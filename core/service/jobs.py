"""Submitting a job: the rules a request passes before a job exists, and what happens when the queue is down.

A service function in the manner of Polar's `service.py`: the API route parses the body and serialises the result;
the references, the idempotency replay, the race with a model's deletion and the broker outage are decided here.
"""

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.compression.export_rules import model_export_refusal
from core.compression.runtime_rules import model_runtime_refusal
from core.compression.spec import config_class, evaluation_refusal
from core.errors import Conflict, InvalidSpec, NotFound, Unavailable
from core.service.capacity import preflight
from core.service.db.models import Dataset, Job
from core.service.db.repositories import Datasets, Jobs, Models
from core.service.quotas import check_submission
from core.service.settings import Settings

MIN_TRAINING_SAMPLES = 2


@dataclass(frozen=True)
class JobRequest:
    """A validated submission: `spec` is the recipe as the user wrote it (the worker validates it again and fills
    the same defaults), `body` the whole request as parsed, which an Idempotency-Key replay must match."""

    model_id: str
    spec: dict[str, Any]
    queue: str
    body: dict[str, Any]

    @property
    def request_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.body, sort_keys=True).encode()).hexdigest()


def submit_job(session: Session, tenant_id: str, request: JobRequest, idempotency_key: str | None,
               enqueue: Callable[[Job], bool], settings: Settings) -> Job:
    """Create the job and send it to its queue, or replay the job an earlier request with the same
    Idempotency-Key created. A job no live worker of its queue can hold is refused (`InvalidSpec`, 422, see
    `core.service.capacity`). If the broker refuses the message the job is withdrawn and `Unavailable` (503) raised:
    nothing is left queued that no worker will hear of."""
    jobs, models = Jobs(session, tenant_id), Models(session, tenant_id)
    if idempotency_key and (existing := jobs.by_idempotency_key(idempotency_key)):
        return _replay(existing, request.request_hash)
    check_submission(session, tenant_id, settings)
    model = models.get_for_new_job(request.model_id)
    if reason := model_export_refusal(request.spec.get("export") or [], model.architecture):
        raise InvalidSpec(reason, [{"field": "export", "message": reason}])
    if reason := model_runtime_refusal(request.spec.get("runtimes") or [], model.architecture):
        raise InvalidSpec(reason, [{"field": "runtimes", "message": reason}])
    evaluate = request.spec.get("evaluate") or {}
    if reason := evaluation_refusal(evaluate.get("metrics") or [], model.architecture):
        raise InvalidSpec(reason, [{"field": "evaluate.metrics", "message": reason}])
    check_references(request.spec, Datasets(session, tenant_id), models)
    estimate = preflight(session, model, request.spec, request.queue, settings)
    try:
        job = jobs.add_job(request.model_id, request.spec, request.queue, idempotency_key, request.request_hash,
                           estimate)
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        return _after_integrity_error(exc, jobs, models, request, idempotency_key)
    if not enqueue(job):  # only after the commit: the worker must find the row
        jobs.delete(job)
        session.commit()
        raise Unavailable("the job queue is unreachable, so the job was not submitted; retry shortly")
    return job


def _after_integrity_error(error: IntegrityError, jobs: Jobs, models: Models, request: JobRequest,
                           idempotency_key: str | None) -> Job:
    """A constraint refused the insert: the model was deleted meanwhile (404, as if it never existed), or a
    concurrent request with the same Idempotency-Key won the race (replay its job)."""
    if not models.exists(request.model_id):
        raise NotFound(f"model {request.model_id!r} not found")
    if idempotency_key is None:
        raise error  # no known cause: a server fault
    return _replay(jobs.by_idempotency_key(idempotency_key), request.request_hash)


def _replay(job: Job | None, request_hash: str) -> Job:
    if job is None:
        raise Conflict("a job with this Idempotency-Key is being created; retry")
    if job.request_hash != request_hash:
        raise Conflict("Idempotency-Key was already used with a different request body", {"job_id": job.id})
    return job


def check_references(spec: dict[str, Any], datasets: Datasets, models: Models) -> None:
    """Every dataset or teacher model a step names, and the evaluation dataset, must be the tenant's own (404
    otherwise, like any id), and a training step needs a dataset with rows to hold out for evaluation."""
    if isinstance(evaluate := spec.get("evaluate"), dict) and isinstance(evaluate.get("dataset_id"), str):
        datasets.get(evaluate["dataset_id"])
    for step in spec.get("steps", [spec]):
        for key, value in _walk(step):
            if key == "dataset_id" and isinstance(value, str):
                _check_dataset(datasets.get(value), step)
            elif key == "teacher" and isinstance(value, str) and value != "original":
                models.get_ready(value)


def _check_dataset(dataset: Dataset, step: dict[str, Any]) -> None:
    config = config_class(step)
    if config is not None and config.traits.trains and dataset.num_samples < MIN_TRAINING_SAMPLES:
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
