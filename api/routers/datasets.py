from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Response, UploadFile

from api.deps import V1_DEPENDENCIES, DatasetsDep, PageNumber, PageSize, SessionDep, SettingsDep, StoreDep
from api.errors import V1_ERRORS, error_responses
from api.limits import NameField
from api.schemas import DatasetOut, Page
from api.stored import delete_with_files, discard_unless_committed
from core.service.datasets import store_dataset_upload
from core.service.db.models import new_id
from core.service.quotas import check_storage
from core.service.uploads import display_name

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=V1_ERRORS,
                   dependencies=V1_DEPENDENCIES)


@router.post("", status_code=201, response_model=DatasetOut, responses=error_responses(400, 408, 413, 507))
def upload_dataset(
    datasets: DatasetsDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    file: Annotated[UploadFile, File(description="JSONL with a `text` field, or plain text: one sample per line")],
    name: NameField = None,
    format: Annotated[Literal["auto", "jsonl", "text"], Form()] = "auto",
) -> DatasetOut:
    """Upload calibration or training text (UTF-8). Used by steps through `dataset_id`."""
    dataset_id = new_id("dst")
    stored = store_dataset_upload(file.file, dataset_id, format, file.filename, settings, store)
    with discard_unless_committed(store, stored.storage_key):
        check_storage(session, datasets.tenant_id, stored.size_bytes, settings)
        row = datasets.add(id=dataset_id, name=name or display_name(file.filename, "dataset"), format=stored.format,
                           num_samples=stored.num_samples, size_bytes=stored.size_bytes, sha256=stored.sha256,
                           storage_key=stored.storage_key)
        session.commit()
    return DatasetOut.model_validate(row)


@router.get("", response_model=Page[DatasetOut])
def list_datasets(
    datasets: DatasetsDep,
    page: PageNumber = 1,
    page_size: PageSize = 20,
) -> Page[DatasetOut]:
    return Page.of(datasets.page(page, page_size), DatasetOut.model_validate, page, page_size)


@router.get("/{dataset_id}", response_model=DatasetOut, responses=error_responses(404))
def get_dataset(dataset_id: str, datasets: DatasetsDep) -> DatasetOut:
    return DatasetOut.model_validate(datasets.get(dataset_id))


@router.delete("/{dataset_id}", status_code=204, responses=error_responses(404))
def delete_dataset(dataset_id: str, datasets: DatasetsDep, session: SessionDep, store: StoreDep) -> Response:
    dataset = datasets.get(dataset_id)
    delete_with_files(datasets, dataset, session, store)
    return Response(status_code=204)
