"""The dashboard's pages and files as the API serves them (the browser test is tests/e2e/test_ui.py)."""

import re

import pytest
from fastapi.testclient import TestClient

from api.routers.ui import PAGES

HTML_PAGES = ["/ui/signin", "/ui/jobs", "/ui/models", "/ui/datasets", "/ui/upload", "/ui/submit", "/ui/jobs/job_x1"]


@pytest.mark.parametrize("path", HTML_PAGES)
def test_pages_are_served_with_a_policy_that_forbids_inline_script(client: TestClient, path: str) -> None:
    response = client.get(path)  # no API key: the page is a shell, its data needs the key
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert "frame-ancestors 'none'" in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    page = response.text
    assert re.findall(r"<script(?![^>]*\bsrc=)", page) == []  # every script is a file
    assert re.findall(r"\s(on[a-z]+|style)=", page) == []  # no inline handlers or styles either
    assert '<html lang="en">' in page and "<title>" in page


def test_the_report_viewer_alone_allows_the_reports_inline_style_and_data_images(client: TestClient) -> None:
    policy = client.get("/ui/jobs/job_x1/report").headers["content-security-policy"]
    assert "style-src 'self' 'unsafe-inline'" in policy and "img-src 'self' data:" in policy
    assert "script-src 'self';" in policy and "unsafe-eval" not in policy
    assert 'sandbox="allow-same-origin"' in client.get("/ui/jobs/job_x1/report").text  # no allow-scripts


def test_every_page_loads_its_own_script(client: TestClient) -> None:
    special = {"job": "/ui/jobs/job_1", "report": "/ui/jobs/job_1/report"}
    for name, page in PAGES.items():
        path = special.get(name, f"/ui/{name}")
        assert f'src="/ui/static/{page.script}"' in client.get(path).text
        script = client.get(f"/ui/static/{page.script}")
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")


def test_the_job_id_goes_on_the_page_escaped_and_only_when_it_looks_like_an_id(client: TestClient) -> None:
    assert 'data-job-id="job_abc-1"' in client.get("/ui/jobs/job_abc-1").text
    assert client.get("/ui/jobs/job%22%3E%3Cscript%3E").status_code == 404


@pytest.mark.parametrize("path", ["/ui/static/nothing.js", "/ui/static/..%2Flayout.html", "/ui/static/%2E%2E",
                                  "/ui/layout", "/ui/job", "/ui/report", "/ui/static/"])
def test_only_the_shipped_files_and_pages_are_served(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 404


def test_the_root_goes_to_the_jobs_and_the_dashboard_is_not_in_the_openapi_document(client: TestClient) -> None:
    response = client.get("/ui", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/ui/jobs"
    assert not [path for path in client.get("/openapi.json").json()["paths"] if path.startswith("/ui")]
