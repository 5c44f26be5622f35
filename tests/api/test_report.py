"""GET /v1/jobs/{id}/report: a self-contained HTML page with the before/after table and its CIs, the per-step
waterfall, per-layer numbers and the artifact's bytes by kind and encoding; it loads nothing from anywhere (every
image a data: PNG, a CSP that forbids fetching), escapes what the user named, and another tenant's job is a 404.
In a real headless Chromium every chart draws and the console stays clean."""

import base64
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.test_evaluation import INT8, choice_rows, upload_rows
from tests.api.test_evaluation import llama_zip as llama_zip  # noqa: F401 (the module's fixture)
from tests.api.test_evaluation import run_job as run_compression_job

PRUNE = {"type": "prune", "method": "magnitude", "sparsity": 0.5}
HOSTILE_NAME = "<script>alert(1)</script> llama"
# a browser loads the page from this made-up origin; every other request it makes is recorded and refused
REPORT_URL = "http://mcs.test/report"


class Links(HTMLParser):
    """Every src/href of a page, and its <script> tags."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.scripts += tag == "script"
        self.urls += [value or "" for name, value in attrs if name in ("src", "href")]


def deep_job(client: TestClient, auth: dict[str, str], llama_zip: bytes, work: Path, monkeypatch: pytest.MonkeyPatch,
             name: str = HOSTILE_NAME) -> dict[str, Any]:
    """Prune then int8, evaluated on the tenant's multiple-choice rows (perplexity and accuracy)."""
    files = {"file": ("llama.zip", llama_zip, "application/zip")}
    model = client.post("/v1/models", files=files, data={"name": name}, headers=auth).json()
    dataset_id = upload_rows(client, auth, choice_rows())
    body = {"model_id": model["id"], "steps": [PRUNE, INT8],
            "evaluate": {"dataset_id": dataset_id, "metrics": ["perplexity", "accuracy"]}}
    job = run_compression_job(client, auth, body, work, monkeypatch)
    assert job["status"] == "succeeded", job
    return job


def report(client: TestClient, auth: dict[str, str], job_id: str) -> Any:
    response = client.get(f"/v1/jobs/{job_id}/report", headers=auth)
    assert response.status_code == 200, response.text
    return response


def test_the_report_has_every_section_and_fetches_nothing(client: TestClient, auth: dict[str, str],
                                                          other_auth: dict[str, str], llama_zip: bytes,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = deep_job(client, auth, llama_zip, tmp_path, monkeypatch)
    response = report(client, auth, job["id"])
    page = response.text
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    for heading in ("Before and after", "Evaluation on your data", "What each step cost", "Per layer",
                    "Where the bytes went", "Step notes"):
        assert f"<h2>{heading}</h2>" in page, heading
    ppl = job["metrics"]["evaluation"]["metrics"]["perplexity"]
    assert "95% CI of delta" in page and f"[{ppl['ci95'][0]:.4g}, {ppl['ci95'][1]:.4g}]" in page
    assert "0: prune/magnitude" in page and "1: quantize/rtn" in page and "the first 6 of the 6 evaluation" in page
    waterfall = job["steps"][1]["metrics"]["waterfall"]
    assert f"{waterfall['size_bytes']:,}" in page  # the step's stored size, in the waterfall's table
    for name in ("attention", "mlp", "embedding", "int8", "relative weight error"):
        assert name in page, name
    links = Links()
    links.feed(page)
    assert links.scripts == 0 and len(links.urls) == 4  # waterfall, layers, bytes by kind and encoding
    assert all(url.startswith("data:image/png;base64,") for url in links.urls), links.urls
    assert all(base64.b64decode(url.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n" for url in links.urls)
    assert HOSTILE_NAME not in page and "&lt;script&gt;alert(1)&lt;/script&gt; llama" in page
    assert client.get(f"/v1/jobs/{job['id']}/report", headers=other_auth).status_code == 404


def test_a_layer_by_layer_job_says_why_it_has_no_waterfall(client: TestClient, auth: dict[str, str],
                                                           llama_zip: bytes, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    files = {"file": ("llama.zip", llama_zip, "application/zip")}
    model_id = client.post("/v1/models", files=files, data={"name": "llama"}, headers=auth).json()["id"]
    job = run_compression_job(client, auth, {"model_id": model_id, "steps": [INT8]}, tmp_path, monkeypatch, 0)
    page = report(client, auth, job["id"]).text
    assert job["metrics"]["engine"] == "layer_by_layer"
    assert "not measured after each step: the layer-by-layer engine" in page
    assert "1 - block output cosine" in page and "Where the bytes went" in page


def test_the_report_draws_every_chart_in_chromium(client: TestClient, auth: dict[str, str], llama_zip: bytes,
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  browser_page: Any, console_errors: list[str]) -> None:
    job = deep_job(client, auth, llama_zip, tmp_path / "work", monkeypatch, name="tiny Llama (tests/models.py)")
    page_html = report(client, auth, job["id"])
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
    assert len(images) == 4 and all(i["complete"] and i["width"] > 0 and i["shown"] > 0 for i in images), images
    assert console_errors == [] and requested == []
    shot = tmp_path / "report-job.png"
    browser_page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if target := os.environ.get("MCS_REPORT_SCREENSHOT"):  # how docs/img/report-job.png is made (docs/evaluation.md)
        shutil.copyfile(shot, target)


def test_a_mixed_precision_jobs_sensitivity_scan_is_drawn(client: TestClient, auth: dict[str, str],
                                                          llama_zip: bytes, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    files = {"file": ("llama.zip", llama_zip, "application/zip")}
    model_id = client.post("/v1/models", files=files, data={"name": "llama"}, headers=auth).json()["id"]
    mixed = {"type": "quantize", "method": "mixed", "bits": [4, 8], "budget": {"avg_bits": 6.0},
             "calibration": {"num_samples": 2, "seq_len": 8}}
    job = run_compression_job(client, auth, {"model_id": model_id, "steps": [mixed]}, tmp_path, monkeypatch)
    page = report(client, auth, job["id"]).text
    scanned = [key for key in job["steps"][0]["metrics"] if key.startswith("sensitivity/")]
    assert scanned and "<h3>sensitivity (0: quantize/mixed)</h3>" in page
    assert f"every layer ({len(scanned)})" in page and scanned[0].removeprefix("sensitivity/") in page
