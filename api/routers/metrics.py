"""`GET /metrics`: Prometheus' text format on the API port (as vLLM serves it), optionally behind a bearer token
(MCS_METRICS_TOKEN)."""

import hmac
from functools import cache
from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import Response
from prometheus_client.registry import CollectorRegistry

from api.deps import SettingsDep, with_connection
from api.errors import error_responses
from core.errors import Unauthorized
from core.service import metrics
from core.service.capacity import LIVE_SWEEPS
from core.service.settings import get_settings

router = APIRouter(tags=["health"])


@cache
def _registry() -> CollectorRegistry:
    settings = get_settings()
    return metrics.registry(settings.broker_url, LIVE_SWEEPS * settings.sweep_interval_s)


@router.get("/metrics", response_class=Response, responses={
    200: {"description": "Prometheus text exposition format", "content": {metrics.CONTENT_TYPE_LATEST: {}}},
    **error_responses(401)})
async def prometheus_metrics(
    settings: SettingsDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    """Request counts and latencies by route, jobs by state and queue, queue depth, job and step durations by step
    type, worker heartbeats, bytes uploaded and downloaded. With MCS_METRICS_TOKEN set, send it as
    `Authorization: Bearer <token>` (401 otherwise)."""
    if settings.metrics_token and not _bearer_matches(authorization or "", settings.metrics_token):
        raise Unauthorized("GET /metrics needs `Authorization: Bearer <MCS_METRICS_TOKEN>`")
    body = await with_connection(metrics.render, _registry())
    return Response(body, media_type=metrics.CONTENT_TYPE_LATEST)


def _bearer_matches(authorization: str, token: str) -> bool:
    scheme, _, sent = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(sent.strip().encode(), token.encode())
