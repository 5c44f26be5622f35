"""A job with `evaluate`: refused at submission when it cannot work (metric vs model kind, someone else's dataset, the
calibration dataset itself), run by the worker on the tenant's uploaded JSONL, with every delta and its CI in the
job's metrics, on both the in-memory and the layer-by-layer engine; overlap with calibration text flagged."""

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.service.db.repositories import JobRuns
from core.service.db.session import session_scope
from core.service.settings import get_settings
from core.service.storage import get_store
from tests.core.test_evaluate import CHOICE_ROWS, untied_llama
from tests.fixtures.api import zip_folder
from tests.models import save_model_folder, tiny_tokenizer
from worker import tasks

INT8 = {"type": "quantize", "method": "rtn", "bits": 8}
CAUSAL = ["perplexity", "accuracy", "generation_agreement"]


@pytest.fixture(scope="module")
def llama_zip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    folder = save_model_folder(untied_llama(), tmp_path_factory.mktemp("llama"))
    tiny_tokenizer().save_pretrained(folder)
    return zip_folder(folder)


def upload_llama(client: TestClient, auth: dict[str, str], llama_zip: bytes) -> str:
    files = {"file": ("tiny-llama.zip", llama_zip, "application/zip")}
    response = client.post("/v1/models", files=files, data={"name": "tiny-llama"}, headers=auth)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def upload_rows(client: TestClient, auth: dict[str, str], rows: list[dict[str, Any]]) -> str:
    payload = "\n".join(json.dumps(row) for row in rows).encode()
    response = client.post("/v1/datasets", files={"file": ("eval.jsonl", payload, "application/octet-stream")},
                           headers=auth)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def choice_rows() -> list[dict[str, Any]]:
    """The multiple-choice rows as a user uploads them (no `text`: the question is the text)."""
    return [{key: row[key] for key in ("question", "choices", "answer")} for row in CHOICE_ROWS]


def run_job(client: TestClient, auth: dict[str, str], body: dict[str, Any], work: Path,
            monkeypatch: pytest.MonkeyPatch, stream_above_bytes: int | None = None) -> dict[str, Any]:
    """Submit the job and run it in this process as the worker does; the job's JSON once it ended."""
    response = client.post("/v1/jobs", json=body, headers=auth)
    assert response.status_code == 202, response.text
    with session_scope() as session:
        job = JobRuns(session).claim(response.json()["id"], timedelta(seconds=60), max_attempts=3)
        session.expunge(job)
    settings = get_settings().model_copy(update={"stream_above_bytes": stream_above_bytes})
    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    tasks._execute(job, get_store(), work)
    return client.get(f"/v1/jobs/{job.id}", headers=auth).json()


