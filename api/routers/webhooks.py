"""Webhooks of the tenant: register (the secret is shown once), list, show, delete, and each one's delivery log."""

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from api.deps import V1_DEPENDENCIES, PageNumber, PageSize, SessionDep, SettingsDep, TenantDep
from api.errors import V1_ERRORS, error_responses
from api.schemas import DeliveryOut, Page, WebhookCreate, WebhookCreated, WebhookOut
from core.service.db.repositories import Webhooks
from core.service.webhooks import create_webhook

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=V1_ERRORS, dependencies=V1_DEPENDENCIES)


async def webhooks_repo(session: SessionDep, tenant: TenantDep) -> Webhooks:
    return Webhooks(session, tenant.id)


WebhooksDep = Annotated[Webhooks, Depends(webhooks_repo)]


@router.post("", status_code=201, response_model=WebhookCreated, responses=error_responses(413))
def register_webhook(body: WebhookCreate, webhooks: WebhooksDep, session: SessionDep,
                     settings: SettingsDep) -> WebhookCreated:
    """Register a URL for the tenant's job events of the given types. Deliveries are signed the Standard Webhooks
    way with the returned `secret` (shown only here). A URL whose host resolves to a loopback, private or link-local
    address is a 422 `unsafe_url` (unless the operator set MCS_WEBHOOK_ALLOW_PRIVATE)."""
    hook = create_webhook(session, webhooks.tenant_id, body.url, [str(event) for event in body.events], settings)
    return WebhookCreated.model_validate(hook)


@router.get("", response_model=Page[WebhookOut])
def list_webhooks(webhooks: WebhooksDep, page: PageNumber = 1, page_size: PageSize = 20) -> Page[WebhookOut]:
    return Page.of(webhooks.page(page, page_size), WebhookOut.model_validate, page, page_size)


@router.get("/{webhook_id}", response_model=WebhookOut, responses=error_responses(404))
def get_webhook(webhook_id: str, webhooks: WebhooksDep) -> WebhookOut:
    return WebhookOut.model_validate(webhooks.get(webhook_id))


@router.delete("/{webhook_id}", status_code=204, responses=error_responses(404))
def delete_webhook(webhook_id: str, webhooks: WebhooksDep, session: SessionDep) -> Response:
    """Delete the webhook and its delivery log; deliveries still pending are dropped."""
    webhooks.delete(webhooks.get(webhook_id))
    session.commit()
    return Response(status_code=204)


@router.get("/{webhook_id}/deliveries", response_model=Page[DeliveryOut], responses=error_responses(404))
def list_deliveries(webhook_id: str, webhooks: WebhooksDep, page: PageNumber = 1,
                    page_size: PageSize = 20) -> Page[DeliveryOut]:
    """The delivery log, newest first: each delivery's status and every attempt (time, HTTP status, error)."""
    found = webhooks.deliveries(webhooks.get(webhook_id), page, page_size)
    return Page.of(found, DeliveryOut.model_validate, page, page_size)
