"""Celery tasks: they take a job id, load their state from the database, call core, and record what happened.

Every transition is its own short transaction, so the API sees progress while the job runs and a crash at any
point leaves the job in a state the next delivery (or the reconciler) can pick up.
"""

import hashlib
import logging
import shutil
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from celery import Task
from celery.exceptions import TimeLimitExceeded
from celery.signals import task_failure, worker_process_init, worker_ready, worker_shutdown

from core import __version__
from core.compression.evaluate import EvaluationRequest
from core.compression.execute import evaluate_standalone, execute_job, load_input, reading_input
from core.compression.pipeline import StepHooks
from core.compression.spec import EvaluateSpec, JobSpec, StepConfig, step_datasets
from core.compression.state import StepContext, StepReport
from core.service.datasets import read_rows, read_texts
from core.service.db.models import Job, JobStatus, utcnow
from core.service.db.repositories import Artifacts, Datasets, JobRuns, Models, search_of_job
from core.service.db.session import engine, session_scope
from core.service.evaluations import EVALUATION, is_evaluation, source_steps
from core.service.logs import bind, bound
from core.service.metrics import JOB_DURATION, STEP_DURATION
from core.service.quotas import running_room
from core.service.searches import advance_search
from core.service.settings import Settings, get_settings
from core.service.storage import ArtifactStore, get_store
from worker.celery_app import RUN_JOB_TASK, app, send_options
from worker.faults import INFRASTRUCTURE_FAULTS, Heartbeat, Sweeper, failure_for, retries_exhausted, timeout_error

log = logging.getLogger(__name__)
SWEEPERS: list[Sweeper] = []


@app.task(name=RUN_JOB_TASK, bind=True, max_retries=5)
def run_job(self: Task, job_id: str) -> None:
    with bound(job_id=job_id, tenant_id=None, step=None):  # every log line of the run names the job
        try:
            _run_job(self, job_id)
        finally:
            _advance_search(job_id)


def _advance_search(job_id: str) -> None:
    """A job that is a search's trial and ended: record it and start the search's next trials (nothing waits for
    trials; core/service/searches.py). A failure here is logged: the next trial that ends advances the search."""
    try:
        with session_scope() as session:
            if (found := search_of_job(session, job_id)) is not None:
                advance_search(session, *found, _enqueue, get_settings())
    except Exception:
        log.exception("job %s: could not advance its search", job_id)


def _enqueue(job: Job) -> bool:
    """Send a trial job to its queue, like the API's submission (api/queue.py)."""
    try:
        app.send_task(RUN_JOB_TASK, args=[job.id], **send_options(job, get_settings()))
        return True
    except Exception as exc:  # broker unreachable
        log.warning("could not enqueue job %s: %s", job.id, exc)
        return False


def _run_job(self: Task, job_id: str) -> None:
    settings = get_settings()
    job = None
    try:
        job = _claim(job_id, settings)
        if job is not None:
            _run_claimed(job, settings)
    except INFRASTRUCTURE_FAULTS as exc:
        last_try = self.request.retries >= self.max_retries
        if not _retry_later(job_id, job.attempts if job else None, exc, settings, last_try):
            log.error("job %s: infrastructure fault, no retry left: %s", job_id, exc)
            return
        log.warning("job %s: infrastructure fault, will retry: %s", job_id, exc)
        raise self.retry(exc=exc, countdown=min(5 * 2**self.request.retries, 300)) from exc


def _claim(job_id: str, settings: Settings) -> Job | None:
    lease = timedelta(seconds=settings.job_lease_s)
    with session_scope() as session:
        runs = JobRuns(session)
        job, options = runs.get(job_id), None
        if job is not None and not running_room(session, job, settings):
            options = send_options(job, settings)  # its tenant runs its quota of jobs: offer it later
            job = None
        elif (job := runs.claim(job_id, lease, settings.job_max_attempts)) is None:
            log.info("job %s not claimed: %s", job_id, runs.settle_unclaimed(job_id, settings.job_max_attempts))
    if options is not None:
        log.info("job %s waits: its tenant runs as many jobs as its running-jobs quota allows", job_id)
        app.send_task(RUN_JOB_TASK, args=[job_id], countdown=settings.quota_recheck_s, **options)
    return job


