import json
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import redis

from core.service.db.models import Model
from core.service.db.repositories import JobRuns, Jobs, Models
from core.service.db.session import session_scope
from tests.fixtures.environment import REDIS_URL

INT8 = {"type": "quantize", "method": "rtn", "bits": 8, "granularity": "per_channel", "symmetric": True}


def queued_job_ids(queue: str = "cpu") -> list[str]:
    messages = redis.Redis.from_url(REDIS_URL).lrange(queue, 0, -1)
    return [json.loads(json.loads(m)["headers"]["argsrepr"].replace("'", '"'))[0] for m in messages]


def test_submit_returns_202_with_location_and_enqueues_after_commit(client, auth, upload):
    model = upload()
    response = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [INT8]}, headers=auth)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["progress"] == 0 and job["queue"] == "cpu"
    assert [(s["index"], s["type"], s["status"]) for s in job["steps"]] == [(0, "quantize", "queued")]
    assert job["steps"][0]["config"]["granularity"] == "per_channel"
    assert queued_job_ids() == [job["id"]]
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["id"] == job["id"]


def test_invalid_recipe_is_422_listing_every_problem(client, auth, upload):
    model = upload()
    body = {"model_id": model["id"], "steps": [
        {"type": "quantize", "bits": 1},
        {"type": "prune-everything"},
        {"type": "quantize", "granularity": "per_atom", "surprise": 1},
    ]}
    response = client.post("/v1/jobs", json=body, headers=auth)
    assert response.status_code == 422
    fields = {p["field"] for p in response.json()["error"]["details"]}
    assert {"body.steps.0.quantize:rtn.bits", "body.steps.1", "body.steps.2.quantize:rtn.granularity",
            "body.steps.2.quantize:rtn.surprise"} <= fields
    assert client.get("/v1/jobs", headers=auth).json()["total"] == 0
    assert queued_job_ids() == []


def test_empty_recipe_and_unknown_model(client, auth):
    assert client.post("/v1/jobs", json={"model_id": "mdl_x", "steps": []}, headers=auth).status_code == 422
    missing = client.post("/v1/jobs", json={"model_id": "mdl_x", "steps": [INT8]}, headers=auth)
    assert missing.status_code == 404 and "mdl_x" in missing.json()["error"]["message"]


def test_idempotency_key_replays_or_conflicts(client, auth, upload):
    model = upload()
    body = {"model_id": model["id"], "steps": [INT8]}
    headers = {**auth, "Idempotency-Key": "retry-1"}
    first = client.post("/v1/jobs", json=body, headers=headers).json()
    again = client.post("/v1/jobs", json=body, headers=headers).json()
    assert again["id"] == first["id"]
    changed = client.post("/v1/jobs", json={**body, "steps": [{**INT8, "symmetric": False}]}, headers=headers)
    assert changed.status_code == 409 and changed.json()["error"]["code"] == "conflict"
    assert client.get("/v1/jobs", headers=auth).json()["total"] == 1


def test_cancel_a_queued_job_then_cancel_again_is_409(client, auth, upload):
    model = upload()
    job = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [INT8]}, headers=auth).json()
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert again.status_code == 409 and "cancelled" in again.json()["error"]["message"]


def test_list_filters_by_status_and_bounds_page_size(client, auth, upload):
    model = upload()
    ids = [client.post("/v1/jobs", json={"model_id": model["id"], "steps": [INT8]}, headers=auth).json()["id"]
           for _ in range(3)]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth)
    queued = client.get("/v1/jobs?status=queued", headers=auth).json()
    assert queued["total"] == 2 and {j["id"] for j in queued["items"]} == set(ids[1:])
    assert client.get("/v1/jobs?status=cancelled", headers=auth).json()["items"][0]["id"] == ids[0]
    assert client.get("/v1/jobs?page_size=1000000", headers=auth).status_code == 422
    assert client.get("/v1/jobs?status=exploded", headers=auth).status_code == 422


def test_model_with_an_active_job_cannot_be_deleted(client, auth, upload):
    model = upload()
    client.post("/v1/jobs", json={"model_id": model["id"], "steps": [INT8]}, headers=auth)
    response = client.delete(f"/v1/models/{model['id']}", headers=auth)
    assert response.status_code == 409


def test_export_that_cannot_hold_the_recipe_is_422_with_the_reason(client, auth, upload):
    model = upload()
    body = {"model_id": model["id"], "steps": [{"type": "quantize", "method": "kmeans"}],
            "export": ["compressed-tensors"]}
    response = client.post("/v1/jobs", json=body, headers=auth)
    assert response.status_code == 422
    assert "k-means codebook has no compressed-tensors format" in response.text
    assert queued_job_ids() == []


