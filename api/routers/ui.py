"""The web dashboard under `/ui`: server-rendered page shells (api/ui/layout.html around api/ui/pages/*.html) and a
few static files (api/ui/static). The pages hold no data and need no key: their scripts call the /v1 API with the
key the user typed on the sign-in page, which stays in the tab's sessionStorage (see docs/ui.md).

Every answer carries a Content-Security-Policy that allows scripts from /ui/static only (no inline script, no
eval), so a name or a message rendered into a page can never run as script; styles too come from /ui/static, except
on the report viewer (see REPORT_CSP)."""

import html
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from string import Template

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

from core.errors import NotFound

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
POLICY = {
    "default-src": "'none'",
    "script-src": "'self'",
    "style-src": "'self'",
    "img-src": "'self'",
    "connect-src": "'self'",
    "base-uri": "'none'",
    "form-action": "'self'",
    "frame-ancestors": "'none'",
}
CSP = "; ".join(f"{name} {value}" for name, value in POLICY.items())
# The report viewer shows the API's self-contained report (inline <style>, charts as data: PNGs) in a sandboxed
# srcdoc frame, which inherits this page's policy: it alone allows those two, still no script but its own file.
REPORT_CSP = "; ".join(f"{name} {value}" for name, value in
                       {**POLICY, "style-src": "'self' 'unsafe-inline'", "img-src": "'self' data:"}.items())
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # the pages are shells whose data comes from the API: revalidating them costs little and never shows stale code
    "Cache-Control": "no-cache",
}
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
NAV = [("jobs", "/ui/jobs", "Jobs"), ("submit", "/ui/submit", "Submit a job"), ("models", "/ui/models", "Models"),
       ("upload", "/ui/upload", "Upload a model"), ("datasets", "/ui/datasets", "Datasets")]

router = APIRouter(prefix="/ui", include_in_schema=False)


@dataclass(frozen=True)
class Page:
    title: str
    script: str
    signed_in: bool = True  # shows the navigation and sends a visitor without a key to the sign-in page
    policy: str = CSP


PAGES = {
    "signin": Page("Sign in", "signin.js", signed_in=False),
    "jobs": Page("Jobs", "lists.js"),
    "models": Page("Models", "lists.js"),
    "datasets": Page("Datasets", "lists.js"),
    "upload": Page("Upload a model", "upload.js"),
    "submit": Page("Submit a job", "submit.js"),
    "job": Page("Job", "job.js"),
    "report": Page("Job report", "report.js", policy=REPORT_CSP),
}


@router.get("")
def dashboard() -> RedirectResponse:
    return RedirectResponse("/ui/jobs", status_code=303)


@router.get("/static/{name}")
def static_file(name: str) -> FileResponse:
    """Only the files shipped in api/ui/static, by exact name: no path ever reaches the file system."""
    path = _static_files().get(name)
    if path is None:
        raise NotFound(f"no dashboard file {name!r}")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=_headers(CSP))


@router.get("/jobs/{job_id}")
def job_page(job_id: str) -> HTMLResponse:
    if not JOB_ID.match(job_id):
        raise NotFound(f"no job {job_id!r}")
    return render("job", {"data-job-id": job_id})


@router.get("/jobs/{job_id}/report")
def report_page(job_id: str) -> HTMLResponse:
    if not JOB_ID.match(job_id):
        raise NotFound(f"no job {job_id!r}")
    return render("report", {"data-job-id": job_id})


@router.get("/{name}")
def page(name: str) -> HTMLResponse:
    if name not in PAGES or name in ("job", "report"):
        raise NotFound(f"no dashboard page {name!r}")
    return render(name)


def render(name: str, attributes: dict[str, str] | None = None) -> HTMLResponse:
    """The layout around one page's body; `attributes` go on <main>, escaped, for the page's script to read."""
    page = PAGES[name]
    main_attributes = "".join(f' {key}="{html.escape(value)}"' for key, value in (attributes or {}).items())
    body = _template("layout.html").substitute(
        title=html.escape(page.title), page=name, script=page.script, main_attributes=main_attributes,
        nav=_nav(name) if page.signed_in else "", main=_read(f"pages/{name}.html"),
    )
    return HTMLResponse(body, headers=_headers(page.policy))


def _nav(current: str) -> str:
    current_mark = ' aria-current="page"'
    links = "".join(f'<li><a href="{href}"{current_mark if key == current else ""}>{label}</a></li>'
                    for key, href, label in NAV)
    return (f'<nav aria-label="Main"><ul>{links}</ul>'
            '<button type="button" id="sign-out" class="link">Sign out</button></nav>')


def _headers(policy: str) -> dict[str, str]:
    return {"Content-Security-Policy": policy, **SECURITY_HEADERS}


@cache
def _static_files() -> dict[str, Path]:
    return {path.name: path for path in (UI_DIR / "static").iterdir() if path.suffix in MEDIA_TYPES}


@cache
def _template(name: str) -> Template:
    return Template(_read(name))


@cache
def _read(name: str) -> str:
    return (UI_DIR / name).read_text(encoding="utf-8")
