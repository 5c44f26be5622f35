"""Typed dependencies: routes declare what they need (`SessionDep`, `TenantDep`, ...) and never build it."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from core.db.models import Tenant
from core.db.repositories import Artifacts, Datasets, Jobs, Models, Tenants
from core.db.session import session_factory
from core.errors import Unauthorized
from core.settings import Settings, get_settings
from core.storage import ArtifactStore, get_store


def get_session() -> Iterator[Session]:
    session = session_factory()()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def reject_unknown_query(request: Request) -> None:
    """A misspelt query parameter (`?pagesize=5`) would otherwise be ignored and the default used without a word:
    refuse it with the usual 422 listing each unknown name and the names the route accepts."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None:
        return
    known = sorted(_query_names(dependant))
    allowed = ", ".join(known) or "none"
    unknown = sorted(set(request.query_params) - set(known))
    if unknown:
        raise RequestValidationError([
            {"loc": ("query", name), "msg": f"unknown query parameter (this route accepts: {allowed})",
             "type": "extra_forbidden"}
            for name in unknown
        ])


def _query_names(dependant: Dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


V1_DEPENDENCIES = [Depends(reject_unknown_query)]
PageNumber = Annotated[int, Query(ge=1, le=1_000_000, description="1-based page number")]
PageSize = Annotated[int, Query(ge=1, le=100, description="rows per page (at most 100)")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]


# Declared as a security scheme so the OpenAPI document (and clients generated from it) know every /v1 route needs a
# key; auto_error is off so that a missing key gets our 401 error body rather than FastAPI's.
bearer = HTTPBearer(auto_error=False, description="an API key from `mcs keys create`")


def current_tenant(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Tenant:
    key = credentials.credentials.strip() if credentials else ""
    if not key:
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>` (create one with `mcs keys create`)")
    tenant = Tenants(session).for_api_key(key)
    if tenant is None:
        raise Unauthorized("the API key is unknown or revoked")
    return tenant


TenantDep = Annotated[Tenant, Depends(current_tenant)]


def models_repo(session: SessionDep, tenant: TenantDep) -> Models:
    return Models(session, tenant.id)


def jobs_repo(session: SessionDep, tenant: TenantDep) -> Jobs:
    return Jobs(session, tenant.id)


def datasets_repo(session: SessionDep, tenant: TenantDep) -> Datasets:
    return Datasets(session, tenant.id)


def artifacts_repo(session: SessionDep, tenant: TenantDep) -> Artifacts:
    return Artifacts(session, tenant.id)


ModelsDep = Annotated[Models, Depends(models_repo)]
JobsDep = Annotated[Jobs, Depends(jobs_repo)]
DatasetsDep = Annotated[Datasets, Depends(datasets_repo)]
ArtifactsDep = Annotated[Artifacts, Depends(artifacts_repo)]
