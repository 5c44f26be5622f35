"""Import a model from a bucket or a local Hugging Face cache instead of uploading it (core/service/imports.py)."""

from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import V1_DEPENDENCIES, ModelsDep, SessionDep, SettingsDep, StoreDep
from api.errors import V1_ERRORS, error_responses
from api.limits import NameField
from api.schemas import ModelOut
from api.stored import discard_unless_committed
from core.service.db.models import new_id
from core.service.imports import SOURCE_PATTERN, S3Credentials, import_model
from core.service.quotas import check_storage
from core.service.uploads import add_model_row

router = APIRouter(prefix="/v1/models", tags=["models"], responses=V1_ERRORS, dependencies=V1_DEPENDENCIES)


class S3Access(BaseModel):
    """Where and how to read an s3:// source; without keys, the operator's MCS_IMPORT_S3_PROFILE."""

    endpoint_url: Annotated[str, Field(max_length=500, description="MinIO or another store; empty: AWS")] = ""
    access_key_id: Annotated[str, Field(max_length=200)] = ""
    secret_access_key: Annotated[str, Field(max_length=200)] = ""
    session_token: Annotated[str, Field(max_length=4000)] = ""
    region: Annotated[str, Field(max_length=50)] = ""


class ImportIn(BaseModel):
    source: Annotated[str, Field(max_length=1000, pattern=SOURCE_PATTERN, examples=["hf://org/name@main", "s3://models/llama-3-8b/"],
                                 description="s3://bucket/prefix, or hf://org/name[@revision] from the local cache")]
    name: NameField = None
    s3: S3Access | None = None


@router.post("/import", status_code=201, response_model=ModelOut,
             responses=error_responses(400, 403, 404, 413, 422, 507))
def import_from_source(body: ImportIn, models: ModelsDep, session: SessionDep, settings: SettingsDep,
                       store: StoreDep) -> ModelOut:
    """Fetch a model folder from a bucket the operator allows or from the local Hugging Face cache (never the
    Hub), validated exactly as an upload. The answer's `name` defaults to the resolved source (for hf://, with the
    commit of the snapshot)."""
    model_id = new_id("mdl")
    credentials = S3Credentials(**body.s3.model_dump()) if body.s3 else None
    imported = import_model(body.source, credentials, model_id, settings, store)
    with discard_unless_committed(store, imported.stored.storage_key):
        check_storage(session, models.tenant_id, imported.stored.size_bytes, settings)
        row = add_model_row(models, model_id, body.name or imported.resolved[:200], imported.stored)
        session.commit()
    return ModelOut.model_validate(row)
