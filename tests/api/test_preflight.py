"""Pre-flight at submission: a job that no live worker of its queue can hold is refused (422) before it exists."""

import json
import math
import os
import time
from datetime import timedelta

import redis
from sqlalchemy import update

from core.compression.configs.quantize import QuantizeGPTQ
from core.compression.estimate import ModelFacts, estimate_job
from core.service.capacity import time_limits
from core.service.db.models import Job, Model, Worker, utcnow
from core.service.db.repositories import Workers
from core.service.db.session import session_scope
from core.service.settings import Settings
from tests.api.test_jobs import INT8, queued_job_ids
from tests.fixtures.environment import REDIS_URL
from worker.celery_app import app, send_options, visibility_timeout

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
    fixed = Settings(job_max_hard_time_limit_s=0)  # the operator's way back to fixed limits
    assert time_limits(10**6, fixed) == (fixed.job_soft_time_limit_s, fixed.job_hard_time_limit_s)


def test_limits_follow_the_estimate_by_default() -> None:
    assert "MCS_JOB_MAX_HARD_TIME_LIMIT_S" not in os.environ
    settings = Settings()
    assert settings.job_max_hard_time_limit_s == 48 * 3600
    gptq_70b_on_cpu = estimate_job(ModelFacts(70 * GB, 140 * GB), [QuantizeGPTQ], "cpu", 2 * 1024**3)
    assert time_limits(gptq_70b_on_cpu.seconds, settings)[1] == math.ceil(2 * gptq_70b_on_cpu.seconds)


def test_a_long_job_is_sent_with_its_raised_limits_by_default(client, auth, upload):
    model = upload()
    with session_scope() as session:  # the row of a 7B model: a gptq on it is estimated at about 2 hours on a CPU
        session.execute(update(Model).where(Model.id == model["id"]).values(num_parameters=7 * GB))
    status, job = submit(client, auth, model["id"], {"type": "quantize", "method": "gptq"})
    assert status == 202, job
    estimate = job["estimate"]
    assert estimate["seconds"] > Settings().job_soft_time_limit_s
    assert estimate["hard_time_limit_s"] == math.ceil(2 * estimate["seconds"]) > Settings().job_hard_time_limit_s
    assert queued_time_limits() == [[estimate["hard_time_limit_s"], estimate["soft_time_limit_s"]]]


def queued_time_limits(queue_name: str = "cpu") -> list[list[int | None]]:
    """The (hard, soft) limits each message on the queue carries (Celery's `timelimit` header)."""
    return [json.loads(m)["headers"]["timelimit"] for m in redis.Redis.from_url(REDIS_URL).lrange(queue_name, 0, -1)]


def test_only_a_raised_limit_travels_with_the_message() -> None:
    settings = Settings()
    default = settings.job_hard_time_limit_s
    assert send_options(Job(queue="cpu", estimate=None), settings) == {"queue": "cpu"}
    short = Job(queue="cpu", estimate={"soft_time_limit_s": 1, "hard_time_limit_s": default})
    assert send_options(short, settings) == {"queue": "cpu"}
    raised = Job(queue="gpu", estimate={"soft_time_limit_s": 9 * default, "hard_time_limit_s": 10 * default})
    assert send_options(raised, settings) == {"queue": "gpu", "soft_time_limit": 9 * default,
                                              "time_limit": 10 * default}


def test_the_visibility_timeout_follows_the_cap() -> None:
    assert app.conf.broker_transport_options["visibility_timeout"] == int(1.1 * 48 * 3600)
    assert visibility_timeout(Settings(job_max_hard_time_limit_s=7 * 86400)) == int(1.1 * 7 * 86400)
    assert visibility_timeout(Settings(job_max_hard_time_limit_s=0)) == int(1.1 * 3600)  # off: the fixed limit


def test_a_calibrated_job_on_a_big_model_is_estimated_one_block_at_a_time(client, auth, upload):
    """The upload stores the model's block shape; a gptq job on weights over MCS_STREAM_ABOVE_BYTES is estimated on
    the block-offloading engine, far below what the in-memory engine would need for the same model."""
    model = upload()
    with session_scope() as session:
        stored = session.get(Model, model["id"])
        assert stored.block_shape is not None and stored.block_shape["count"] == 2  # tiny_bert's two layers
        # as if it were a 7B model: the in-memory engine would need ~50 GB
        stored.num_parameters, stored.size_bytes = 7 * GB, 14 * GB
    add_worker("celery@16gb", 16 * GB)
    gptq = {"type": "quantize", "method": "gptq", "bits": 4, "granularity": "per_group", "group_size": 32}
    status, job = submit(client, auth, model["id"], gptq)
    assert status == 202, job
    assert job["estimate"]["engine"] == "offloaded" and job["estimate"]["peak_host_bytes"] < 2 * GB
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["estimate"]["engine"] == "offloaded"
