"""The model import task (`POST /v1/models` with a source; sent by api/queue.py): core/service/imports.py does the
work. The request's S3 keys arrive as this message's `s3` argument only."""

from core.service.imports import S3Credentials, run_import
from core.service.logs import bound
from core.service.settings import get_settings
from core.service.storage import get_store
from worker.celery_app import IMPORT_MODEL_TASK, app


@app.task(name=IMPORT_MODEL_TASK)
def import_model(model_id: str, tenant_id: str, s3: dict[str, str] | None = None) -> None:
    with bound(tenant_id=tenant_id, job_id=None, step="import"):
        run_import(model_id, tenant_id, S3Credentials(**s3) if s3 else None, get_settings(), get_store())

