"""POST /v1/evaluations: an evaluation job with no steps, run by the worker's own code on the real database and
store; a model alone gets values with CIs, a job's artifact is compared with that job's original model (the same
numbers as the job's own `evaluate`), another tenant's ids are 404s, and what cannot work is refused up front."""

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from cli.stack import local_stack
from core.service.db.repositories import JobRuns
from core.service.db.session import session_scope
from core.service.storage import get_store
from tests.api.test_evaluation import INT8, choice_rows, upload_llama, upload_rows
from tests.api.test_evaluation import llama_zip as llama_zip  # noqa: F401 (the module's fixture)
from tests.api.test_evaluation import run_job as run_compression_job
from tests.fixtures.environment import E2E_BROKER_URL
from tests.fixtures.services import create_key, ended, wait_for
from worker import tasks

METRICS = ["perplexity", "accuracy"]


def run_worker(job_id: str, work: Path) -> None:
    """Run the queued job in this process as the worker does (claim, then `_execute`)."""
    with session_scope() as session:
        job = JobRuns(session).claim(job_id, timedelta(seconds=60), max_attempts=3)
        assert job is not None
        session.expunge(job)
    tasks._execute(job, get_store(), work)


def evaluate(client: TestClient, auth: dict[str, str], subject: dict[str, str], dataset_id: str,
             metrics: list[str] | None = None) -> Any:
    body = {**subject, "evaluate": {"dataset_id": dataset_id, "metrics": metrics or METRICS, "max_samples": 6}}
    return client.post("/v1/evaluations", json=body, headers=auth)


def test_a_model_alone_gets_each_metric_with_its_ci(client: TestClient, auth: dict[str, str], llama_zip: bytes,
                                                    tmp_path: Path) -> None:
    model_id, dataset_id = upload_llama(client, auth, llama_zip), upload_rows(client, auth, choice_rows())
    created = evaluate(client, auth, {"model_id": model_id}, dataset_id)
    assert created.status_code == 202, created.text
    evaluation_id = created.json()["id"]
    assert created.headers["Location"] == f"/v1/evaluations/{evaluation_id}"
    assert (created.json()["status"], created.json()["subject"]) == ("queued", {"model_id": model_id})
    run_worker(evaluation_id, tmp_path / "work")
    done = client.get(f"/v1/evaluations/{evaluation_id}", headers=auth).json()
    assert done["status"] == "succeeded", done
    result = done["result"]
    assert (result["dataset_id"], result["samples"], result["engine"]) == (dataset_id, 6, "in_memory")
    for name in METRICS:
        measured = result["metrics"][name]
        assert measured["ci95"][0] <= measured["value"] <= measured["ci95"][1] and "delta" not in measured
    as_job = client.get(f"/v1/jobs/{evaluation_id}", headers=auth).json()  # an ordinary job with no steps
    assert (as_job["status"], as_job["steps"], as_job["artifacts"]) == ("succeeded", [], [])
    page = client.get(f"/v1/jobs/{evaluation_id}/report", headers=auth).text  # its report: the values and CIs
    assert "<h2>Evaluation on your data</h2>" in page and "none (an evaluation)" in page
    assert "<h2>What each step cost</h2>" not in page


