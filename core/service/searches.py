"""Searches to a quality budget (`POST /v1/searches`): trials are ordinary jobs on the queues, so they spread over
the workers; nothing waits for them.

Event-driven: when a trial job ends, the worker that ran it calls `advance_search`, which records the trial under
the search's row lock and, while the budget lasts, plans the next trials (core.compression.search: the sampler is
rebuilt from the stored trials) and submits them through `submit_job`, keeping `parallelism` in flight. The search
ends once nothing is in flight and nothing more may start; it keeps the best recipe that met the constraint, with
its job and artifact.
"""

import contextlib
import copy
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from core.compression.search import (
    PROBE,
    Judged,
    PastTrial,
    Plan,
    SearchSpace,
    SearchSpec,
    default_space,
    judge,
    plan_trial,
    predicted_to_fail,
    probe_recipe,
    sensitivity_from,
    sensitivity_json,
    sensitivity_of,
    suggest,
)
from core.compression.spec import JobSpec
from core.errors import Conflict, InvalidSpec, ServiceError
from core.service.db.models import TERMINAL, Job, JobStatus, Search, SearchStatus, utcnow
from core.service.db.repositories import Jobs, Models, Searches, running_searches
from core.service.db.session import session_scope
from core.service.jobs import JobRequest, submit_job
from core.service.settings import Settings

log = logging.getLogger(__name__)
Enqueue = Callable[[Job], bool]
PENDING = "pending"  # a trial planned whose job is being submitted
PENDING_FOR_S = 300  # a planned trial still without its job after this long was lost with its process
MAX_ROUNDS = 200  # plan-and-submit rounds per call: each round's refused trials count against the budget


def submit_search(session: Session, tenant_id: str, model_id: str, spec: SearchSpec, queue: str, enqueue: Enqueue,
                  settings: Settings) -> Search:
    """Create the search and submit its first trials. A first trial the jobs' own checks refuse (the model, the
    dataset, the queue's workers, quotas) refuses the search with the same error, and nothing is left behind."""
    model = Models(session, tenant_id).get_ready(model_id)
    space = spec.space or default_space(model.architecture)
    stored = spec.model_copy(update={"space": space}).model_dump(mode="json")
    search = Search(tenant_id=tenant_id, model_id=model_id, queue=queue, spec=stored, trials=[],
                    status=SearchStatus.running)
    session.add(search)
    session.commit()
    try:
        _advance(session, tenant_id, search.id, enqueue, settings, refuse=True)
    except Exception:
        session.rollback()
        _withdraw(session, tenant_id, search.id)
        raise
    found: Search = Searches(session, tenant_id).get(search.id)
    return found


def _withdraw(session: Session, tenant_id: str, search_id: str) -> None:
    searches = Searches(session, tenant_id)
    for job in searches.trial_jobs(search_id).values():
        session.delete(job)
    session.delete(searches.get(search_id))
    session.commit()


def advance_search(session: Session, tenant_id: str, search_id: str, enqueue: Enqueue, settings: Settings) -> None:
    """Record the trials that ended and start the next ones (or end the search); any number of calls, from any
    process, in any order, do the same as one."""
    _advance(session, tenant_id, search_id, enqueue, settings, refuse=False)


def advance_running_searches(enqueue: Enqueue, settings: Settings) -> int:
    """Advance every running search: the safety net for trials whose completion path never ran (their worker was
    killed, or the sweeper or a hard time limit ended them). Returns how many searches were looked at."""
    with session_scope() as session:
        found = running_searches(session)
    for tenant_id, search_id in found:
        with session_scope() as session:
            advance_search(session, tenant_id, search_id, enqueue, settings)
    return len(found)