@pytest.mark.parametrize("step", [  # each was accepted here, then refused by the worker when defaults were stored
    {"type": "quantize", "method": "static", "observer": "mse"},
    {"type": "quantize", "method": "gptq", "granularity": "per_channel"},
    {"type": "prune", "method": "magnitude", "pattern": "1:4"},
    {"type": "distill", "epochs": 1},
])
def test_the_stored_recipe_validates_again_as_the_worker_reads_it(client, auth, upload, step):
    from core.compression.spec import JobSpec

    response = client.post("/v1/jobs", json={"model_id": upload()["id"], "steps": [step]}, headers=auth)
    assert response.status_code == 202, response.text
    stored = response.json()["steps"][0]["config"]
    assert stored == step
    JobSpec.model_validate({"steps": [stored]})


def test_unknown_query_parameters_are_refused_with_the_names(client, auth):
    response = client.get("/v1/jobs?pagesize=5&status=queued&colour=red", headers=auth)
    assert response.status_code == 422
    problems = {p["field"]: p for p in response.json()["error"]["details"]}
    assert set(problems) == {"query.pagesize", "query.colour"}
    assert "page_size" in problems["query.pagesize"]["message"]
    assert client.get("/v1/jobs?page_size=5&status=queued", headers=auth).status_code == 200
    assert client.get("/v1/models?unknown=1", headers=auth).status_code == 422


@pytest.mark.parametrize("key", ["", " ", "a b", "tab\there"])
def test_an_empty_or_blank_idempotency_key_is_422_not_a_key(client, auth, upload, key):
    model = upload()
    response = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [INT8]},
                           headers={**auth, "Idempotency-Key": key})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["field"] == "header.idempotency-key"
    assert client.get("/v1/jobs", headers=auth).json()["total"] == 0


def _in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(call()))
    thread.start()
    return thread, result


def test_a_delete_waits_for_a_submission_in_flight_then_is_409(client, auth, upload):
    model = upload()
    tenant_id = _tenant_of(model["id"])
    with session_scope() as submitting:  # a submission between its model check and its commit
        Models(submitting, tenant_id).get_for_new_job(model["id"])
        thread, deleted = _in_thread(lambda: client.delete(f"/v1/models/{model['id']}", headers=auth))
        thread.join(0.5)
        assert thread.is_alive(), "the delete must wait for the submission's lock"
        Jobs(submitting, tenant_id).add_job(model["id"], {"steps": [INT8]}, "cpu", None, None)
    thread.join(10)
    assert deleted[0].status_code == 409, deleted[0].text
    assert client.get(f"/v1/models/{model['id']}", headers=auth).status_code == 200


def test_a_submission_waits_for_a_delete_in_flight_then_is_404(client, auth, upload):
    model = upload()
    tenant_id = _tenant_of(model["id"])
    body = {"model_id": model["id"], "steps": [INT8]}
    with session_scope() as deleting:  # a delete between its active-jobs check and its commit
        assert Jobs(deleting, tenant_id).active_for_model(model["id"]) == 0
        thread, submitted = _in_thread(lambda: client.post("/v1/jobs", json=body, headers=auth))
        thread.join(0.5)
        assert thread.is_alive(), "the submission must wait for the delete's lock"
        models = Models(deleting, tenant_id)
        models.delete(models.get(model["id"]))
    thread.join(10)
    assert submitted[0].status_code == 404 and submitted[0].json()["error"]["code"] == "not_found"
    assert client.get("/v1/jobs", headers=auth).json()["total"] == 0


def test_concurrent_submit_and_delete_never_leave_a_job_without_its_model(client, auth, upload):
    for _ in range(6):
        model = upload()
        body = {"model_id": model["id"], "steps": [INT8]}
        submit, submitted = _in_thread(lambda b=body: client.post("/v1/jobs", json=b, headers=auth))
        delete, deleted = _in_thread(lambda m=model: client.delete(f"/v1/models/{m['id']}", headers=auth))
        submit.join(30), delete.join(30)
        outcome = (submitted[0].status_code, deleted[0].status_code)
        assert outcome in {(202, 409), (404, 204)}, (outcome, submitted[0].text, deleted[0].text)
    jobs = client.get("/v1/jobs", headers=auth, params={"page_size": 100}).json()["items"]
    assert all(job["model_id"] is not None for job in jobs)


def test_a_cancel_accepted_while_running_is_never_followed_by_succeeded(client, auth, upload):
    model = upload()
    job = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [INT8]}, headers=auth).json()
    with session_scope() as session:
        run = JobRuns(session).claim(job["id"], timedelta(seconds=60), 2)
    cancel = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert cancel.status_code == 200 and cancel.json()["status"] == "running" and cancel.json()["cancel_requested"]
    with session_scope() as session:  # the run had just finished its last step
        assert not JobRuns(session).succeed(run, {}, {"name": "m.zip", "storage_key": "artifacts/x/model.zip",
                                                      "sha256": "0" * 64, "size_bytes": 1})
    ended = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
    assert (ended["status"], ended["error"]["code"], ended["artifacts"]) == ("cancelled", "cancelled", [])


def _tenant_of(model_id: str) -> str:
    with session_scope() as session:
        return session.get(Model, model_id).tenant_id