def test_a_jobs_artifact_is_compared_with_that_jobs_original(client: TestClient, auth: dict[str, str],
                                                             llama_zip: bytes, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    model_id, dataset_id = upload_llama(client, auth, llama_zip), upload_rows(client, auth, choice_rows())
    body = {"model_id": model_id, "steps": [INT8],
            "evaluate": {"dataset_id": dataset_id, "metrics": METRICS, "max_samples": 6}}
    job = run_compression_job(client, auth, body, tmp_path / "job", monkeypatch)
    assert job["status"] == "succeeded", job
    own = job["metrics"]["evaluation"]["metrics"]
    for index, subject in enumerate(({"job_id": job["id"]}, {"artifact_id": job["artifacts"][0]["id"]})):
        created = evaluate(client, auth, subject, dataset_id)
        assert created.status_code == 202, created.text
        assert created.json()["subject"] == {"model_id": model_id, "artifact_id": job["artifacts"][0]["id"],
                                             "job_id": job["id"]}
        run_worker(created.json()["id"], tmp_path / f"eval-{index}")
        done = client.get(f"/v1/evaluations/{created.json()['id']}", headers=auth).json()
        assert done["status"] == "succeeded", done
        for name in METRICS:  # the same original, artifact and rows as the job's own evaluation
            theirs = done["result"]["metrics"][name]
            for key in ("original", "artifact", "delta"):
                assert theirs[key] == pytest.approx(own[name][key], rel=1e-5, abs=1e-9), (name, key)
            assert theirs["ci95"] == pytest.approx(own[name]["ci95"], rel=1e-4, abs=1e-9)
        assert done["result"]["overlap"] == job["metrics"]["evaluation"]["overlap"]


def test_rows_that_the_artifacts_steps_calibrated_on_are_flagged(client: TestClient, auth: dict[str, str],
                                                                 llama_zip: bytes, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model_id, dataset_id = upload_llama(client, auth, llama_zip), upload_rows(client, auth, choice_rows())
    calibration = upload_rows(client, auth, [{"text": row["question"].lower()} for row in choice_rows()[:2]])
    gptq = {"type": "quantize", "method": "gptq", "bits": 8, "group_size": 32,
            "calibration": {"dataset_id": calibration, "num_samples": 2, "seq_len": 8}}
    job = run_compression_job(client, auth, {"model_id": model_id, "steps": [gptq]}, tmp_path / "job", monkeypatch)
    created = evaluate(client, auth, {"job_id": job["id"]}, dataset_id, ["accuracy"]).json()
    run_worker(created["id"], tmp_path / "eval")
    done = client.get(f"/v1/evaluations/{created['id']}", headers=auth).json()
    found = done["result"]["overlap"]
    assert (done["status"], found["count"], found["datasets"]) == ("succeeded", 2, [calibration]), done
    assert done["warnings"] == [found["warning"]] and "OVERLAP: 2 of 6" in found["warning"]


def test_another_tenants_subjects_are_404s(client: TestClient, auth: dict[str, str], other_auth: dict[str, str],
                                           llama_zip: bytes, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    model_id, dataset_id = upload_llama(client, auth, llama_zip), upload_rows(client, auth, choice_rows())
    job = run_compression_job(client, auth, {"model_id": model_id, "steps": [INT8]}, tmp_path / "job", monkeypatch)
    theirs = upload_rows(client, other_auth, choice_rows())
    subjects = [{"model_id": model_id}, {"job_id": job["id"]}, {"artifact_id": job["artifacts"][0]["id"]}]
    for subject in subjects:
        refused = evaluate(client, other_auth, subject, theirs)
        assert refused.status_code == 404, (subject, refused.text)
        assert evaluate(client, auth, subject, theirs).status_code == 404  # their dataset is a 404 to us
    mine = evaluate(client, auth, {"model_id": model_id}, dataset_id).json()["id"]
    assert client.get(f"/v1/evaluations/{mine}", headers=other_auth).status_code == 404
    assert client.get(f"/v1/evaluations/{job['id']}", headers=auth).status_code == 404  # a job, not an evaluation


def test_what_cannot_work_is_refused_before_a_job_exists(client: TestClient, auth: dict[str, str],
                                                         llama_zip: bytes, upload: Any) -> None:
    model_id, dataset_id = upload_llama(client, auth, llama_zip), upload_rows(client, auth, choice_rows())
    calibration = upload_rows(client, auth, [{"text": "calibration text number one"}, {"text": "and two"}])
    both = evaluate(client, auth, {"model_id": model_id, "job_id": "job_x"}, dataset_id)
    assert both.status_code == 422 and "exactly one of model_id, artifact_id, job_id" in both.text
    alone = evaluate(client, auth, {"model_id": model_id}, dataset_id, ["generation_agreement"])
    assert alone.status_code == 422 and "compare a model with its original" in alone.text
    unfit = evaluate(client, auth, {"model_id": upload()["id"]}, dataset_id, ["perplexity"])
    assert unfit.status_code == 422 and "do not fit BertModel" in unfit.text
    gptq = {"type": "quantize", "method": "gptq", "calibration": {"dataset_id": calibration}}
    queued = client.post("/v1/jobs", json={"model_id": model_id, "steps": [gptq]}, headers=auth).json()
    no_artifact = evaluate(client, auth, {"job_id": queued["id"]}, dataset_id)
    assert no_artifact.status_code == 409 and "has no artifact" in no_artifact.text
    same_data = evaluate(client, auth, {"job_id": queued["id"]}, calibration)
    assert same_data.status_code == 422 and "steps calibrated or trained on" in same_data.text
    assert client.get("/v1/jobs", headers=auth).json()["total"] == 1  # only the compression job


@pytest.mark.e2e
@pytest.mark.slow
def test_an_evaluation_of_a_jobs_artifact_runs_on_a_real_worker(database_url: str, llama_zip: bytes,
                                                                tmp_path: Path) -> None:
    """uvicorn and a Celery worker over HTTP: compress, evaluate the job's artifact, read the report."""
    env = {"MCS_BROKER_URL": E2E_BROKER_URL, "MCS_ARTIFACT_DIR": str(tmp_path / "artifacts")}
    with local_stack(env, tmp_path / "logs") as url:
        key = create_key(database_url, "e2e-evaluations")
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            files = {"file": ("llama.zip", llama_zip, "application/zip")}
            model_id = client.post("/v1/models", files=files, data={"name": "llama"}).json()["id"]
            rows = "\n".join(json.dumps(row) for row in choice_rows()).encode()
            dataset_id = client.post("/v1/datasets", files={"file": ("eval.jsonl", rows, "text/plain")}).json()["id"]
            job_id = client.post("/v1/jobs", json={"model_id": model_id, "steps": [INT8]}).json()["id"]
            assert wait_for(client, job_id, ended)["status"] == "succeeded"
            created = evaluate(client, {}, {"job_id": job_id}, dataset_id)  # the same helper over real HTTP
            assert created.status_code == 202, created.text
            evaluation = wait_for(client, created.json()["id"], ended)
            assert evaluation["status"] == "succeeded" and evaluation["steps"] == [], evaluation
            result = client.get(f"/v1/evaluations/{created.json()['id']}").json()["result"]
            ppl = result["metrics"]["perplexity"]
            assert ppl["ci95"][0] <= ppl["delta"] <= ppl["ci95"][1] and abs(ppl["ratio"] - 1) < 0.02
            page = client.get(f"/v1/jobs/{job_id}/report")
            assert page.status_code == 200 and "<h2>What each step cost</h2>" in page.text