def cancel_search(session: Session, tenant_id: str, search_id: str) -> Search:
    """End a running search `cancelled` and cancel every trial still queued or running (409 once it ended)."""
    searches = Searches(session, tenant_id)
    search = searches.locked(search_id)
    if search.status != SearchStatus.running:
        raise Conflict(f"search {search_id} already ended with status {search.status!r}; it cannot be cancelled")
    jobs = Jobs(session, tenant_id)
    for job in searches.trial_jobs(search_id).values():
        if job.status not in TERMINAL:
            with contextlib.suppress(Conflict):  # it ended meanwhile
                jobs.cancel(job)
    _finish(search, SearchStatus.cancelled, "cancelled; its queued and running trials were cancelled")
    session.commit()
    return search


# ---- advancing -------------------------------------------------------------------------------------------------


def _advance(session: Session, tenant_id: str, search_id: str, enqueue: Enqueue, settings: Settings,
             refuse: bool) -> None:
    for _ in range(MAX_ROUNDS):
        planned = _record_and_plan(session, tenant_id, search_id)
        if not planned:
            return
        if not _submit_all(session, tenant_id, search_id, planned, enqueue, settings, refuse):
            return
        refuse = False


def _record_and_plan(session: Session, tenant_id: str, search_id: str) -> list[int]:
    """Under the row lock: record ended trials, end the search when it is done, plan new trials (numbers)."""
    searches = Searches(session, tenant_id)
    search = searches.locked(search_id)
    spec = SearchSpec.model_validate(search.spec)
    trials = copy.deepcopy(search.trials)
    _record_ended(search, trials, searches.trial_jobs(search_id), spec)
    planned: list[int] = []
    if search.status == SearchStatus.running:
        planned = _plan(search, trials, spec)
        if not planned and not _in_flight(trials):
            _finish(search, SearchStatus.succeeded, _outcome(search, trials, spec))
    search.trials = trials
    search.best = _best(trials)
    session.commit()
    return planned


def _record_ended(search: Search, trials: list[dict[str, Any]], jobs: dict[str, Job], spec: SearchSpec) -> None:
    for trial in trials:
        if _lost(trial):
            trial.update(status=JobStatus.failed, objective=None, violation=None, feasible=False,
                         error={"code": "internal_error", "message": "planned but never submitted (the process "
                                "that planned it stopped)"})
            continue
        job = jobs.get(trial.get("job_id") or "")
        if job is None or trial["status"] in TERMINAL or job.status not in TERMINAL:
            if job is not None and trial["status"] not in TERMINAL:
                trial["status"] = job.status
            continue
        trial.update(_measured(job, spec))
        if trial["params"].get("family") == PROBE and job.status == JobStatus.succeeded and job.steps:
            search.sensitivity = sensitivity_json(sensitivity_from(job.steps[0].metrics or {}))


def _measured(job: Job, spec: SearchSpec) -> dict[str, Any]:
    """A trial's record once its job ended: size, latency, the constrained metric with its CI, the objective."""
    if job.status != JobStatus.succeeded:
        return {"status": job.status, "error": job.error, "objective": None, "violation": None, "feasible": False}
    metrics = job.metrics or {}
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    judged: Judged = judge(spec.constraint, metrics)
    latency_ratio = _ratio(before.get("latency_ms"), after.get("latency_ms"))
    size_ratio = metrics.get("size_ratio") or _ratio(before.get("size_bytes"), after.get("size_bytes"))
    objective = size_ratio if spec.objective == "min_size" else latency_ratio
    measured = ((metrics.get("evaluation") or {}).get("metrics") or {}).get(spec.constraint.evaluation_metric)
    return {"status": job.status, "size_bytes": after.get("size_bytes"), "original_size_bytes": before.get(
        "size_bytes"), "size_ratio": size_ratio, "latency_ms": after.get("latency_ms"), "latency_ratio": latency_ratio,
        "value": judged.value, "ci95": list(judged.ci95) if judged.ci95 else None, "loss": _finite(judged.loss),
        "violation": _finite(judged.violation), "feasible": judged.feasible, "objective": objective,
        "evaluation": measured, "artifact_id": job.artifacts[-1].id if job.artifacts else None}


