from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from api import queue
from api.deps import SessionDep

router = APIRouter(tags=["health"])


class Readiness(BaseModel):
    status: str
    checks: dict[str, bool]


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "The database or the broker is unreachable"}})
def readyz(session: SessionDep) -> JSONResponse:
    """The database and the broker are reachable (503 otherwise, naming which is not)."""
    checks = {"database": _database_ok(session), "broker": queue.broker_reachable()}
    ready = all(checks.values())
    body = {"status": "ready" if ready else "unavailable", "checks": checks}
    return JSONResponse(body, status_code=200 if ready else 503)


def _database_ok(session: SessionDep) -> bool:
    try:
        session.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
