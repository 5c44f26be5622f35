import anyio
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from api import queue
from api.deps import with_connection
from core.service.db.session import session_scope

router = APIRouter(tags=["health"])


class Readiness(BaseModel):
    status: str
    checks: dict[str, bool]


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "The database or the broker is unreachable"}})
async def readyz() -> JSONResponse:
    """The database and the broker are reachable (503 otherwise, naming which is not)."""
    database = await with_connection(_database_ok)
    checks = {"database": database, "broker": await anyio.to_thread.run_sync(queue.broker_reachable)}
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
