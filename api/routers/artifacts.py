import base64
import re
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse

from api.deps import V1_DEPENDENCIES, ArtifactsDep, SettingsDep, StoreDep
from api.errors import V1_ERRORS, error_responses
from core.errors import PreconditionFailed, RangeNotSatisfiable
from core.service.db.models import Artifact

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"], responses=V1_ERRORS,
                   dependencies=V1_DEPENDENCIES)

SINGLE_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
ZIP = {"application/zip": {"schema": {"type": "string", "format": "binary"}}}
Responses = dict[int | str, dict[str, Any]]
NOT_MODIFIED: Responses = {304: {"description": "`If-None-Match` matches the ETag: the client's copy is current"}}
DOWNLOAD_RESPONSES: Responses = {
    200: {"description": "The whole artifact", "content": ZIP},
    206: {"description": "The requested byte range (`Content-Range`)", "content": ZIP},
    302: {"description": "With MCS_ARTIFACT_REDIRECT on an object store: `Location` is a presigned URL, valid for "
                         "MCS_ARTIFACT_REDIRECT_TTL_S seconds, that serves the artifact (and `Range`) directly"},
    **NOT_MODIFIED,
    **error_responses(404, 412, 416),
}
HEAD_RESPONSES: Responses = {200: {"description": "The headers a GET would answer, without the body"},
                             **NOT_MODIFIED, **error_responses(404, 412)}
ETagList = Annotated[str | None, Header(max_length=2000, description="ETags, comma-separated, or `*`")]


def artifact_url(request: Request, artifact_id: str) -> str:
    """The download URL of an artifact. Built from the base URL (which carries any root path) rather than by
    `request.url_for`, which walks every route: a tenth of a job poll's time."""
    return f"{request.base_url}{router.prefix.lstrip('/')}/{artifact_id}"


@router.get("/{artifact_id}", name="download_artifact", response_class=StreamingResponse,
            responses=DOWNLOAD_RESPONSES)
@router.head("/{artifact_id}", name="artifact_headers", response_class=Response, responses=HEAD_RESPONSES)
def download_artifact(
    artifact_id: str,
    request: Request,
    artifacts: ArtifactsDep,
    store: StoreDep,
    settings: SettingsDep,
    range_header: Annotated[str | None, Header(alias="Range", max_length=200)] = None,
    if_range: Annotated[str | None, Header(max_length=200, description="honour Range only for this ETag")] = None,
    if_match: ETagList = None,
    if_none_match: ETagList = None,
) -> Response:
    """Stream the artifact (a zip of the compressed model folder), with `Range` support for resumed downloads and
    conditional requests on its ETag (RFC 9110); HEAD answers the headers of a GET without the body. Where the
    operator turned redirects on and the store is an object store, a GET answers 302 to a short-lived presigned URL
    instead (the bytes then never pass through the API)."""
    artifact = artifacts.get(artifact_id)
    etag = f'"{artifact.sha256}"'
    if if_match is not None and not etag_matches(if_match, etag, weak=False):
        raise PreconditionFailed(f"If-Match {if_match!r} does not match the artifact's ETag {etag}", {"etag": etag})
    if if_none_match is not None and etag_matches(if_none_match, etag, weak=True):
        return Response(status_code=304, headers={"ETag": etag})
    size = store.size(artifact.storage_key)
    if request.method == "GET" and settings.artifact_redirect:
        url = store.presigned_url(artifact.storage_key, settings.artifact_redirect_ttl_s,
                                  content_disposition(artifact.name), "application/zip")
        if url is not None:  # the URL is a credential for its lifetime: no cache may keep it
            return RedirectResponse(url, status_code=302, headers={"ETag": etag, "Cache-Control": "no-store"})
    # Range is defined for GET only; a stale If-Range (another ETag, or a date: we send no Last-Modified) asks for
    # the whole new file rather than a piece of it
    start, end = parse_range(range_header if request.method == "GET" and if_range in (None, etag) else None, size)
    headers = download_headers(artifact, etag, start, end, size)
    status = 206 if "Content-Range" in headers else 200
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type="application/zip")
    body = store.read_range(artifact.storage_key, start, end)
    return StreamingResponse(body, status_code=status, headers=headers, media_type="application/zip")


def download_headers(artifact: Artifact, etag: str, start: int, end: int, size: int) -> dict[str, str]:
    digest = base64.b64encode(bytes.fromhex(artifact.sha256)).decode()
    headers = {
        "ETag": etag,
        "Repr-Digest": f"sha-256=:{digest}:",
        "Digest": f"SHA-256={digest}",
        "Accept-Ranges": "bytes",
        "Content-Disposition": content_disposition(artifact.name),
        "Content-Length": str(end - start + 1),
    }
    if (start, end) != (0, size - 1):
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return headers


def content_disposition(name: str) -> str:
    """RFC 6266: `filename*` carries the name in UTF-8, percent-encoded (no character of it can end the header or
    start a parameter); `filename` is an ASCII stand-in for old clients, without quotes, backslashes, semicolons or
    control characters."""
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\;' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def etag_matches(header: str, etag: str, weak: bool) -> bool:
    """Whether an If-Match / If-None-Match value names `etag` (a strong ETag): `*` names any; a `W/` tag matches
    only in the weak comparison that If-None-Match uses."""
    tags = [tag.strip() for tag in header.split(",")]
    if weak:
        tags = [tag.removeprefix("W/") for tag in tags]
    return "*" in tags or etag in tags


def parse_range(header: str | None, size: int) -> tuple[int, int]:
    """One byte range per RFC 9110 (`a-b`, `a-`, `-n`). Several ranges are answered with the whole file, which
    the RFC allows; a malformed or unsatisfiable single range is a 416."""
    if not header or "," in header:
        return 0, size - 1
    match = SINGLE_RANGE.match(header.strip())
    if not match or match.groups() == ("", ""):
        raise RangeNotSatisfiable(f"malformed Range header {header!r}", {"size": size})
    first, last = match.groups()
    if first == "":
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start > end or start >= size:
        raise RangeNotSatisfiable(f"range {header!r} is outside the artifact's {size} bytes", {"size": size})
    return start, end
