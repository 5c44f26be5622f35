"""The web dashboard in a real headless Chromium against real processes (uvicorn and a Celery worker on PostgreSQL
and Redis): sign in, upload the tiny model, submit the w8a16-rtn preset, watch the live progress reach 100%,
download the artifact, open the report; no console errors, every control labelled and reachable with Tab."""

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli.stack import local_stack
from tests.fixtures.api import zip_folder
from tests.fixtures.environment import E2E_BROKER_URL
from tests.fixtures.services import create_key
from tests.models import save_model_folder, tiny_llama

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
CONTROLS = "a[href], button, input, select, textarea, summary"
# Controls without an accessible name: no <label>, aria-label or aria-labelledby (buttons and links need text).
UNLABELLED = """() => Array.from(document.querySelectorAll("input, select, textarea, progress, button, a[href]"))
  .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute("aria-label")
                 && !e.getAttribute("aria-labelledby") && !e.textContent.trim())
  .map((e) => e.outerHTML)"""
VISIBLE_CONTROLS = f"""() => Array.from(document.querySelectorAll("{CONTROLS}"))
  .filter((e) => !e.disabled && e.getClientRects().length && getComputedStyle(e).visibility !== "hidden")
  .map((e) => e.outerHTML)"""


@pytest.fixture(scope="module")
def dashboard(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """The stack's URL and an API key."""
    root = tmp_path_factory.mktemp("stack-ui")
    env = {"MCS_BROKER_URL": E2E_BROKER_URL, "MCS_ARTIFACT_DIR": str(root / "artifacts")}
    with local_stack(env, root / "logs") as url:
        yield url, create_key(database_url, "e2e-ui")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model_folder(tiny_llama(), tmp_path_factory.mktemp("ui-llama"))


@pytest.fixture(scope="module")
def model_archive(model_folder: Path) -> Path:
    archive = model_folder.parent / "tiny-llama.zip"
    archive.write_bytes(zip_folder(model_folder))
    return archive


def test_sign_in_upload_submit_watch_download(dashboard: tuple[str, str], model_archive: Path,
                                             browser_page: Any, console_errors: list[str], tmp_path: Path) -> None:
    url, key = dashboard
    page = browser_page
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))

    page.goto(f"{url}/ui/jobs")
    page.wait_for_url(re.compile(r"/ui/signin\?next="))  # no key yet: the sign-in page, then back
    check_accessible(page)
    page.get_by_label("API key").fill(key)
    page.keyboard.press("Enter")
    page.wait_for_url(f"{url}/ui/jobs")
    check_accessible(page)

    page.get_by_role("link", name="Upload a model", exact=True).first.click()
    page.get_by_label("Model archive or folder files").set_input_files(str(model_archive))
    page.get_by_label("Name (optional)").fill("tiny llama")
    check_accessible(page)
    page.get_by_role("button", name="Upload").click()
    page.get_by_text("Submit a job with this model").click()

    page.wait_for_url(re.compile(r"/ui/submit\?model=mdl_"))
    page.wait_for_selector("#preset-select option[value='w8a16-rtn']", state="attached")
    page.get_by_label("Preset").select_option("w8a16-rtn")
    check_accessible(page)
    page.get_by_role("button", name="Submit").click()

    page.wait_for_url(re.compile(r"/ui/jobs/job_"))
    job_id = page.url.rsplit("/", 1)[1]
    page.wait_for_function("() => document.getElementById('job-progress').value === 1", timeout=120_000)
    assert page.locator("#job-percent").text_content() == "100%"
    page.wait_for_selector("#artifacts button")
    assert page.locator("#job-status").text_content() == "succeeded"
    assert page.locator("#steps tbody tr").count() == 1
    assert page.locator("#steps .metrics dt").count() > 0  # the step's metrics came with step.finished / the job
    check_accessible(page)

    with page.expect_download() as download:
        page.locator("#artifacts button").first.click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    page.get_by_text("sha256 verified").wait_for()

    page.get_by_role("link", name="Open the job's report").click()  # the API's report, in a sandboxed frame
    page.wait_for_url(f"{url}/ui/jobs/{job_id}/report")
    check_accessible(page)
    report = page.frame_locator("#report-frame")
    assert "tiny llama" in report.locator("h1").text_content()  # the model named on upload
    assert report.locator("body").evaluate("(b) => getComputedStyle(b).maxWidth") == "960px"  # its inline style
    charts = report.locator("img")
    assert charts.count() > 0 and charts.evaluate_all("(imgs) => imgs.every((i) => i.naturalWidth > 0)")

    job = httpx.get(f"{url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}).json()
    assert job["status"] == "succeeded"
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == job["artifacts"][0]["sha256"]
    assert f"{url}/v1/jobs/{job_id}/events" in urls  # the live progress came from the event stream
    assert not [u for u in urls if key in u], "the API key must never appear in a URL"
    assert console_errors == []


def test_folder_upload_lists_filters_and_sign_out(dashboard: tuple[str, str], model_folder: Path, browser_page: Any,
                                                  console_errors: list[str]) -> None:
    url, key = dashboard
    page = browser_page
    page.goto(f"{url}/ui/signin")
    page.get_by_label("API key").fill("mcs_not-a-key")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("alert").get_by_text("unknown or revoked").wait_for()
    assert [e for e in console_errors if "401" not in e] == []  # the browser logs the refused request itself
    console_errors.clear()
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{url}/ui/jobs")
    page.get_by_label("Status").select_option("failed")
    page.get_by_role("button", name="Filter").click()
    page.get_by_text("Nothing to show.").wait_for()

    page.goto(f"{url}/ui/upload")  # a folder's files go through the resumable upload, each with its sha256
    page.get_by_label("Model archive or folder files").set_input_files(sorted(map(str, model_folder.iterdir())))
    page.get_by_label("Name (optional)").fill("folder llama")
    page.get_by_role("button", name="Upload").click()
    page.locator("#uploaded").wait_for()
    assert page.locator("#upload-progress").evaluate("(e) => e.value") == 1

    page.goto(f"{url}/ui/models")
    page.get_by_label("Name contains").fill("folder")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_function("() => document.querySelectorAll('#list tbody tr').length === 1")
    page.get_by_role("link", name="Compress folder llama").wait_for()
    for name in ("models", "datasets"):
        page.goto(f"{url}/ui/{name}")
        page.wait_for_function("() => document.getElementById('notice').textContent.endsWith('.')")
        check_accessible(page)
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(f"{url}/ui/signin")
    assert page.evaluate("sessionStorage.length") == 0
    assert console_errors == []


def check_accessible(page: Any) -> None:
    """Every control has an accessible name, and pressing Tab from the top of the page focuses each visible one."""
    page.wait_for_selector("body[data-ready]", state="attached")
    assert page.evaluate(UNLABELLED) == []
    wanted = page.evaluate(VISIBLE_CONTROLS)
    page.evaluate("document.activeElement && document.activeElement.blur()")
    reached = set()
    for _ in range(len(wanted) + 2):
        page.keyboard.press("Tab")
        reached.add(page.evaluate("document.activeElement.outerHTML"))
    assert set(wanted) <= reached, f"not reachable with Tab: {set(wanted) - reached}"