def _run_claimed(job: Job, settings: Settings) -> None:
    """Run a claimed job to exactly one end; infrastructure faults propagate so that the task retries."""
    work_dir = settings.work_dir / f"job-{job.id}"
    started, outcome = time.monotonic(), "retried"
    bind(tenant_id=job.tenant_id)
    try:
        with Heartbeat(job.id, settings.job_lease_s):
            _execute(job, get_store(), work_dir)
        outcome = "succeeded"
    except Exception as exc:  # every failure is named; only infrastructure faults are retried
        failure = failure_for(exc, settings, job.estimate)
        if failure is None:
            raise  # retried: work_dir keeps the steps' checkpoints for the next attempt
        if failure[0]["code"] == "internal_error":
            log.exception("job %s crashed", job.id)
        outcome = str(failure[1])
        _end(job.id, *failure, attempt=job.attempts)
    finally:
        JOB_DURATION.labels(job.queue, outcome).observe(time.monotonic() - started)
        log.info("job %s: run ended %s after %.1f s", job.id, outcome, time.monotonic() - started)
    shutil.rmtree(work_dir, ignore_errors=True)  # the job ended: its scratch and checkpoints go


def _execute(job: Job, store: ArtifactStore, work_dir: Path) -> None:
    """Inputs come from the store into this worker's own scratch (`work_dir`) unless the store is a local disk;
    the artifact goes back through the store: nothing assumes a disk shared with the API."""
    if is_evaluation(job):
        _execute_evaluation(job, store, work_dir)
        return
    spec = JobSpec.model_validate(job.spec)
    with session_scope() as session:
        model = JobRuns(session).model_of(job)
    outcome = execute_job(
        store.local_tree(model.storage_key, work_dir / "input"), spec, work_dir, _context(job, work_dir),
        _hooks(job.id, job.attempts),
        {"job_id": job.id, "input_sha256": model.sha256, "service_version": __version__},
        get_settings().stream_above_bytes,
        None if spec.evaluate is None else _evaluation_request(job.tenant_id, spec.evaluate, list(spec.steps),
                                                               work_dir),
    )
    # One key per attempt: a run that lost its lease deletes its own file without touching the winner's.
    key = f"artifacts/{job.id}/attempt-{job.attempts}/model.zip"
    store.put_file(key, outcome.artifact)
    artifact = {"name": f"{model.name}-compressed.zip", "storage_key": key, "sha256": _sha256(outcome.artifact),
                "size_bytes": outcome.artifact.stat().st_size}
    with session_scope() as session:
        held = JobRuns(session).succeed(job, outcome.metrics, artifact)
    if not held:
        log.warning("job %s: attempt %d lost its lease before it finished; its result is dropped", job.id,
                    job.attempts)
        store.delete(key)


def _execute_evaluation(job: Job, store: ArtifactStore, work_dir: Path) -> None:
    """An evaluation job (core.service.evaluations): the model alone, or a job's artifact against the model it was
    made from; the result goes into the job's metrics, no artifact is made."""
    subject = job.spec[EVALUATION]
    with session_scope() as session:
        model = JobRuns(session).model_of(job)
        artifact = Artifacts(session, job.tenant_id).get(subject["artifact_id"]) if "artifact_id" in subject else None
        steps = source_steps(session, job.tenant_id, job)
    request = _evaluation_request(job.tenant_id, EvaluateSpec.model_validate(job.spec["evaluate"]), steps, work_dir)
    artifact_zip = store.local_file(artifact.storage_key, work_dir / "artifact.zip") if artifact else None
    result = evaluate_standalone(store.local_tree(model.storage_key, work_dir / "input"), artifact_zip, request,
                                 work_dir, _context(job, work_dir), get_settings().stream_above_bytes)
    metrics = {"evaluation": result, "subject": subject}
    if warning := result.get("overlap", {}).get("warning"):
        log.warning("%s", warning)
        metrics["warnings"] = [warning]
    with session_scope() as session:
        if not JobRuns(session).succeed(job, metrics, None):
            log.warning("job %s: attempt %d lost its lease before it finished", job.id, job.attempts)


