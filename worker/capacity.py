"""The worker's capacity heartbeat: its RAM, GPU and the runtimes it can time jobs on, upserted into `workers` at
start and on every sweep, so that submission can refuse a job that no live worker of its queue can hold or time
(`core.service.capacity`)."""

import logging
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

import psutil
from celery.signals import worker_ready

from core.compression.runtime_rules import installed_runtimes
from core.service.db.repositories import Workers
from core.service.db.session import session_scope

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerIdentity:
    hostname: str
    queues: list[str]


# set once the worker is ready (the Celery hostname and the queues it consumes are known only then)
IDENTITY: list[WorkerIdentity] = []


@worker_ready.connect
def report_at_start(sender: Any, **_: Any) -> None:
    # the job queues it serves: every worker also takes webhook deliveries and model imports, which need no capacity
    from worker.celery_app import IMPORT_QUEUE, WEBHOOK_QUEUE

    queues = sorted(name for name in sender.app.amqp.queues.consume_from if name not in (WEBHOOK_QUEUE, IMPORT_QUEUE))
    IDENTITY[:] = [WorkerIdentity(str(sender.hostname), queues)]
    report_capacity()


def report_capacity() -> bool:
    """Upsert this worker's row; False (logged) when the worker is not ready yet or the database is down."""
    if not IDENTITY:
        return False
    try:
        _report(IDENTITY[0])
        return True
    except Exception as exc:  # the database is down: the next sweep reports again
        log.warning("could not report worker capacity: %s", exc)
        return False


def _report(identity: WorkerIdentity) -> None:
    memory = psutil.virtual_memory()
    gpu_name, gpu_bytes = _gpu()
    with session_scope() as session:
        Workers(session).report(identity.hostname, identity.queues, int(memory.total), int(memory.available),
                                gpu_name, gpu_bytes, installed_runtimes())


def _gpu() -> tuple[str | None, int | None]:
    """The first GPU's name and memory, from nvidia-smi: torch.cuda would create a CUDA context in this main
    process, which the forked pool processes that run jobs could then not use."""
    if shutil.which("nvidia-smi") is None:
        return None, None
    query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]
    try:
        first = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()[0]
        name, mebibytes = first.rsplit(",", 1)
        return name.strip(), int(mebibytes.strip()) * 1024**2
    except (OSError, subprocess.SubprocessError, IndexError, ValueError) as exc:
        log.warning("could not read the GPU's memory: %s", exc)
        return None, None
