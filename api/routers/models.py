from typing import Annotated, Any

from fastapi import APIRouter, File, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import V1_DEPENDENCIES, ModelsDep, PageNumber, PageSize, SessionDep, SettingsDep, StoreDep
from api.errors import V1_ERRORS, error_responses
from api.limits import NameField
from api.queue import enqueue_import
from api.schemas import ModelOut, Page
from api.stored import delete_with_files, discard_unless_committed
from core.errors import Conflict
from core.service.db.models import new_id
from core.service.db.repositories import Jobs, Models
from core.service.imports import SOURCE_PATTERN, S3Credentials, start_import
from core.service.quotas import check_storage
from core.service.settings import Settings
from core.service.storage import ArtifactStore
from core.service.uploads import add_model_row, display_name, store_model_upload

router = APIRouter(prefix="/v1/models", tags=["models"], responses=V1_ERRORS,
                   dependencies=V1_DEPENDENCIES)


class S3Access(BaseModel):
    """Where and how to read an s3:// source; without keys, the operator's MCS_IMPORT_S3_PROFILE."""

    endpoint_url: Annotated[str, Field(max_length=500, description="MinIO or another store; empty: AWS")] = ""
    access_key_id: Annotated[str, Field(max_length=200)] = ""
    secret_access_key: Annotated[str, Field(max_length=200)] = ""
    session_token: Annotated[str, Field(max_length=4000)] = ""
    region: Annotated[str, Field(max_length=50)] = ""


class ImportIn(BaseModel):
    source: Annotated[str, Field(max_length=1000, pattern=SOURCE_PATTERN,
                                 examples=["hf://org/name@main", "s3://models/llama-3-8b/"],
                                 description="s3://bucket/prefix, or hf://org/name[@revision] from the workers' "
                                             "local Hugging Face cache")]
    name: Annotated[str | None, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")] = None
    s3: S3Access | None = None


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema with its local `$defs` references replaced by their definitions (an operation's schema cannot
    refer to its own `$defs` inside the OpenAPI document)."""
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        return [resolve(item) for item in node] if isinstance(node, list) else node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


# The JSON alternative to the multipart form, in the OpenAPI document (FastAPI describes the form itself).
IMPORT_BODY = {"requestBody": {"content": {"application/json": {"schema": _inlined(ImportIn.model_json_schema())}}}}


@router.post("", status_code=201, response_model=ModelOut, openapi_extra=IMPORT_BODY,
             responses={202: {"model": ModelOut, "description": "the import was accepted; follow GET "
                              "/v1/models/{id} until its status is ready or failed"},
                        **error_responses(400, 403, 408, 409, 413, 422, 503, 507)})
async def create_model(
    request: Request,
    response: Response,
    models: ModelsDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    file: Annotated[UploadFile | None, File(description="a .zip or .tar.gz of a Hugging Face model folder")] = None,
    name: NameField = None,
) -> ModelOut:
    """Add a model, in one of two ways:

    - **upload** (multipart form): a .zip or .tar.gz of a model folder (config.json + *.safetensors + optional
      tokenizer files); answered 201 with the stored model. Large folders: the chunked uploads (`/v1/uploads`).
    - **import** (JSON `{"source": ...}`): a model folder already in an allowed bucket (`s3://bucket/prefix/`) or in
      the workers' local Hugging Face cache (`hf://org/name[@revision]`; never downloaded from the Hub). Answered 202
      with the model `importing`; a worker fetches it with progress (`progress.bytes_done` of `bytes_total`),
      validates it exactly as an upload and marks it `ready` (with `source` the resolved revision) or `failed`
      (with `error`). Its default name is the resolved source."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
        body = _import_body(await request.body())
        credentials = S3Credentials(**body.s3.model_dump()) if body.s3 else None
        row = await run_in_threadpool(start_import, session, models.tenant_id, body.source, body.name, credentials,
                                      settings, enqueue_import)
        response.status_code = 202
        response.headers["Location"] = f"/v1/models/{row.id}"
        return ModelOut.model_validate(row)
    if file is None:
        raise RequestValidationError([{"loc": ("body", "file"), "msg": "Field required (or send JSON "
                                       "{\"source\": ...} to import)", "type": "missing"}])
    return await run_in_threadpool(_store_upload, file, name, models, session, settings, store)


def _import_body(raw: bytes) -> ImportIn:
    try:
        return ImportIn.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError([{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]) from exc


def _store_upload(file: UploadFile, name: str | None, models: Models, session: Session, settings: Settings,
                  store: ArtifactStore) -> ModelOut:
    model_id = new_id("mdl")
    stored = store_model_upload(file.file, model_id, settings, store)
    with discard_unless_committed(store, stored.storage_key):
        check_storage(session, models.tenant_id, stored.size_bytes, settings)
        label = name or display_name(file.filename, "model", (".tar.gz", ".tgz", ".zip"))
        row = add_model_row(models, model_id, label, stored)
        session.commit()
    return ModelOut.model_validate(row)


@router.get("", response_model=Page[ModelOut])
def list_models(
    models: ModelsDep,
    page: PageNumber = 1,
    page_size: PageSize = 20,
) -> Page[ModelOut]:
    return Page.of(models.page(page, page_size), ModelOut.model_validate, page, page_size)


@router.get("/{model_id}", response_model=ModelOut, responses=error_responses(404))
def get_model(model_id: str, models: ModelsDep) -> ModelOut:
    return ModelOut.model_validate(models.get(model_id))


@router.delete("/{model_id}", status_code=204, responses=error_responses(404, 409))
def delete_model(model_id: str, models: ModelsDep, session: SessionDep, store: StoreDep) -> Response:
    model = models.get(model_id)
    if Jobs(session, models.tenant_id).active_for_model(model_id):
        raise Conflict(f"model {model_id!r} has queued or running jobs; cancel them first")
    delete_with_files(models, model, session, store)
    return Response(status_code=204)
