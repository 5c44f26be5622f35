from fastapi import APIRouter, Response

from api import queue
from api.deps import V1_DEPENDENCIES, PageNumber, PageSize, SessionDep, SettingsDep, TenantDep
from api.errors import V1_ERRORS, error_responses
from api.routers.reports import REPORT_RESPONSES
from api.schemas import Page, SearchCreate, SearchOut
from core.compression.search import SearchSpec
from core.service.db.models import Search, SearchStatus
from core.service.db.repositories import Searches
from core.service.reports import CONTENT_SECURITY_POLICY
from core.service.search_report import search_report
from core.service.searches import cancel_search, submit_search

router = APIRouter(prefix="/v1/searches", tags=["searches"], responses=V1_ERRORS, dependencies=V1_DEPENDENCIES)


@router.post("", status_code=202, response_model=SearchOut, responses=error_responses(400, 404, 409, 413, 503))
def create_search(body: SearchCreate, response: Response, session: SessionDep, tenant: TenantDep,
                  settings: SettingsDep) -> SearchOut:
    """Search for the smallest (or fastest) recipe whose evaluation on your held-out dataset meets the constraint.
    Trials are ordinary jobs on the queue's workers (`parallelism` at a time); trial 0 scans per-weight sensitivity,
    which later trials use to keep the weights that break the budget at higher precision. Poll
    GET /v1/searches/{id}; GET /v1/searches/{id}/report draws every trial."""
    spec = SearchSpec.model_validate(body.model_dump(exclude={"model_id", "queue"}))
    search = submit_search(session, tenant.id, body.model_id, spec, body.queue or settings.default_queue,
                           queue.enqueue, settings)
    response.headers["Location"] = f"/v1/searches/{search.id}"
    return SearchOut.model_validate(search)


@router.get("", response_model=Page[SearchOut])
def list_searches(session: SessionDep, tenant: TenantDep, status: SearchStatus | None = None, page: PageNumber = 1,
                  page_size: PageSize = 20) -> Page[SearchOut]:
    filters = [Search.status == status] if status else []
    return Page.of(Searches(session, tenant.id).page(page, page_size, *filters), SearchOut.model_validate, page,
                   page_size)


@router.get("/{search_id}", response_model=SearchOut, responses=error_responses(404))
def get_search(search_id: str, session: SessionDep, tenant: TenantDep) -> SearchOut:
    return SearchOut.model_validate(Searches(session, tenant.id).get(search_id))


@router.post("/{search_id}/cancel", response_model=SearchOut, responses=error_responses(404, 409))
def cancel(search_id: str, session: SessionDep, tenant: TenantDep) -> SearchOut:
    """End the search `cancelled` and cancel its queued and running trials (a running trial stops at its next
    check). A search that already ended is a 409."""
    return SearchOut.model_validate(cancel_search(session, tenant.id, search_id))


@router.get("/{search_id}/report", response_class=Response, responses=REPORT_RESPONSES)
def get_search_report(search_id: str, session: SessionDep, tenant: TenantDep) -> Response:
    """A self-contained HTML page: every trial on a size-quality plot with the Pareto front and the constraint line,
    the trials with their CIs, and the best recipe."""
    return Response(search_report(session, tenant.id, search_id), media_type="text/html; charset=utf-8",
                    headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})
