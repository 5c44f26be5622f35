import base64
import re
from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import StreamingResponse

from api.deps import V1_DEPENDENCIES, ArtifactsDep, StoreDep
from api.errors import V1_ERRORS, error_responses
from core.errors import RangeNotSatisfiable

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"], responses=V1_ERRORS,
                   dependencies=V1_DEPENDENCIES)

SINGLE_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
ZIP = {"application/zip": {"schema": {"type": "string", "format": "binary"}}}
DOWNLOAD_RESPONSES = {
    200: {"description": "The whole artifact", "content": ZIP},
    206: {"description": "The requested byte range (`Content-Range`)", "content": ZIP},
    **error_responses(404, 416),
}


@router.get("/{artifact_id}", name="download_artifact", response_class=StreamingResponse,
            responses=DOWNLOAD_RESPONSES)
def download_artifact(
    artifact_id: str,
    artifacts: ArtifactsDep,
    store: StoreDep,
    range_header: Annotated[str | None, Header(alias="Range", max_length=200)] = None,
) -> StreamingResponse:
    """Stream the artifact (a zip of the compressed model folder), with `Range` support for resumed downloads."""
    artifact = artifacts.get(artifact_id)
    size = store.size(artifact.storage_key)
    digest = base64.b64encode(bytes.fromhex(artifact.sha256)).decode()
    headers = {
        "ETag": f'"{artifact.sha256}"',
        "Repr-Digest": f"sha-256=:{digest}:",
        "Digest": f"SHA-256={digest}",
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{artifact.name}"',
    }
    start, end = parse_range(range_header, size)
    status = 200
    if (start, end) != (0, size - 1):
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    body = store.read_range(artifact.storage_key, start, end)
    return StreamingResponse(body, status_code=status, headers=headers, media_type="application/zip")


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
