"""POST /v1/searches: a search to a quality budget runs its trials as ordinary jobs (the worker's own code, on the
real database, store and broker), records every one, keeps the smallest recipe that met the constraint, uses trial
0's sensitivity scan in later trials, cancels its trials when cancelled, and draws its report."""

import json
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api import queue
from cli.stack import local_stack
from core.errors import InvalidSpec
from core.service.db.models import Job
from core.service.db.repositories import JobRuns
from core.service.db.session import session_scope
from core.service.searches import _check_trial, advance_running_searches
from core.service.settings import get_settings
from core.service.storage import get_store
from tests.fixtures.api import zip_folder
from tests.fixtures.environment import E2E_BROKER_URL
from tests.fixtures.services import create_key
from tests.models import PROBE_SENTENCES, save_model_folder, tiny_llama, tiny_tokenizer
from worker import tasks

# rtn only (no calibration), two widths, one group size: a space the tiny model runs in seconds
SPACE = {"methods": ["rtn"], "bits": [2, 8], "group_sizes": [32], "symmetric": [True], "presets": [],
         "max_protect_share": 0.3, "scan_calibration": {"num_samples": 2, "seq_len": 16}}


@pytest.fixture(scope="module")
def llama_zip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    folder = save_model_folder(tiny_llama(), tmp_path_factory.mktemp("llama"))
    tiny_tokenizer().save_pretrained(folder)
    return zip_folder(folder)


def text_rows() -> list[dict[str, str]]:
    return [{"text": " ".join(PROBE_SENTENCES[i:i + 3])} for i in range(0, len(PROBE_SENTENCES), 2)]


def upload(client: Any, headers: dict[str, str], llama_zip: bytes) -> tuple[str, str]:
    files = {"file": ("tiny-llama.zip", llama_zip, "application/zip")}
    model = client.post("/v1/models", files=files, data={"name": "tiny-llama"}, headers=headers)
    assert model.status_code == 201, model.text
    rows = "\n".join(json.dumps(row) for row in text_rows()).encode()
    dataset = client.post("/v1/datasets", files={"file": ("eval.jsonl", rows, "text/plain")}, headers=headers)
    assert dataset.status_code == 201, dataset.text
    return model.json()["id"], dataset.json()["id"]


def search_body(model_id: str, dataset_id: str, trials: int = 3, parallelism: int = 1,
                max_ratio: float = 1.02) -> dict[str, Any]:
    return {"model_id": model_id, "objective": "min_size",
            "constraint": {"metric": "perplexity", "max_ratio": max_ratio},
            "evaluate": {"dataset_id": dataset_id, "metrics": ["perplexity"], "max_samples": 8},
            "space": SPACE, "budget": {"max_trials": trials}, "parallelism": parallelism}


def run_queued(search_id: str, work: Path) -> int:
    """Run the search's queued trials in this process as the worker does (claim, `_execute`, then the completion
    path that advances the search) until none is left; returns how many ran."""
    ran = 0
    while True:
        with session_scope() as session:
            queued = session.scalars(select(Job.id).where(Job.search_id == search_id, Job.status == "queued")).all()
        if not queued:
            return ran
        for job_id in queued:
            with session_scope() as session:
                job = JobRuns(session).claim(job_id, timedelta(seconds=60), max_attempts=3)
                assert job is not None
                session.expunge(job)
            tasks._execute(job, get_store(), work / job_id)
            tasks._advance_search(job_id)
            ran += 1


