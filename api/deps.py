"""Typed dependencies: routes declare what they need (`SessionDep`, `TenantDep`, ...) and never build it.

Dependencies without I/O are `async def`: a sync one costs a trip through anyio's thread pool, which the routes
need. A request takes a connection slot (first come, first served, in the event loop) before it takes a pooled
connection, and gives the slot back after the connection: there are as many slots as the pool has connections, so no
thread ever waits for the pool. When threads did, 64 pollers parked every thread on the pool while the requests
holding its connections queued for a thread to go on: 0 requests in 8 s, then `QueuePool limit ... reached`."""

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import cache
from typing import Annotated, TypeVar

import anyio
from fastapi import Depends, Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session
from starlette.types import Scope

from core.errors import InvalidRequest, Unauthorized, Unavailable
from core.service.db.models import Tenant
from core.service.db.repositories import Artifacts, Datasets, Jobs, Models
from core.service.db.session import async_read_scope, connect, read_scope, session_factory
from core.service.keys import Principal, authenticate_key
from core.service.settings import Settings, get_settings
from core.service.storage import ArtifactStore, get_store

T = TypeVar("T")
SLOT_WAIT_S = 10  # as long as the pool's own timeout once was: a longer queue is shed with a 503


def _pool_capacity() -> int:
    settings = get_settings()
    return settings.db_pool_size + settings.db_max_overflow


@cache
def _slots() -> anyio.Semaphore:
    return anyio.Semaphore(_pool_capacity())


@cache
def connection_threads() -> anyio.CapacityLimiter:
    """Threads that take, give back or briefly use a connection: one per slot, so they never wait for each other
    nor for the threads that routes run on."""
    return anyio.CapacityLimiter(_pool_capacity())


@asynccontextmanager
async def connection_slot() -> AsyncIterator[None]:
    try:
        with anyio.fail_after(SLOT_WAIT_S):
            await _slots().acquire()
    except TimeoutError as exc:
        raise Unavailable("the database is busy; try again shortly") from exc
    try:
        yield
    finally:
        _slots().release()


async def with_connection(function: Callable[..., T], *args: object) -> T:
    """Run `function`, which takes and gives back its own connection, in a thread once a slot is free."""
    async with connection_slot():
        return await anyio.to_thread.run_sync(function, *args, limiter=connection_threads())


async def get_session() -> AsyncIterator[Session]:
    """A session on a connection taken before the route runs and given back as soon as it returns (before a
    download streams)."""
    async with connection_slot():
        connection = await anyio.to_thread.run_sync(connect, limiter=connection_threads())
        session = session_factory()(bind=connection)
        try:
            yield session
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_give_back, session, connection, limiter=connection_threads())


def _give_back(session: Session, connection: Connection) -> None:
    session.close()
    connection.close()


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


async def reject_unknown_query(request: Request) -> None:
    """A misspelt query parameter (`?pagesize=5`) would otherwise be ignored and the default used without a word:
    refuse it with the usual 422 listing each unknown name and the names the route accepts."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None or not request.scope["query_string"]:
        return
    known = sorted(_query_names(dependant))
    unknown = sorted(set(request.query_params) - set(known))
    if unknown:
        allowed = ", ".join(known) or "none"
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


def bearer_key(scope: Scope) -> str:
    """The key of the request's `Authorization: Bearer <key>` header, '' without one. Two headers are an
    `InvalidRequest`: servers and proxies disagree on which of them counts."""
    values = [value for name, value in scope["headers"] if name == b"authorization"]
    if len(values) > 1:
        raise InvalidRequest(f"send one Authorization header, not {len(values)}")
    scheme, _, key = values[0].decode("latin-1").partition(" ") if values else ("", "", "")
    return key.strip() if scheme.lower() == "bearer" else ""


async def authenticate(scope: Scope) -> Principal:
    """The tenant and scopes of the request's API key, looked up (never cached: a revocation holds at the next
    request on every process) on a connection held only for the query. Unknown, revoked, expired: `Unauthorized`."""
    key = bearer_key(scope)
    if not key:
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>` (create one with `mcs keys create`)")
    return await read(scope, lambda session: authenticate_key(session, key))


async def read(scope: Scope, function: Callable[[Session], T]) -> T:
    """`function(session)` on a read-only session: on the app's asyncio engine (`api.main.lifespan`) when it has
    one, with no thread hop; else in one thread hop once a slot is free. For the key check and the routes clients
    poll, where `SessionDep` and a sync route cost three hops (take the connection, run the route, give it back)."""
    engine: AsyncEngine | None = getattr(scope["app"].state, "read_engine", None)
    if engine is None:
        return await with_connection(_read, function)
    async with async_read_scope(engine) as session:
        return await session.run_sync(function)


def _read(function: Callable[[Session], T]) -> T:
    with read_scope() as session:
        return function(session)


READ_METHODS = ("GET", "HEAD", "OPTIONS")


def required_scope(scope: Scope) -> str:
    """The scope a /v1 request needs, by one rule for every route: `admin` under /v1/admin/, `read` to read,
    `write` for anything else (submit, upload, cancel, delete)."""
    if scope["path"].startswith("/v1/admin/"):
        return "admin"
    return "read" if scope["method"] in READ_METHODS else "write"


async def current_tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Tenant:
    """The tenant that `api.ratelimit.Admission` authenticated before the body was read, so a request's key is
    looked up once (`credentials` declares the bearer scheme in the OpenAPI document)."""
    tenant: Tenant = request.state.tenant
    return tenant


TenantDep = Annotated[Tenant, Depends(current_tenant)]


async def models_repo(session: SessionDep, tenant: TenantDep) -> Models:
    return Models(session, tenant.id)


async def jobs_repo(session: SessionDep, tenant: TenantDep) -> Jobs:
    return Jobs(session, tenant.id)


async def datasets_repo(session: SessionDep, tenant: TenantDep) -> Datasets:
    return Datasets(session, tenant.id)


async def artifacts_repo(session: SessionDep, tenant: TenantDep) -> Artifacts:
    return Artifacts(session, tenant.id)


ModelsDep = Annotated[Models, Depends(models_repo)]
JobsDep = Annotated[Jobs, Depends(jobs_repo)]
DatasetsDep = Annotated[Datasets, Depends(datasets_repo)]
ArtifactsDep = Annotated[Artifacts, Depends(artifacts_repo)]