def _plan(search: Search, trials: list[dict[str, Any]], spec: SearchSpec) -> list[int]:
    """Append the trials to start now, up to `parallelism` in flight within the budget."""
    space = spec.space or SearchSpace()
    planned: list[int] = []
    deadline = (search.created_at + timedelta(seconds=spec.budget.max_seconds)) if spec.budget.max_seconds else None
    while _in_flight(trials) < spec.parallelism and len(trials) < spec.budget.max_trials:
        if deadline is not None and utcnow() >= deadline:
            break
        trial = _next_trial(search, trials, space)
        if trial is None:
            break
        trials.append({"number": len(trials), "job_id": None, "status": PENDING, "planned_at": utcnow().isoformat(),
                       **trial})
        planned.append(len(trials) - 1)
    return planned


def _next_trial(search: Search, trials: list[dict[str, Any]], space: SearchSpace) -> dict[str, Any] | None:
    """The probe first (when the space scans), presets while it runs, then the sampler's suggestions."""
    probe = next((trial for trial in trials if trial["params"].get("family") == PROBE), None)
    if space.sensitivity_scan and probe is None:
        return {"params": {"family": PROBE}, "steps": probe_recipe(space), "protected": [], "damage": None}
    scanning = probe is not None and probe["status"] not in TERMINAL
    if scanning:  # the scan is not in yet: only presets, which do not use it, may start
        tried = {trial["params"].get("family") for trial in trials}
        untried = [name for name in space.presets if name not in tried]
        return _as_trial({"family": untried[0]}, space, {}, []) if untried else None
    sensitivity = sensitivity_of(search.sensitivity)
    failed = [(t["params"], t["damage"]) for t in trials if t.get("feasible") is False and t.get("damage") is not None
              and t["status"] == JobStatus.succeeded]
    past = [PastTrial(t["params"], t["status"] not in TERMINAL, t.get("objective"), t.get("violation"))
            for t in trials]

    def skip(params: dict[str, Any]) -> bool:
        return predicted_to_fail(params, plan_trial(params, space, sensitivity, [d for _, d in failed]), failed)

    params = suggest(space, past, bool(sensitivity), skip)
    return None if params is None else _as_trial(params, space, sensitivity, [d for _, d in failed])


def _as_trial(params: dict[str, Any], space: SearchSpace, sensitivity: Any, failed: list[float]) -> dict[str, Any]:
    plan: Plan = plan_trial(params, space, sensitivity, failed)
    return {"params": params, "steps": plan.steps, "protected": plan.protected, "damage": plan.damage}


def _submit_all(session: Session, tenant_id: str, search_id: str, planned: list[int], enqueue: Enqueue,
                settings: Settings, refuse: bool) -> bool:
    """Submit each planned trial as a job linked to the search before its message is sent; True when one was
    refused, so that planning goes on (a refused trial counts against the budget)."""
    search = Searches(session, tenant_id).get(search_id)
    refused = False
    for number in planned:
        trial = search.trials[number]
        spec = {"steps": trial["steps"], "evaluate": search.spec["evaluate"]}
        request = JobRequest(search.model_id or "", spec, search.queue, {"search_id": search_id, "trial": number,
                                                                          **spec})
        try:
            _check_trial(spec)
            submit_job(session, tenant_id, request, f"search-{search_id}-trial-{number}",
                       _linking(session, tenant_id, search_id, number, enqueue), settings)
        except InvalidSpec as exc:
            if refuse and number == 0:
                raise
            session.rollback()
            _trial_refused(session, tenant_id, search_id, number, exc)
            refused = True
        except ServiceError as exc:  # the model was deleted, the queue is down, a quota is full: the search ends
            if refuse:
                raise
            session.rollback()
            _trial_refused(session, tenant_id, search_id, number, exc, end=True)
            return False
    return refused


