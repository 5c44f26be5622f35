"""Pre-flight at submission: a job that no live worker of its queue can hold is refused (422) before it exists."""

import time
from datetime import timedelta

from sqlalchemy import update

from api import queue
from core.compression.configs.quantize import QuantizeGPTQ
from core.compression.estimate import ModelFacts, estimate_job
from core.service.capacity import time_limits
from core.service.db.models import Job, Worker, utcnow
from core.service.db.repositories import Workers
from core.service.db.session import session_scope
from core.service.settings import Settings
from tests.api.test_jobs import INT8, queued_job_ids
from worker.celery_app import app

GB = 1_000_000_000
DISTILL = {"type": "distill", "teacher": "original", "max_steps": 1}


def add_worker(name: str, ram_bytes: int, queues: tuple[str, ...] = ("cpu",), age_s: float = 0.0) -> None:
    with session_scope() as session:
        Workers(session).report(name, list(queues), ram_bytes, ram_bytes // 2, None, None)
        if age_s:
            session.execute(update(Worker).where(Worker.id == name)
                            .values(heartbeat_at=utcnow() - timedelta(seconds=age_s)))


def submit(client, auth, model_id: str, *steps: dict) -> tuple[int, dict]:
    response = client.post("/v1/jobs", json={"model_id": model_id, "steps": list(steps)}, headers=auth)
    return response.status_code, response.json()


def test_a_job_too_big_for_every_live_worker_is_422_naming_need_and_capacity(client, auth, upload):
    model = upload()
    add_worker("celery@small", 1000)
    add_worker("celery@larger", 2000)
    started = time.monotonic()
    status, body = submit(client, auth, model["id"], INT8)
    assert time.monotonic() - started < 1.0
    assert status == 422, body
    message = body["error"]["message"]
    assert "host RAM" in message and "celery@larger" in message and "0.0 GB of RAM" in message
    details = body["error"]["details"]
    assert details["needs"]["peak_host_bytes"] > 2000
    assert details["largest_worker"] == {"id": "celery@larger", "ram_total_bytes": 2000, "gpu_name": None,
                                         "gpu_memory_bytes": None}
    assert client.get("/v1/jobs", headers=auth).json()["total"] == 0 and queued_job_ids() == []


def test_a_job_one_worker_can_hold_is_accepted_with_its_estimate(client, auth, upload):
    model = upload()
    add_worker("celery@small", 1000)
    add_worker("celery@big", 64 * GB)
    status, job = submit(client, auth, model["id"], INT8)
    assert status == 202, job
    estimate = job["estimate"]
    assert 0 < estimate["peak_host_bytes"] < 64 * GB and estimate["engine"] == "in_memory"
    assert estimate["peak_gpu_bytes"] == 0 and estimate["seconds"] > 0
    assert estimate["soft_time_limit_s"] < estimate["hard_time_limit_s"]
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["estimate"] == estimate


def test_no_live_worker_accepts_and_says_so(client, auth, upload):
    model = upload()
    add_worker("celery@gone", 1000, age_s=3600)  # stale: ignored
    add_worker("celery@gpu-only", 1000, queues=("gpu",))  # another queue: ignored
    status, job = submit(client, auth, model["id"], INT8)
    assert status == 202, job
    assert any("no live worker of queue 'cpu'" in note for note in job["estimate"]["notes"])


def test_a_training_step_beyond_every_worker_is_refused_where_rtn_fits(client, auth, upload):
    model = upload()
    status, fitting = submit(client, auth, model["id"], INT8)
    assert status == 202, fitting
    add_worker("celery@only", fitting["estimate"]["peak_host_bytes"] + 1)
    status, body = submit(client, auth, model["id"], DISTILL)
    assert status == 422 and "celery@only" in body["error"]["message"], body


def test_time_limits_follow_a_long_estimate_within_the_cap() -> None:
    settings = Settings(job_soft_time_limit_s=3240, job_hard_time_limit_s=3600, job_max_hard_time_limit_s=86400)
    assert time_limits(60, settings) == (3240, 3600)  # a short job keeps the operator's limits
    gptq_7b_on_cpu = estimate_job(ModelFacts(7_000_000_000, 14_000_000_000), [QuantizeGPTQ], "cpu", 2 * 1024**3)
    soft, hard = time_limits(gptq_7b_on_cpu.seconds, settings)
    assert hard >= 2 * gptq_7b_on_cpu.seconds > 3600 and soft == int(0.9 * hard)
    assert time_limits(10**6, settings) == (int(0.9 * 86400), 86400)
    assert time_limits(10**6, Settings()) == (Settings().job_soft_time_limit_s, Settings().job_hard_time_limit_s)


def test_only_a_raised_limit_travels_with_the_message() -> None:
    default = app.conf.task_time_limit
    assert queue.time_limits(Job(estimate=None)) == {}
    assert queue.time_limits(Job(estimate={"soft_time_limit_s": 1, "hard_time_limit_s": default})) == {}
    raised = Job(estimate={"soft_time_limit_s": 9 * default, "hard_time_limit_s": 10 * default})
    assert queue.time_limits(raised) == {"soft_time_limit": 9 * default, "time_limit": 10 * default}