def _end(job_id: str, error: dict[str, Any], status: JobStatus = JobStatus.failed, attempt: int | None = None) -> None:
    with session_scope() as session:
        JobRuns(session).fail(job_id, error, status, attempt)


def _retry_later(job_id: str, attempt: int | None, exc: BaseException, settings: Settings, last_try: bool) -> bool:
    """Requeue the job for the retried task, or end it when it has no attempt (or retry) left."""
    try:
        with session_scope() as session:
            return JobRuns(session).release_or_end(job_id, attempt, settings.job_max_attempts,
                                                   retries_exhausted(exc), last_try)
    except Exception as db_exc:  # the database is down too: the lease expiry lets the retry claim it later
        log.warning("job %s: could not requeue or end it: %s", job_id, db_exc)
        return not last_try


def _context(job: Job, work_dir: Path) -> StepContext:
    """Progress goes to the database at most once a second; the cancellation flag is read at the same pace. A run
    that lost the job (its lease expired and the job was requeued, taken over or ended) stops like a cancelled one,
    and its progress is not written."""
    job_id, attempt, state = job.id, job.attempts, {"last": 0.0, "cancel": False}

    def report(fraction: float, message: str) -> None:
        if time.monotonic() - state["last"] >= 1.0 or fraction >= 1.0:
            with session_scope() as session:
                state["cancel"] = JobRuns(session).progress(job_id, fraction, message, attempt)
            state["last"] = time.monotonic()

    def should_stop() -> bool:
        if time.monotonic() - state["last"] >= 1.0:
            with session_scope() as session:
                state["cancel"] = JobRuns(session).stop_requested(job_id, attempt)
            state["last"] = time.monotonic()
        return bool(state["cancel"])

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    texts, teacher = _dataset_texts(job.tenant_id, work_dir), _teacher_models(job.tenant_id, device, work_dir)
    return StepContext(device=device, report=report, should_stop=should_stop, texts=texts, teacher=teacher)


def _teacher_models(tenant_id: str, device: torch.device, work_dir: Path) -> Callable[[str], Any]:
    """Resolve a step's `teacher` model id to that tenant's uploaded model, loaded fresh ("original" is handled in
    core.compression.execute)."""

    def teacher(model_id: str) -> Any:
        with session_scope() as session:
            model = Models(session, tenant_id).get(model_id)
        return load_input(get_store().local_tree(model.storage_key, work_dir / f"teacher-{model_id}"), device)

    return teacher


def _dataset_texts(tenant_id: str, work_dir: Path) -> Callable[[str | None], list[str]]:
    """Resolve a step's `dataset_id` to the texts of that tenant's dataset (None: the default corpus)."""

    def texts(dataset_id: str | None) -> list[str]:
        if dataset_id is None:
            from core.compression.corpus import default_corpus

            return default_corpus()
        with session_scope() as session:
            dataset = Datasets(session, tenant_id).get(dataset_id)
        path = get_store().local_file(dataset.storage_key, work_dir / f"dataset-{dataset_id}.jsonl")
        with reading_input(f"dataset {dataset_id!r}"):
            return read_texts(path)

    return texts


