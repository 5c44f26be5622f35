"""`/v1/admin/keys`: a tenant's admin key lists, creates, revokes and rotates the tenant's own keys (the `admin`
scope, checked for every /v1/admin route by `api.deps.required_scope`). Other tenants' keys are 404s; operators
manage every tenant's keys with `mcs keys`."""

from typing import Annotated

from fastapi import APIRouter, Body

from api.deps import V1_DEPENDENCIES, SessionDep, TenantDep
from api.errors import V1_ERRORS, error_responses
from api.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyOut, ApiKeyRotate
from core.service import keys
from core.service.db.models import ApiKey
from core.service.db.repositories import Tenants

router = APIRouter(prefix="/v1/admin/keys", tags=["admin"], responses=V1_ERRORS, dependencies=V1_DEPENDENCIES)


def created(row: ApiKey, plaintext: str) -> ApiKeyCreated:
    return ApiKeyCreated.model_validate({**ApiKeyOut.model_validate(row).model_dump(), "key": plaintext})


@router.get("", response_model=list[ApiKeyOut])
def list_keys(session: SessionDep, tenant: TenantDep) -> list[ApiKeyOut]:
    """The tenant's keys, newest first, revoked and expired ones included."""
    return [ApiKeyOut.model_validate(row) for row in Tenants(session).keys_of(tenant.id)]


@router.post("", status_code=201, response_model=ApiKeyCreated)
def create_key(body: ApiKeyCreate, session: SessionDep, tenant: TenantDep) -> ApiKeyCreated:
    """A new key for the tenant; its value is in this response only."""
    row, plaintext = keys.create_key(session, tenant.id, body.scopes, body.expires_at, body.name)
    session.commit()
    return created(row, plaintext)


@router.get("/{key_id}", response_model=ApiKeyOut, responses=error_responses(404))
def get_key(key_id: str, session: SessionDep, tenant: TenantDep) -> ApiKeyOut:
    return ApiKeyOut.model_validate(Tenants(session).api_key(tenant.id, key_id))


@router.post("/{key_id}/revoke", response_model=ApiKeyOut, responses=error_responses(404, 409))
def revoke_key(key_id: str, session: SessionDep, tenant: TenantDep) -> ApiKeyOut:
    """Revoke a key: its next request, on any API process, is a 401. 409 if it was revoked already."""
    row = keys.revoke_key(session, Tenants(session).api_key(tenant.id, key_id))
    session.commit()
    return ApiKeyOut.model_validate(row)


@router.post("/{key_id}/rotate", status_code=201, response_model=ApiKeyCreated, responses=error_responses(404, 409))
def rotate_key(key_id: str, session: SessionDep, tenant: TenantDep,
               body: Annotated[ApiKeyRotate | None, Body()] = None) -> ApiKeyCreated:
    """A new key with the same name, scopes and lifetime; the old one is revoked at once (no body), or expires after
    `grace_s`. 409 for a revoked or expired key."""
    grace_s = body.grace_s if body else 0
    row, plaintext = keys.rotate_key(session, Tenants(session).api_key(tenant.id, key_id), grace_s)
    session.commit()
    return created(row, plaintext)
