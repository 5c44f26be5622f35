import tempfile

import anyio
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from api import queue
from api.deps import with_connection
from core.service.db.session import session_scope
from core.service.storage import LocalArtifactStore, get_store

router = APIRouter(tags=["health"])
# An object store that does not answer within this is down for readiness (its client retries for longer)
STORE_CHECK_S = 3.0


class Readiness(BaseModel):
    status: str
    checks: dict[str, bool]


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness,
            responses={503: {"model": Readiness,
                             "description": "The database, the broker or the artifact store is unreachable"}})
async def readyz() -> JSONResponse:
    """The database, the broker and the artifact store are reachable (the bucket answers; a local store's folder
    is writable); 503 otherwise, naming which is not."""
    database = await with_connection(_database_ok)
    checks = {"database": database, "broker": await anyio.to_thread.run_sync(queue.broker_reachable),
              "store": await _store_ok()}
    ready = all(checks.values())
    body = {"status": "ready" if ready else "unavailable", "checks": checks}
    return JSONResponse(body, status_code=200 if ready else 503)


def _database_ok() -> bool:
    try:
        with session_scope() as session:
            session.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


async def _store_ok() -> bool:
    with anyio.move_on_after(STORE_CHECK_S):
        return await anyio.to_thread.run_sync(_store_answers, abandon_on_cancel=True)
    return False


def _store_answers() -> bool:
    try:
        store = get_store()
        if isinstance(store, LocalArtifactStore):
            with tempfile.NamedTemporaryFile(dir=store.root, prefix=".readyz-"):
                return True
        ready = getattr(store, "ready", None)
        return bool(ready()) if ready is not None else True
    except Exception:
        return False
