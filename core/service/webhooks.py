"""Webhooks: a tenant registers a URL and the event types it wants; each matching job event becomes a delivery
(`core.service.db.repositories.JobEvents`), POSTed by a Celery task and retried with exponential backoff.

Deliveries are signed the Standard Webhooks way (https://www.standardwebhooks.com): headers `webhook-id` (the
delivery id, the same on every retry), `webhook-timestamp` (Unix seconds of the attempt) and `webhook-signature`
= `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")), where the key is the base64 part of the webhook's
`whsec_...` secret. `verify` is the receiver's check, as documented in the README.

A URL is refused (422 `unsafe_url`) unless it is http(s) and every address its host resolves to is public: no
loopback, private, link-local, shared or reserved address (SSRF), unless MCS_WEBHOOK_ALLOW_PRIVATE is set. The host
is resolved again before each attempt, since DNS may have changed since registration.
"""

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy.orm import Session

from core.errors import InvalidSpec, ServiceError
from core.service.db.models import DeliveryStatus, Webhook, utcnow
from core.service.db.repositories import Deliveries, Webhooks
from core.service.db.session import session_scope
from core.service.settings import Settings

SECRET_PREFIX = "whsec_"  # noqa: S105 (the prefix of every secret, not a secret)
MAX_RETRY_DELAY_S = 3600.0


class UnsafeUrl(InvalidSpec):
    """A webhook URL that is not http(s), does not resolve, or resolves to a non-public address."""

    code = "unsafe_url"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header's value for one delivery attempt."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers: Mapping[str, str], body: bytes, tolerance_s: float = 300.0) -> bool:
    """The receiver's check: the timestamp is recent and one of the space-separated signatures matches."""
    timestamp = int(headers["webhook-timestamp"])
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    expected = sign(secret, headers["webhook-id"], timestamp, body)
    return any(hmac.compare_digest(expected, given) for given in headers["webhook-signature"].split())


def check_url(url: str, allow_private: bool) -> None:
    """Refuse a URL that is not http(s)://host..., or (unless `allow_private`) whose host resolves to any address
    that is not public."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeUrl("a webhook URL must be http:// or https:// with a host", [{"field": "url", "message": url}])
    if allow_private:
        return
    check_public_host(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), "webhook",
                      "MCS_WEBHOOK_ALLOW_PRIVATE")


def check_public_host(hostname: str, port: int, what: str, setting: str) -> None:
    """Refuse a host that resolves to any address that is not public (SSRF): webhooks, and S3 endpoints of
    imports (core/service/imports.py)."""
    try:
        infos = socket.getaddrinfo(hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeUrl(f"the {what} host {hostname!r} does not resolve: {exc}",
                        [{"field": "url", "message": "does not resolve"}]) from exc
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if not address.is_global or address.is_multicast:
            raise UnsafeUrl(f"the {what} host {hostname!r} resolves to {address}, which is not a public "
                            f"address (loopback, private, link-local or reserved); an operator can allow it with "
                            f"{setting}", [{"field": "url", "message": f"resolves to {address}"}])


def create_webhook(session: Session, tenant_id: str, url: str, events: list[str],
                   settings: Settings) -> Webhook:
    """Register a webhook; its `secret` is returned here and never again."""
    check_url(url, settings.webhook_allow_private)
    hook: Webhook = Webhooks(session, tenant_id).add(url=url, events=sorted(set(events)), secret=new_secret())
    session.commit()
    return hook


def retry_delay(attempts: int, settings: Settings) -> float:
    """Seconds before the next try after `attempts` failed ones: base, 2 x base, 4 x base, ... (capped at 1 h)."""
    return float(min(settings.webhook_retry_base_s * 2 ** (attempts - 1), MAX_RETRY_DELAY_S))


def deliver(delivery_id: str, settings: Settings) -> float | None:
    """One attempt of a pending delivery, recorded in its log. Returns the delay before the next attempt, or None
    when it succeeded (a 2xx), used its last attempt (it ends `failed`) or is no longer pending."""
    with session_scope() as session:
        found = Deliveries(session).pending(delivery_id)
        if found is None:
            return None
        delivery, hook = found
        url, secret, payload, number = hook.url, hook.secret, delivery.payload, delivery.attempts + 1
    attempt = _attempt(url, secret, delivery_id, payload, settings)
    attempt["attempt"] = number
    succeeded = attempt["status_code"] is not None and 200 <= attempt["status_code"] < 300
    last = number >= settings.webhook_max_attempts
    status = DeliveryStatus.succeeded if succeeded else DeliveryStatus.failed if last else DeliveryStatus.pending
    with session_scope() as session:
        Deliveries(session).record(delivery_id, attempt, status)
    return None if succeeded or last else retry_delay(number, settings)


def _attempt(url: str, secret: str, message_id: str, payload: dict[str, Any], settings: Settings) -> dict[str, Any]:
    body = json.dumps(payload, separators=(",", ":")).encode()
    timestamp = int(time.time())
    headers = {"content-type": "application/json", "user-agent": "mcs-webhooks", "webhook-id": message_id,
               "webhook-timestamp": str(timestamp), "webhook-signature": sign(secret, message_id, timestamp, body)}
    started, at = time.monotonic(), utcnow().isoformat()
    status_code, error = None, None
    try:
        check_url(url, settings.webhook_allow_private)
        response = httpx.post(url, content=body, headers=headers, timeout=settings.webhook_timeout_s,
                              follow_redirects=False)
        status_code = response.status_code
        if not 200 <= status_code < 300:
            error = f"HTTP {status_code}: {response.text[:200]}"
    except (httpx.HTTPError, ServiceError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:500]
    return {"at": at, "status_code": status_code, "error": error,
            "duration_ms": round((time.monotonic() - started) * 1000, 1)}