def test_a_job_reports_every_delta_with_its_ci_on_both_engines(client: TestClient, auth: dict[str, str],
                                                               llama_zip: bytes, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    model_id, dataset_id = upload_llama(client, auth, llama_zip), upload_rows(client, auth, choice_rows())
    body = {"model_id": model_id, "steps": [INT8],
            "evaluate": {"dataset_id": dataset_id, "metrics": CAUSAL, "max_samples": 5}}
    in_memory = run_job(client, auth, body, tmp_path / "a", monkeypatch)
    streamed = run_job(client, auth, body, tmp_path / "b", monkeypatch, stream_above_bytes=0)
    assert (in_memory["status"], streamed["status"]) == ("succeeded", "succeeded"), (in_memory, streamed)
    assert (in_memory["metrics"]["engine"], streamed["metrics"]["engine"]) == ("in_memory", "layer_by_layer")
    for job in (in_memory, streamed):
        evaluation = job["metrics"]["evaluation"]
        assert (evaluation["dataset_id"], evaluation["samples"]) == (dataset_id, 5)
        assert evaluation["overlap"]["count"] == 0 and evaluation["overlap"]["compared_with"] == []
        for name in CAUSAL:
            measured = evaluation["metrics"][name]
            assert measured["delta"] == pytest.approx(measured["artifact"] - measured["original"])
            assert measured["ci95"][0] <= measured["ci95"][1] and measured["n"] >= 1 and measured["note"]
        assert evaluation["metrics"]["accuracy"]["n"] == 5
    # int8 barely moves a tiny model; both engines measure the same original and the same artifact
    for name in CAUSAL:
        ours = in_memory["metrics"]["evaluation"]["metrics"][name]
        theirs = streamed["metrics"]["evaluation"]["metrics"][name]
        assert theirs["original"] == pytest.approx(ours["original"], rel=1e-5)
        assert theirs["artifact"] == pytest.approx(ours["artifact"], rel=1e-5)
    assert abs(in_memory["metrics"]["evaluation"]["metrics"]["perplexity"]["ratio"] - 1) < 0.02


def test_submission_refuses_what_cannot_be_evaluated(client: TestClient, auth: dict[str, str],
                                                     other_auth: dict[str, str], llama_zip: bytes,
                                                     upload: Any) -> None:
    llama, bert = upload_llama(client, auth, llama_zip), upload()["id"]
    ours, theirs = upload_rows(client, auth, choice_rows()), upload_rows(client, other_auth, choice_rows())

    def submit(model_id: str, steps: list[dict[str, Any]], evaluate: dict[str, Any]) -> Any:
        return client.post("/v1/jobs", json={"model_id": model_id, "steps": steps, "evaluate": evaluate},
                           headers=auth)

    unfit = submit(bert, [INT8], {"dataset_id": ours, "metrics": ["perplexity"]})
    assert unfit.status_code == 422 and "perplexity do not fit BertModel" in unfit.json()["error"]["message"]
    assert submit(llama, [INT8], {"dataset_id": theirs, "metrics": ["accuracy"]}).status_code == 404
    unknown = submit(llama, [INT8], {"dataset_id": ours, "metrics": ["bleu"]})
    assert unknown.status_code == 422 and "evaluate.metrics" in unknown.text
    gptq = {"type": "quantize", "method": "gptq", "calibration": {"dataset_id": ours}}
    same = submit(llama, [gptq], {"dataset_id": ours, "metrics": ["perplexity"]})
    assert same.status_code == 422 and f"{ours!r} is also a dataset the steps calibrate" in same.text
    assert client.get("/v1/jobs", headers=auth).json()["total"] == 0


@pytest.mark.parametrize(("stream_above_bytes", "engine"), [(None, "in_memory"), (0, "offloaded")])
def test_evaluation_text_that_is_also_calibration_text_is_flagged(client: TestClient, auth: dict[str, str],
                                                                  llama_zip: bytes, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  stream_above_bytes: int | None, engine: str) -> None:
    model_id = upload_llama(client, auth, llama_zip)
    calibration = upload_rows(client, auth, [{"text": row["question"].upper() + "  "} for row in CHOICE_ROWS[:3]])
    evaluation = upload_rows(client, auth, choice_rows())
    gptq = {"type": "quantize", "method": "gptq", "bits": 8, "group_size": 32,
            "calibration": {"dataset_id": calibration, "num_samples": 2, "seq_len": 8}}
    body = {"model_id": model_id, "steps": [gptq], "evaluate": {"dataset_id": evaluation, "metrics": ["accuracy"]}}
    job = run_job(client, auth, body, tmp_path / "work", monkeypatch, stream_above_bytes)
    assert (job["status"], job["metrics"]["engine"]) == ("succeeded", engine), job
    assert job["metrics"]["evaluation"]["metrics"]["accuracy"]["n"] == 6
    found = job["metrics"]["evaluation"]["overlap"]
    assert (found["count"], found["fraction"], found["datasets"]) == (3, 0.5, [calibration])
    assert job["metrics"]["warnings"] == [found["warning"]] and "OVERLAP: 3 of 6" in found["warning"]


def test_multiple_choice_and_sts_rows_are_validated_on_upload(client: TestClient, auth: dict[str, str]) -> None:
    def post(row: dict[str, Any]) -> Any:
        return client.post("/v1/datasets", files={"file": ("d.jsonl", json.dumps(row).encode(), "text/plain")},
                           headers=auth)

    def refusal(row: dict[str, Any]) -> str:
        response = post(row)
        assert response.status_code == 400, response.text
        return response.json()["error"]["message"]

    assert post({"question": "q?", "choices": ["a", "b"], "answer": "b"}).status_code == 201
    assert '"answer" must be the index' in refusal({"question": "q?", "choices": ["a", "b"], "answer": 2})
    assert "list of 2 to 64" in refusal({"question": "q?", "choices": ["a"], "answer": 0})
    assert 'numeric "score"' in refusal({"text": "a", "text_pair": "b", "score": "high"})
