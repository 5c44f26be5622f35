"""Resumable, chunked uploads of big model folders: declare the files, PUT each (resuming with `Content-Range`),
complete (validated as an archive upload is) -> a model. See core/service/chunked_uploads.py."""

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response

from api.deps import V1_DEPENDENCIES, ModelsDep, SessionDep, SettingsDep, StoreDep, TenantDep, with_connection
from api.errors import V1_ERRORS, error_responses
from api.schemas import ModelOut, UploadCreate, UploadFileOut, UploadOut
from api.stored import discard_unless_committed
from core.errors import InvalidRequest
from core.service import chunked_uploads
from core.service.db.models import Upload, UploadStatus, new_id
from core.service.db.repositories import Uploads
from core.service.quotas import check_storage
from core.service.settings import Settings
from core.service.uploads import add_model_row

router = APIRouter(prefix="/v1/uploads", tags=["uploads"], responses=V1_ERRORS, dependencies=V1_DEPENDENCIES)
RAW_BODY = {"requestBody": {"required": True, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


async def uploads_repo(session: SessionDep, tenant: TenantDep) -> Uploads:
    return Uploads(session, tenant.id)


UploadsDep = Annotated[Uploads, Depends(uploads_repo)]


def upload_out(upload: Upload, settings: Settings) -> UploadOut:
    files = [UploadFileOut.model_validate(f) for f in chunked_uploads.progress(upload, settings)]
    return UploadOut(id=upload.id, name=upload.name, status=UploadStatus(upload.status), files=files,
                     received_bytes=sum(f.received for f in files), total_bytes=sum(f.size for f in files),
                     created_at=upload.created_at, expires_at=upload.expires_at)


@router.post("", status_code=201, response_model=UploadOut, responses=error_responses(413))
def create_upload(body: UploadCreate, uploads: UploadsDep, session: SessionDep, settings: SettingsDep) -> UploadOut:
    """Start a chunked upload of a model folder: its manifest (file names, sizes, sha256). Then PUT each file."""
    files = [entry.model_dump() for entry in body.files]
    check_storage(session, uploads.tenant_id, sum(entry.size for entry in body.files), settings)
    upload = chunked_uploads.create_upload(uploads, body.name or "model", files, settings)
    session.commit()
    return upload_out(upload, settings)


@router.get("/{upload_id}", response_model=UploadOut, responses=error_responses(404))
def get_upload(upload_id: str, uploads: UploadsDep, settings: SettingsDep) -> UploadOut:
    """Progress: the bytes received of each file, where a PUT resumes."""
    return upload_out(uploads.get(upload_id), settings)


@router.put("/{upload_id}/files/{path}", response_model=UploadFileOut, openapi_extra=RAW_BODY,
            responses=error_responses(404, 408, 409, 413, 507))
async def put_file(
    upload_id: str,
    path: str,
    request: Request,
    tenant: TenantDep,
    settings: SettingsDep,
    content_range: Annotated[str | None, Header(description="`bytes <first>-<last>/<size>`: append at <first>, "
                                                "which must be the bytes received so far (409 otherwise)")] = None,
) -> UploadFileOut:
    """Send one file of the manifest (or the next piece of it) as the raw body. The file is complete once all its
    bytes arrived and its sha256 matched (a mismatch is a 422 and resets it to 0 bytes)."""
    target = await with_connection(chunked_uploads.file_target, tenant.id, upload_id, path, settings)
    progress = await chunked_uploads.receive_file(target, content_range, _content_length(request), request.stream())
    return UploadFileOut.model_validate(progress)


def _content_length(request: Request) -> int | None:
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    if not declared.isdigit():
        raise InvalidRequest("Content-Length must be a number of bytes")
    return int(declared)


@router.post("/{upload_id}/complete", status_code=201, response_model=ModelOut,
             responses=error_responses(404, 409, 507))
def complete_upload(upload_id: str, uploads: UploadsDep, models: ModelsDep, session: SessionDep,
                    settings: SettingsDep, store: StoreDep) -> ModelOut:
    """Validate the received folder exactly as an archive upload (400/422 the same way; a refused model discards
    the upload) and store it as a model. 409 while a file is incomplete: the details list each one."""
    model_id = new_id("mdl")
    upload, stored = chunked_uploads.complete_upload(uploads, upload_id, model_id, settings, store)
    with discard_unless_committed(store, stored.storage_key):
        check_storage(session, models.tenant_id, stored.size_bytes, settings)
        row = add_model_row(models, model_id, upload.name, stored)
        uploads.delete(upload)
        session.commit()
    chunked_uploads.remove_staging(settings, upload_id)
    return ModelOut.model_validate(row)


@router.delete("/{upload_id}", status_code=204, responses=error_responses(404, 409))
def delete_upload(upload_id: str, uploads: UploadsDep, settings: SettingsDep) -> Response:
    """Abort an upload: its received files are removed."""
    chunked_uploads.delete_upload(uploads, upload_id, settings)
    return Response(status_code=204)