def _check_trial(spec: dict[str, Any]) -> None:
    """InvalidSpec unless the trial's recipe passes the checks a submitted job's gets at the API: the search writes
    it, so no request schema has looked at it (a pydantic error here would otherwise leave the trial pending)."""
    try:
        JobSpec.model_validate(spec)
    except ValidationError as exc:
        problems = [{"field": ".".join(str(part) for part in error["loc"]), "message": error["msg"]}
                    for error in exc.errors()]
        raise InvalidSpec(f"the search built an invalid trial recipe: {problems[0]['field']}: "
                          f"{problems[0]['message']}", problems) from exc


def _linking(session: Session, tenant_id: str, search_id: str, number: int, enqueue: Enqueue) -> Enqueue:
    """Link the committed job to its search and trial, commit, then send it: the worker that ends it finds the
    link, however fast it runs."""

    def link_then_send(job: Job) -> bool:
        searches = Searches(session, tenant_id)
        searches.link(job.id, search_id)
        search = searches.locked(search_id)
        trials = copy.deepcopy(search.trials)
        trials[number].update(job_id=job.id, status=JobStatus.queued)
        search.trials = trials
        session.commit()
        return enqueue(job)

    return link_then_send


def _trial_refused(session: Session, tenant_id: str, search_id: str, number: int, error: ServiceError,
                   end: bool = False) -> None:
    search = Searches(session, tenant_id).locked(search_id)
    trials = copy.deepcopy(search.trials)
    trials[number].update(job_id=None, status=JobStatus.failed, error=error.as_dict(), objective=None,
                          violation=None, feasible=False)
    search.trials = trials
    log.warning("search %s: trial %d was refused: %s", search_id, number, error)
    if end and search.status == SearchStatus.running:
        _finish(search, SearchStatus.failed, f"trial {number} could not be submitted: {error}")
    session.commit()


# ---- small helpers ---------------------------------------------------------------------------------------------


def _outcome(search: Search, trials: list[dict[str, Any]], spec: SearchSpec) -> str:
    """Why the search ended and what it found."""
    found = ("the best trial that met the constraint is `best`" if _best(trials) is not None
             else f"no trial met the constraint ({spec.constraint.describe()})")
    timed_out = spec.budget.max_seconds and utcnow() >= search.created_at + timedelta(seconds=spec.budget.max_seconds)
    if len(trials) >= spec.budget.max_trials or timed_out:
        return f"{found}; the budget is spent ({len(trials)} trials)"
    return (f"{found}; ended after {len(trials)} of {spec.budget.max_trials} trials: every candidate left was "
            "already tried or predicted by the sensitivity scan to break the constraint")


def _lost(trial: dict[str, Any]) -> bool:
    """A trial planned long ago whose job was never linked: the process submitting it stopped in between."""
    if trial["status"] != PENDING or trial.get("job_id") or not trial.get("planned_at"):
        return False
    return utcnow() - datetime.fromisoformat(trial["planned_at"]) > timedelta(seconds=PENDING_FOR_S)


def _in_flight(trials: list[dict[str, Any]]) -> int:
    return sum(1 for trial in trials if trial["status"] not in TERMINAL)


def _best(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The feasible trial with the lowest objective (ties: the lower loss), as the search's `best`."""
    feasible = [t for t in trials if t.get("feasible") and t.get("objective") is not None]
    if not feasible:
        return None
    best = min(feasible, key=lambda t: (t["objective"], t.get("loss") or 0.0, t["number"]))
    keys = ("number", "job_id", "artifact_id", "steps", "params", "size_bytes", "size_ratio", "latency_ms",
            "latency_ratio", "value", "ci95", "objective")
    return {key: best.get(key) for key in keys}


def _finish(search: Search, status: SearchStatus, message: str) -> None:
    search.status, search.message, search.finished_at = status, message, utcnow()


def _ratio(before: Any, after: Any) -> float | None:
    numbers = isinstance(before, int | float) and isinstance(after, int | float)
    return after / before if numbers and before else None


def _finite(value: float) -> float | None:
    return value if value not in (float("inf"), float("-inf")) else None