def _evaluation_request(tenant_id: str, evaluate: EvaluateSpec, steps: list[StepConfig],
                        work_dir: Path) -> EvaluationRequest:
    """The evaluation dataset's first `max_samples` rows, and the texts the steps calibrate or train on (the
    default corpus for a step without a dataset) so that overlap between them is flagged."""
    dataset_id = evaluate.dataset_id
    with session_scope() as session:
        dataset = Datasets(session, tenant_id).get(dataset_id)
    path = get_store().local_file(dataset.storage_key, work_dir / f"dataset-{dataset_id}.jsonl")
    with reading_input(f"dataset {dataset_id!r}"):
        rows = read_rows(path, evaluate.max_samples)
    texts = _dataset_texts(tenant_id, work_dir)
    references = {name or "default corpus": texts(name) for name in step_datasets(steps)}
    return EvaluationRequest(dataset_id, tuple(evaluate.metrics), rows, references)


def _hooks(job_id: str, attempt: int) -> StepHooks:
    """Record each step's start and end in the database, its duration by step type in the metrics, and name it in
    the log lines written while it runs."""
    running: dict[int, tuple[str, str, float]] = {}

    def started(index: int, config: StepConfig) -> None:
        step, method = str(config.type), str(getattr(config, "method", None) or "")
        running[index] = (step, method, time.monotonic())
        bind(step=f"{index}:{step}/{method}" if method else f"{index}:{step}")
        log.info("job %s: step %d (%s %s) started", job_id, index, step, method)
        with session_scope() as session:
            JobRuns(session).step_started(job_id, index, attempt)

    def finished(index: int, report: StepReport) -> None:
        step, method, at = running.pop(index)
        STEP_DURATION.labels(step, method).observe(time.monotonic() - at)
        log.info("job %s: step %d (%s %s) finished in %.2f s", job_id, index, step, method, time.monotonic() - at)
        bind(step=None)
        with session_scope() as session:
            JobRuns(session).step_finished(job_id, index, report.metrics, report.notes, attempt)

    return StepHooks(started=started, finished=finished)


def _sha256(path: Any) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@worker_ready.connect
def reconcile_on_start(**_: Any) -> None:
    """Re-send jobs still queued in the database (e.g. the broker lost them in a restart); duplicates are no-ops.
    Then start this worker's sweeper (expired leases, stale scratch)."""
    settings = get_settings()
    try:
        resent = reconcile_queued(older_than_s=settings.reconcile_after_s)
        if resent:
            log.info("reconciler re-enqueued %d queued jobs", resent)
    except Exception as exc:
        log.warning("reconciler skipped: %s", exc)
    SWEEPERS.append(Sweeper(app, RUN_JOB_TASK, settings))
    SWEEPERS[-1].start()


@worker_shutdown.connect
def stop_sweeper(**_: Any) -> None:
    while SWEEPERS:
        SWEEPERS.pop().stop()


@worker_process_init.connect
def forget_parent_connections(**_: Any) -> None:
    """A pool process is forked from the main one, whose sweeper holds database connections: never share them."""
    engine().dispose(close=False)


@task_failure.connect
def end_on_hard_time_limit(sender: Any = None, exception: BaseException | None = None, args: Any = None,
                           **_: Any) -> None:
    """The hard limit kills the pool process, so its own cleanup never runs: the main process ends the job
    `failed` with `timeout` and removes its scratch folder."""
    if getattr(sender, "name", None) != RUN_JOB_TASK or not isinstance(exception, TimeLimitExceeded) or not args:
        return
    settings = get_settings()
    shutil.rmtree(settings.work_dir / f"job-{args[0]}", ignore_errors=True)
    with session_scope() as session:
        runs = JobRuns(session)
        job = runs.get(args[0])
        runs.fail(args[0], timeout_error("hard", job.estimate if job else None, settings))


def reconcile_queued(older_than_s: int) -> int:
    settings = get_settings()
    with session_scope() as session:
        stale = JobRuns(session).stale_queued(utcnow() - timedelta(seconds=older_than_s))
        targets = [(job.id, send_options(job, settings)) for job in stale if not job.cancel_requested]
    for job_id, options in targets:
        app.send_task(RUN_JOB_TASK, args=[job_id], **options)
    return len(targets)
