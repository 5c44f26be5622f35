"""Pre-flight at submission: estimate a job's memory and time, refuse it when no live worker of its queue can hold
it (or has every runtime its `runtimes` names), and size its time limits from the estimate.

Only workers that reported within 3 sweep intervals count: a stopped worker's row must not admit a job. A queue
with no live worker accepts the job (a fresh deployment must not refuse everything) and says so in the estimate.
"""

import math
from dataclasses import asdict
from datetime import timedelta
from typing import Any, Literal

from sqlalchemy.orm import Session

from core.compression.configs.base import StepConfig
from core.compression.estimate import GB, BlockShape, Estimate, ModelFacts, estimate_job
from core.compression.runtime_rules import INSTALL, missing_runtimes
from core.compression.spec import config_class
from core.errors import InvalidSpec
from core.service.db.models import Model, Worker, utcnow
from core.service.db.repositories import Workers
from core.service.settings import Settings

LIVE_SWEEPS = 3
HARD_LIMIT_PER_ESTIMATE = 2.0  # the estimate is a guess: a job may take twice as long before it is killed


def preflight(session: Session, model: Model, spec: dict[str, Any], queue: str, settings: Settings) -> dict[str, Any]:
    """The job's estimate as stored in its row (time limits and the capacity check included); `InvalidSpec` (422)
    when live workers of `queue` exist and none can hold the job, or none has every runtime it names."""
    blocks = BlockShape(**model.block_shape) if model.block_shape else None
    estimate = estimate_job(ModelFacts(model.num_parameters, model.size_bytes, blocks=blocks), _step_configs(spec),
                            _device(queue), settings.stream_above_bytes,
                            bool(spec.get("export") or spec.get("runtimes")))  # both hold the whole model
    workers = Workers(session).live(queue, utcnow() - timedelta(seconds=LIVE_SWEEPS * settings.sweep_interval_s))
    notes = list(estimate.notes)
    if not workers:
        notes.append(f"no live worker of queue {queue!r} has reported its capacity: accepted unchecked")
    else:
        equipped = _equipped(workers, spec, queue)
        if not any(_holds(worker, estimate) for worker in equipped):
            _refuse(estimate, queue, max(equipped, key=lambda w: _capacity(w, estimate)))
    soft, hard = time_limits(estimate.seconds, settings)
    return {**asdict(estimate), "notes": notes, "soft_time_limit_s": soft, "hard_time_limit_s": hard}


def time_limits(seconds: float, settings: Settings) -> tuple[int, int]:
    """(soft, hard) limits: the operator's MCS_JOB_*_TIME_LIMIT_S, unless MCS_JOB_MAX_HARD_TIME_LIMIT_S is above the
    hard limit and the estimate reaches the soft limit; then twice the estimate, capped there, with soft = 0.9 x
    hard."""
    floor = settings.job_soft_time_limit_s, settings.job_hard_time_limit_s
    cap = settings.job_max_hard_time_limit_s
    if cap <= floor[1] or seconds < settings.job_soft_time_limit_s:
        return floor
    hard = min(max(cap, floor[1]), math.ceil(HARD_LIMIT_PER_ESTIMATE * seconds))
    return max(floor[0], int(0.9 * hard)), max(floor[1], hard)


def _step_configs(spec: dict[str, Any]) -> list[StepConfig]:
    """The job's validated steps as configs: their calibration sizes set the time estimate."""
    configs = []
    for step in spec.get("steps", []):
        if (cls := config_class(step)) is not None:
            configs.append(cls.model_validate(step))
    return configs


def _device(queue: str) -> Literal["cpu", "cuda"]:
    return "cuda" if queue == "gpu" else "cpu"


def _equipped(workers: list[Worker], spec: dict[str, Any], queue: str) -> list[Worker]:
    """The workers that have every runtime the job names; `InvalidSpec` naming the missing ones when none has."""
    needed = [str(runtime) for runtime in spec.get("runtimes") or []]
    equipped = [worker for worker in workers if not missing_runtimes(needed, worker.runtimes)]
    if equipped:
        return equipped
    missing = sorted({runtime for worker in workers for runtime in missing_runtimes(needed, worker.runtimes)})
    install = "; ".join(f"{runtime}: {INSTALL[runtime]}" for runtime in missing if runtime in INSTALL)
    raise InvalidSpec(
        f"no live worker of queue {queue!r} has the runtime(s) {', '.join(missing)} that `runtimes` names; install "
        f"it on a worker of the queue ({install}) or drop it from `runtimes`",
        {"field": "runtimes", "missing_runtimes": missing,
         "workers": {worker.id: worker.runtimes or ["torch"] for worker in workers}},
    )


def _holds(worker: Worker, estimate: Estimate) -> bool:
    gpu_ok = estimate.peak_gpu_bytes == 0 or (worker.gpu_memory_bytes or 0) >= estimate.peak_gpu_bytes
    return worker.ram_total_bytes >= estimate.peak_host_bytes and gpu_ok


def _capacity(worker: Worker, estimate: Estimate) -> tuple[int, int]:
    gpu = worker.gpu_memory_bytes or 0
    return (gpu, worker.ram_total_bytes) if estimate.peak_gpu_bytes else (worker.ram_total_bytes, gpu)


def _refuse(estimate: Estimate, queue: str, largest: Worker) -> None:
    need = f"{_gb(estimate.peak_host_bytes)} of host RAM"
    has = f"{_gb(largest.ram_total_bytes)} of RAM"
    if estimate.peak_gpu_bytes:
        need += f" and {_gb(estimate.peak_gpu_bytes)} of GPU memory"
        has += f" and {_gb(largest.gpu_memory_bytes or 0)} of GPU memory ({largest.gpu_name or 'no GPU'})"
    raise InvalidSpec(
        f"the job needs about {need} ({estimate.engine} engine); no live worker of queue {queue!r} can hold it: "
        f"the largest ({largest.id}) has {has}. Use a smaller model, a streaming recipe (rtn or fp8 only) or a "
        "larger worker",
        {"needs": {"peak_host_bytes": estimate.peak_host_bytes, "peak_gpu_bytes": estimate.peak_gpu_bytes},
         "largest_worker": {"id": largest.id, "ram_total_bytes": largest.ram_total_bytes,
                            "gpu_name": largest.gpu_name, "gpu_memory_bytes": largest.gpu_memory_bytes}},
    )


def _gb(size: int) -> str:
    return f"{size / GB:.1f} GB"
