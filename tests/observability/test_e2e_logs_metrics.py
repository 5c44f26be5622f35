"""End to end: a real API process and a real Celery worker process (PostgreSQL + Redis) run an upload, a job and a
download. Then the API's /metrics shows the job's step and job durations (observed by the worker's pool process),
the requests by route, the bytes both ways, jobs by state and the live worker; and the logs of both processes are
JSON lines that carry request, tenant, job and step ids, and never the API key."""

import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from cli.stack import free_port, local_stack
from tests.e2e.test_service import wait_for
from tests.fixtures.api import zip_folder
from tests.fixtures.environment import E2E_BROKER_URL
from tests.fixtures.services import create_key
from tests.models import save_model_folder, tiny_llama
from tests.observability.helpers import label_values, value

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
INT8 = {"type": "quantize", "method": "rtn", "bits": 8}


def json_lines(log: Path) -> list[dict]:
    """The log's JSON lines (Celery's start banner is plain text on stdout)."""
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def scrape_until(url: str, done: Callable[[str], bool], timeout_s: float = 15) -> str:
    """The worker observes a job's duration just after it records the job's end, and the API counts a request's
    bytes just after it sent them: a scrape that follows at once may come before either."""
    deadline = time.monotonic() + timeout_s
    while not done(text := httpx.get(url).text) and time.monotonic() < deadline:
        time.sleep(0.2)
    return text


def test_metrics_and_logs_of_an_end_to_end_run(database_url, tmp_path):
    worker_port = free_port()
    env = {"MCS_BROKER_URL": E2E_BROKER_URL, "MCS_ARTIFACT_DIR": str(tmp_path / "artifacts"),
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"), "MCS_WORKER_METRICS_PORT": str(worker_port)}
    (tmp_path / "metrics").mkdir()
    key = create_key(database_url, "obs-e2e")
    logs = tmp_path / "logs"
    with local_stack(env, logs) as url, httpx.Client(base_url=url, timeout=60) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        archive = zip_folder(save_model_folder(tiny_llama(), tmp_path / "llama"))
        model = client.post("/v1/models", files={"file": ("m.zip", archive, "application/zip")}).json()
        submitted = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [INT8]},
                                headers={"X-Request-ID": "obs-submit-1"})
        assert submitted.status_code == 202 and submitted.headers["X-Request-ID"] == "obs-submit-1"
        job = wait_for(client, submitted.json()["id"])
        assert job["status"] == "succeeded", job["error"]
        artifact = client.get(f"/v1/artifacts/{job['artifacts'][0]['id']}")
        assert artifact.status_code == 200
        client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}x"})  # a mistyped key: 401, not logged
        text = scrape_until(f"{url}/metrics", lambda text: value(text, "mcs_job_duration_seconds_count") >= 1 and
                            value(text, "mcs_downloaded_bytes_total") >= len(artifact.content))
        on_worker = httpx.get(f"http://127.0.0.1:{worker_port}/metrics").text  # a worker host's own endpoint

    assert value(text, "mcs_step_duration_seconds_count", step="quantize", method="rtn") == 1
    assert value(text, "mcs_step_duration_seconds_sum", step="quantize", method="rtn") > 0
    assert value(text, "mcs_job_duration_seconds_count", queue="cpu", outcome="succeeded") == 1
    assert value(on_worker, "mcs_step_duration_seconds_count", step="quantize", method="rtn") == 1
    assert value(text, "mcs_http_requests_total", method="POST", route="/v1/jobs", status="202") == 1
    assert value(text, "mcs_http_request_duration_seconds_count", route="/v1/jobs/{job_id}", status="200") >= 1
    assert value(text, "mcs_uploaded_bytes_total", route="/v1/models") >= len(archive)
    assert value(text, "mcs_downloaded_bytes_total") == len(artifact.content)
    assert value(text, "mcs_jobs", state="succeeded", queue="cpu") >= 1
    assert value(text, "mcs_workers_live", queue="cpu") >= 1
    assert 0 <= value(text, "mcs_worker_heartbeat_age_seconds", queue="cpu") < 120
    assert value(text, "mcs_queue_depth", queue="cpu") == 0
    for private in (key, key[:12], model["id"], job["id"], "obs-e2e"):
        assert private not in text
    assert not any(v.startswith(("mcs_", "ten_", "mdl_", "job_")) for v in label_values(text))

    api_log, worker_log = (logs / "api.log").read_text(), (logs / "worker.log").read_text()
    for secret in (key, key[:12]):
        assert secret not in api_log and secret not in worker_log
    api, worker = json_lines(logs / "api.log"), json_lines(logs / "worker.log")
    submit = [line for line in api if line.get("route") == "/v1/jobs" and line.get("method") == "POST"]
    assert [line["request_id"] for line in submit] == ["obs-submit-1"] and submit[0]["status"] == 202
    tenant = submit[0]["tenant_id"]
    assert tenant.startswith("ten_") and all(line["request_id"] for line in api if line["logger"] == "mcs.access")
    refused = [line for line in api if line.get("status") == 401]
    assert refused and "tenant_id" not in refused[0]
    of_job = [line for line in worker if line.get("job_id") == job["id"]]
    assert any(line.get("step") == "0:quantize/rtn" for line in of_job)
    assert {line.get("tenant_id") for line in of_job if "step" in line} == {tenant}
