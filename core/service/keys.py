"""API keys: who a key is, what it may do (scopes), until when (expiry), and the operator's and tenant admin's
verbs on keys (create, list, revoke, rotate). `mcs keys ...` and `/v1/admin/keys` both call these.

A key is checked against the database on every request and never cached, so a revocation holds from the next
request on, on every API process. The lookup is one indexed query on the key's hash (the same query as before
scopes existed), so nothing is gained by a cache that would then need invalidating across processes.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session

from core.errors import Conflict, InsufficientScope, InvalidRequest, Unauthorized
from core.service.db.models import ApiKey, Tenant, utcnow
from core.service.db.repositories import Tenants

SCOPES = ("read", "write", "admin")
# A scope grants the ones below it: a key that may submit may also read its jobs; an admin key may do anything its
# tenant may. Keys store the expanded list, so a check is one membership test.
IMPLIED = {"read": {"read"}, "write": {"read", "write"}, "admin": {"read", "write", "admin"}}
DEFAULT_SCOPES = ("read", "write")  # what every key could do before scopes existed (migration 0007)
MAX_GRACE_S = 7 * 24 * 3600


@dataclass(frozen=True)
class Principal:
    """The caller of a request: its tenant and the key it used."""

    tenant: Tenant
    key_id: str
    scopes: tuple[str, ...]


def expand_scopes(scopes: Iterable[str]) -> list[str]:
    """The scopes a key with `scopes` holds, in the order of SCOPES; an unknown name is an `InvalidRequest`."""
    names = list(scopes)
    unknown = sorted(set(names) - set(SCOPES))
    if unknown or not names:
        raise InvalidRequest(f"scopes must be some of {', '.join(SCOPES)}; got {', '.join(unknown) or 'none'}",
                             {"field": "scopes", "allowed": list(SCOPES)})
    held = set().union(*(IMPLIED[name] for name in names))
    return [name for name in SCOPES if name in held]


def authenticate_key(session: Session, plaintext: str) -> Principal:
    """The principal of an active key; an unknown, revoked or expired one is `Unauthorized`."""
    found = Tenants(session).for_api_key(plaintext)
    if found is None:
        raise Unauthorized("the API key is unknown or revoked")
    tenant, key = found
    if is_expired(key):
        raise Unauthorized(f"the API key {key.prefix}… expired at {_aware(key.expires_at):%Y-%m-%d %H:%M:%S} UTC")
    return Principal(tenant, key.id, tuple(key.scopes))


def require_scope(principal: Principal, scope: str) -> None:
    if scope not in principal.scopes:
        raise InsufficientScope(
            f"this request needs an API key with the `{scope}` scope; this key has: {', '.join(principal.scopes)}",
            {"required_scope": scope, "scopes": list(principal.scopes)},
        )


def is_expired(key: ApiKey, now: datetime | None = None) -> bool:
    return key.expires_at is not None and _aware(key.expires_at) <= (now or utcnow())


def create_key(session: Session, tenant_id: str, scopes: Sequence[str] = DEFAULT_SCOPES,
               expires_at: datetime | None = None, name: str | None = None) -> tuple[ApiKey, str]:
    """A new key's row and its plain text (shown once; the caller commits)."""
    if expires_at is not None and _aware(expires_at) <= utcnow():
        raise InvalidRequest("expires_at must be in the future", {"field": "expires_at"})
    return Tenants(session).add_api_key(tenant_id, expand_scopes(scopes), expires_at, name)


def revoke_key(session: Session, key: ApiKey) -> ApiKey:
    if key.revoked_at is not None:
        raise Conflict(f"API key {key.id} was already revoked at {_aware(key.revoked_at):%Y-%m-%d %H:%M:%S} UTC")
    key.revoked_at = utcnow()
    session.flush()
    return key


def rotate_key(session: Session, key: ApiKey, grace_s: int = 0) -> tuple[ApiKey, str]:
    """A new key with the old one's name, scopes and lifetime; the old one is revoked now, or with `grace_s` expires
    that much later (Stripe's rolling keys: deploy the new key, then let the old lapse)."""
    if key.revoked_at is not None or is_expired(key):
        raise Conflict(f"API key {key.id} is revoked or expired; create a new key instead")
    if not 0 <= grace_s <= MAX_GRACE_S:
        raise InvalidRequest(f"grace_s must be between 0 and {MAX_GRACE_S}", {"field": "grace_s"})
    now = utcnow()
    lifetime = _aware(key.expires_at) - _aware(key.created_at) if key.expires_at else None
    new = Tenants(session).add_api_key(key.tenant_id, key.scopes, now + lifetime if lifetime else None, key.name)
    if grace_s == 0:
        key.revoked_at = now
    else:
        ends = now + timedelta(seconds=grace_s)
        key.expires_at = min(_aware(key.expires_at), ends) if key.expires_at else ends
    session.flush()
    return new


def _aware(moment: datetime | None) -> datetime:
    """SQLite hands back naive datetimes for timezone-aware columns; they were written in UTC."""
    assert moment is not None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
