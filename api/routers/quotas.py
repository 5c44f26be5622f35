"""`/v1/quotas`: the tenant's quotas, each with its limit and current use (core/service/quotas.py)."""

from fastapi import APIRouter

from api.deps import V1_DEPENDENCIES, SessionDep, SettingsDep, TenantDep
from api.errors import V1_ERRORS
from api.schemas import QuotaOut
from core.service import quotas

router = APIRouter(prefix="/v1/quotas", tags=["quotas"], responses=V1_ERRORS, dependencies=V1_DEPENDENCIES)


@router.get("", response_model=list[QuotaOut])
def get_quotas(session: SessionDep, tenant: TenantDep, settings: SettingsDep) -> list[QuotaOut]:
    """stored_bytes (models, datasets, artifacts), running_jobs, queued_jobs: limit (0: none) and use now."""
    return [QuotaOut.model_validate(use, from_attributes=True) for use in quotas.usage(session, tenant.id, settings)]
