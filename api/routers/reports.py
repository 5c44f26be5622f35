from typing import Any

from fastapi import APIRouter, Response

from api.deps import V1_DEPENDENCIES, SessionDep, TenantDep
from api.errors import V1_ERRORS, error_responses
from core.service.reports import CONTENT_SECURITY_POLICY, job_report

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=V1_ERRORS, dependencies=V1_DEPENDENCIES)
# A plain Response class (no media type of its own) so the error bodies stay documented as JSON beside the page.
REPORT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The report: one HTML page, charts embedded as PNGs, nothing fetched",
          "content": {"text/html": {"schema": {"type": "string"}}}},
    **error_responses(404),
}


@router.get("/{job_id}/report", response_class=Response, responses=REPORT_RESPONSES)
def get_job_report(job_id: str, session: SessionDep, tenant: TenantDep) -> Response:
    """A self-contained HTML page (charts embedded, nothing fetched): before/after with the evaluation's CIs, what
    each step cost, per-layer error or sensitivity, and where the artifact's bytes went."""
    return Response(job_report(session, tenant.id, job_id), media_type="text/html; charset=utf-8",
                    headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})
