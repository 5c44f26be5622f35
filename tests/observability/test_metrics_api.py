"""`/metrics`, request ids and `/readyz` on the real app (in process) over the suite's PostgreSQL and Redis."""

import json
import logging

from fastapi.testclient import TestClient

from cli.stack import free_port
from core.service.logs import JsonFormatter, bound, redact
from core.service.settings import get_settings
from tests.observability.helpers import label_values, value
from tests.storage.helpers import AWS_ENV


def test_metrics_move_with_requests_by_route_template(client, auth, upload):
    before = client.get("/metrics")
    assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
    model = upload()
    client.get(f"/v1/models/{model['id']}", headers=auth)
    client.get("/v1/models/mdl_doesnotexist", headers=auth)
    after = client.get("/metrics").text

    route = {"method": "GET", "route": "/v1/models/{model_id}"}
    assert value(after, "mcs_http_requests_total", **route, status="200") == \
        value(before.text, "mcs_http_requests_total", **route, status="200") + 1
    assert value(after, "mcs_http_requests_total", **route, status="404") >= 1
    assert value(after, "mcs_http_request_duration_seconds_count", **route, status="200") >= 1
    assert value(after, "mcs_uploaded_bytes_total", route="/v1/models") > \
        value(before.text, "mcs_uploaded_bytes_total", route="/v1/models")
    assert value(after, "mcs_jobs", state="queued", queue="cpu") == 0  # read from the database at scrape time
    assert value(after, "mcs_metrics_source_up", source="database") == 1
    assert value(after, "mcs_metrics_source_up", source="broker") == 1
    assert 'mcs_queue_depth{queue="cpu"}' in after


def test_no_tenant_key_or_row_ids_in_labels(client, auth, upload, db):
    model = upload()
    submitted = client.post("/v1/jobs", headers=auth, json={"model_id": model["id"], "steps": [
        {"type": "quantize", "method": "rtn", "bits": 8}]})
    assert submitted.status_code == 202, submitted.text
    client.get(f"/v1/jobs/{submitted.json()['id']}", headers=auth)
    client.get("/v1/jobs/job_unknown", headers={"Authorization": "Bearer mcs_notakeyatall"})  # 401 before routing
    client.get("/wp-admin/setup.php")  # a scanner's path
    client.get("/openapi.json")  # one of Starlette's own routes
    text = client.get("/metrics").text

    key = auth["Authorization"].removeprefix("Bearer ")
    for secret_or_id in (key, key[:12], "alice", model["id"], submitted.json()["id"], "job_unknown", "wp-admin"):
        assert secret_or_id not in text
    assert not any(v.startswith(("mcs_", "ten_", "mdl_", "job_")) for v in label_values(text))
    assert value(text, "mcs_jobs", state="queued", queue="cpu") == 1
    assert value(text, "mcs_http_requests_total", route="/v1/jobs/{job_id}", status="401") >= 1
    assert value(text, "mcs_http_requests_total", route="unmatched", status="404") >= 1
    assert value(text, "mcs_http_requests_total", route="/openapi.json", status="200") >= 1


def test_metrics_token(db, monkeypatch):
    from api.main import create_app

    monkeypatch.setenv("MCS_METRICS_TOKEN", "s3cret-scrape-token")
    get_settings.cache_clear()
    try:
        with TestClient(create_app()) as client:
            assert client.get("/metrics").status_code == 401
            wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
            right = client.get("/metrics", headers={"Authorization": "Bearer s3cret-scrape-token"})
            assert right.status_code == 200 and "mcs_http_requests_total" in right.text
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def test_request_id_is_echoed_or_made(client):
    assert client.get("/healthz", headers={"X-Request-ID": "req-abc.123"}).headers["X-Request-ID"] == "req-abc.123"
    made = client.get("/healthz").headers["X-Request-ID"]
    assert len(made) == 32 and made != client.get("/healthz").headers["X-Request-ID"]
    hostile = client.get("/healthz", headers={"X-Request-ID": "x\" injected=1 " + "y" * 300})
    assert hostile.headers["X-Request-ID"] != "x" and len(hostile.headers["X-Request-ID"]) == 32
    unauthorized = client.get("/v1/jobs", headers={"X-Request-ID": "refused-1"})
    assert unauthorized.status_code == 401 and unauthorized.headers["X-Request-ID"] == "refused-1"


def test_readyz_names_an_object_store_that_is_down(client, monkeypatch):
    """The store's endpoint is a closed port: the API answers 503 within the check's time, naming the store."""
    monkeypatch.setenv("MCS_ARTIFACT_URL", "s3://mcs-down/prefix")
    monkeypatch.setenv("MCS_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    for name, setting in AWS_ENV.items():
        monkeypatch.setenv(name, setting)
    get_settings.cache_clear()
    try:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"status": "unavailable", "checks": {"database": True, "broker": True, "store": False}}
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert client.get("/readyz").json()["checks"]["store"] is True  # the local folder is writable


def test_json_lines_carry_context_and_never_secrets():
    key = "mcs_" + "A1b2C3d4" * 5
    presigned = "https://s3.example/b/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F&X-Amz-Signature=deadbeef99"
    record = logging.LogRecord("t", logging.WARNING, __file__, 1, "key %s url %s auth %s", None, None)
    record.args = (key, presigned, "Bearer other-token")
    with bound(request_id="r-1", tenant_id="ten_x", job_id="job_y", step="0:quantize/rtn"):
        line = JsonFormatter("api").format(record)
    parsed = json.loads(line)
    assert {k: parsed[k] for k in ("request_id", "tenant_id", "job_id", "step", "level", "process")} == {
        "request_id": "r-1", "tenant_id": "ten_x", "job_id": "job_y", "step": "0:quantize/rtn",
        "level": "warning", "process": "api"}
    for secret in (key, key[:12], "deadbeef99", "AKIA", "other-token"):
        assert secret not in line
    assert redact("nothing to hide here") == "nothing to hide here"

