from typing import Annotated

from fastapi import APIRouter, File, Response, UploadFile

from api.deps import V1_DEPENDENCIES, ModelsDep, PageNumber, PageSize, SessionDep, SettingsDep, StoreDep
from api.errors import V1_ERRORS, error_responses
from api.limits import NameField
from api.schemas import ModelOut, Page
from api.stored import delete_with_files, discard_unless_committed
from core.errors import Conflict
from core.service.db.models import new_id
from core.service.db.repositories import Jobs
from core.service.quotas import check_storage
from core.service.uploads import add_model_row, display_name, store_model_upload

router = APIRouter(prefix="/v1/models", tags=["models"], responses=V1_ERRORS,
                   dependencies=V1_DEPENDENCIES)


@router.post("", status_code=201, response_model=ModelOut, responses=error_responses(400, 408, 413, 507))
def upload_model(
    models: ModelsDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    file: Annotated[UploadFile, File(description="a .zip or .tar.gz of a Hugging Face model folder")],
    name: NameField = None,
) -> ModelOut:
    """Upload a model folder (config.json + *.safetensors + optional tokenizer files) as an archive."""
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