def finished(client: Any, headers: dict[str, str], search_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/searches/{search_id}", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def check_trials(search: dict[str, Any], max_ratio: float) -> None:
    """Every trial recorded with its job, size and CI; `feasible` is the constraint on the CI's upper end; `best`
    is the smallest feasible trial; later trials plan from trial 0's scan."""
    trials = search["trials"]
    assert [t["number"] for t in trials] == list(range(len(trials)))
    assert trials[0]["params"] == {"family": "sensitivity-probe"} and trials[0]["steps"][0]["method"] == "mixed"
    assert search["sensitivity"], "trial 0's scan is recorded"
    for trial in trials:
        assert trial["status"] == "succeeded" and trial["job_id"].startswith("job_"), trial
        assert 0 < trial["size_ratio"] < 1 and trial["ci95"][0] <= trial["value"] <= trial["ci95"][1]
        assert trial["feasible"] == (trial["ci95"][1] <= max_ratio), trial
        assert trial["artifact_id"].startswith("art_")
    for trial in trials[1:]:
        assert trial["damage"] is not None  # planned from the scan
        if trial["protected"]:  # the protected weights are kept at 8 bits by a second step
            modules = sorted({m for name in trial["protected"] for m in search["sensitivity"][name]["modules"]})
            assert trial["steps"][-1]["targets"] == modules and trial["steps"][-1]["bits"] == 8
            assert trial["steps"][0]["exclude"] == modules
    feasible = [t for t in trials if t["feasible"]]
    best = min(feasible, key=lambda t: t["size_ratio"])
    assert search["best"]["number"] == best["number"] and search["best"]["steps"] == best["steps"]
    assert search["best"]["artifact_id"] == best["artifact_id"]


# ---- in process: the worker's own code, run here ---------------------------------------------------------------


def test_cancelling_a_search_cancels_its_trials(client: TestClient, auth: dict[str, str], other_auth: dict[str, str],
                                                llama_zip: bytes) -> None:
    model_id, dataset_id = upload(client, auth, llama_zip)
    body = search_body(model_id, dataset_id, trials=6, parallelism=2)
    body["space"] = {**SPACE, "sensitivity_scan": False}  # no probe: both slots start at once
    search = client.post("/v1/searches", json=body, headers=auth).json()
    jobs = [t["job_id"] for t in search["trials"]]
    assert len(jobs) == 2 and all(t["status"] == "queued" for t in search["trials"])
    with session_scope() as session:  # one trial is running on a worker
        assert JobRuns(session).claim(jobs[0], timedelta(seconds=60), max_attempts=3) is not None
    assert client.post(f"/v1/searches/{search['id']}/cancel", headers=other_auth).status_code == 404
    cancelled = client.post(f"/v1/searches/{search['id']}/cancel", headers=auth)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
    running, queued = (client.get(f"/v1/jobs/{job}", headers=auth).json() for job in jobs)
    assert (running["status"], running["cancel_requested"]) == ("running", True)
    assert queued["status"] == "cancelled"
    tasks._advance_search(jobs[1])  # a trial's end after the cancel starts nothing
    after = finished(client, auth, search["id"])
    assert len(after["trials"]) == 2 and after["status"] == "cancelled"
    assert client.post(f"/v1/searches/{search['id']}/cancel", headers=auth).status_code == 409


def test_the_sweeper_advances_a_search_whose_trial_ended_without_its_completion_path(
        client: TestClient, auth: dict[str, str], llama_zip: bytes, tmp_path: Path) -> None:
    model_id, dataset_id = upload(client, auth, llama_zip)
    body = search_body(model_id, dataset_id, trials=2)
    body["space"] = {**SPACE, "sensitivity_scan": False}
    search = client.post("/v1/searches", json=body, headers=auth).json()
    [first] = search["trials"]
    with session_scope() as session:  # the trial runs, but its worker dies before the completion path
        job = JobRuns(session).claim(first["job_id"], timedelta(seconds=60), max_attempts=3)
        session.expunge(job)
    tasks._execute(job, get_store(), tmp_path)
    assert [t["status"] for t in finished(client, auth, search["id"])["trials"]] == ["queued"]  # not recorded yet
    assert advance_running_searches(queue.enqueue, get_settings()) == 1  # what every worker's sweeper runs
    trials = finished(client, auth, search["id"])["trials"]
    assert [t["status"] for t in trials] == ["succeeded", "queued"] and trials[0]["size_ratio"] > 0


def test_a_trial_recipe_the_api_would_refuse_is_refused_as_invalid_spec() -> None:
    """The search writes its trials' recipes itself: one that a job submitted over HTTP could not carry becomes an
    InvalidSpec naming the field (the trial is then recorded refused and planning goes on), not a pydantic error
    that left the trial pending and the search running forever."""
    steps = [{"type": "quantize", "method": "rtn", "bits": 4, "exclude": [f"m{i}" for i in range(1025)]}]
    with pytest.raises(InvalidSpec, match=r"invalid trial recipe: steps\.0\..*exclude") as refused:
        _check_trial({"steps": steps})
    assert refused.value.details[0]["field"].endswith("exclude")
    _check_trial({"steps": [{**steps[0], "exclude": ["m0"]}]})


def test_what_cannot_work_is_refused_before_a_search_exists(client: TestClient, auth: dict[str, str],
                                                            other_auth: dict[str, str], llama_zip: bytes) -> None:
    model_id, dataset_id = upload(client, auth, llama_zip)
    unmeasured = search_body(model_id, dataset_id)
    unmeasured["constraint"] = {"metric": "accuracy", "max_drop": 0.01}
    refused = client.post("/v1/searches", json=unmeasured, headers=auth)
    assert refused.status_code == 422 and "must be one of evaluate.metrics" in refused.text
    two_bounds = search_body(model_id, dataset_id)
    two_bounds["constraint"]["min"] = 0.5
    assert "exactly one of" in client.post("/v1/searches", json=two_bounds, headers=auth).text
    encoder_metric = search_body(model_id, dataset_id)
    encoder_metric["constraint"] = {"metric": "cosine", "min": 0.99}
    encoder_metric["evaluate"]["metrics"] = ["embedding_cosine"]
    unfit = client.post("/v1/searches", json=encoder_metric, headers=auth)
    assert unfit.status_code == 422 and "do not fit LlamaForCausalLM" in unfit.text
    assert client.post("/v1/searches", json=search_body(model_id, dataset_id), headers=other_auth).status_code == 404
    assert client.get("/v1/searches", headers=auth).json()["total"] == 0  # nothing left behind
    assert client.get("/v1/jobs", headers=auth).json()["total"] == 0


# ---- a real worker process ------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_a_search_runs_to_completion_on_a_real_worker(database_url: str, llama_zip: bytes, tmp_path: Path) -> None:
    """uvicorn and a Celery worker: the worker that ends each trial records it and submits the next ones; the search
    keeps the smallest trial that met the constraint and draws them all in its report."""
    env = {"MCS_BROKER_URL": E2E_BROKER_URL, "MCS_ARTIFACT_DIR": str(tmp_path / "artifacts")}
    with local_stack(env, tmp_path / "logs") as url:
        key = create_key(database_url, "e2e-searches")
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            model_id, dataset_id = upload(client, {}, llama_zip)
            body = search_body(model_id, dataset_id, trials=3, parallelism=2, max_ratio=1.01)
            body["constraint"]["use_ci"] = True  # a random tiny model's perplexity barely moves: judge the CI's end
            created = client.post("/v1/searches", json=body)
            assert created.status_code == 202, created.text
            assert created.headers["Location"] == f"/v1/searches/{created.json()['id']}"
            # the probe is in flight and the space has no presets: nothing else starts before the scan is in
            assert [t["params"]["family"] for t in created.json()["trials"]] == ["sensitivity-probe"]
            deadline = time.monotonic() + 120
            while (search := finished(client, {}, created.json()["id"]))["status"] == "running":
                assert time.monotonic() < deadline, search
                time.sleep(0.3)
            assert search["status"] == "succeeded" and len(search["trials"]) == 3, search
            check_trials(search, 1.01)
            # one 8-bit grid exists (protecting nothing): the other trial is 2-bit, which breaks the constraint
            assert any(not t["feasible"] for t in search["trials"])
            listed = client.get("/v1/searches").json()
            assert listed["total"] == 1 and listed["items"][0]["id"] == search["id"]
            page = client.get(f"/v1/searches/{search['id']}/report")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert "img-src data:" in page.headers["content-security-policy"]
            for heading in ("Size and quality of every trial", "Trials", "Best recipe", "Sensitivity (trial 0)"):
                assert f"<h2>{heading}</h2>" in page.text, heading
            assert page.text.count("<img ") == 2 and "perplexity artifact / original &lt;= 1.01" in page.text


REPORT_URL = "http://mcs.test/search-report"  # a made-up origin: every other request the page makes is refused


def test_the_search_report_draws_its_charts_in_chromium(client: TestClient, auth: dict[str, str], llama_zip: bytes,
                                                        tmp_path: Path, browser_page: Any,
                                                        console_errors: list[str]) -> None:
    model_id, dataset_id = upload(client, auth, llama_zip)
    search = client.post("/v1/searches", json=search_body(model_id, dataset_id, trials=2), headers=auth).json()
    assert run_queued(search["id"], tmp_path) == 2
    page_html = client.get(f"/v1/searches/{search['id']}/report", headers=auth)
    requested: list[str] = []

    def serve(route: Any) -> None:
        if route.request.url == REPORT_URL:
            route.fulfill(status=200, body=page_html.text, content_type="text/html",
                          headers={"Content-Security-Policy": page_html.headers["content-security-policy"]})
        else:
            requested.append(route.request.url)
            route.abort()

    browser_page.route("**/*", serve)
    browser_page.goto(REPORT_URL, wait_until="load")
    images = browser_page.eval_on_selector_all(
        "img", "imgs => imgs.map(i => ({complete: i.complete, width: i.naturalWidth, shown: i.clientWidth}))")
    assert len(images) == 2 and all(i["complete"] and i["width"] > 0 and i["shown"] > 0 for i in images), images
    assert console_errors == [] and requested == []
    shot = tmp_path / "report-search.png"
    browser_page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if target := os.environ.get("MCS_SEARCH_REPORT_SCREENSHOT"):  # how docs/img/report-search.png is made
        shutil.copyfile(shot, target)
