"""The ASGI app: `uvicorn api.main:app`."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import errors
from api.limits import BodyLimits, Cap
from api.observability import BindTenant, Observe
from api.ratelimit import Admission, rate_limit_buckets
from api.routers import artifacts, datasets, events, health, jobs, metrics, models, presets, ui, uploads, webhooks
from api.routers.evaluations import router as evaluations_router
from api.routers.keys import router as keys_router
from api.routers.quotas import router as quotas_router
from api.routers.reports import router as reports_router
from api.routers.searches import router as searches_router
from core.service.db.session import make_async_read_engine
from core.service.logs import configure_logging
from core.service.scratch import remove_stale_scratch
from core.service.settings import get_settings

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """An API process killed mid-upload leaves its scratch folder behind: remove stale ones when an API starts, so
    that a deployment without workers on this volume is swept too (workers also sweep every MCS_SWEEP_INTERVAL_S).
    The asyncio engine for the hot reads (`api.deps.read`) lives as long as the event loop that serves them."""
    settings = get_settings()
    removed = remove_stale_scratch(settings)
    if removed:
        log.warning("removed %d stale upload folder(s) left by a stopped API process", removed)
    app.state.read_engine = make_async_read_engine(settings.database_url, settings.db_pool_size)
    try:
        yield
    finally:
        if app.state.read_engine is not None:
            await app.state.read_engine.dispose()
        app.state.read_engine = None


def create_app() -> FastAPI:
    settings = get_settings()
    configure_logging("api")
    app = FastAPI(
        title="Model compression service",
        version="0.1.0",
        description="Upload a Hugging Face model, run a compression recipe on a worker, download the result.",
        lifespan=lifespan,
        form_limits={"max_files": settings.max_form_files, "max_fields": settings.max_form_fields,
                     "max_part_size": settings.max_form_field_bytes},
    )
    app.add_middleware(BodyLimits, upload=Cap(settings.max_upload_bytes + 64 * 1024, "MCS_MAX_UPLOAD_BYTES"),
                       json=Cap(settings.max_json_bytes, "MCS_MAX_JSON_BYTES"), timeout_s=settings.body_timeout_s,
                       streamed=Cap(settings.max_upload_file_bytes, "MCS_MAX_UPLOAD_FILE_BYTES"))
    app.add_middleware(BindTenant)  # inside Admission: the tenant is known
    # added after the limits, so it runs before them: a request without a valid key, or over its rate limit, costs no
    # body
    app.add_middleware(Admission, buckets=rate_limit_buckets(settings))
    # outermost: request id, access log and HTTP metrics cover the requests Admission refuses too
    app.add_middleware(Observe, routed=app)
    errors.install(app)
    for module in (health, metrics, models, uploads, datasets, jobs, events, artifacts, webhooks, presets, ui):
        app.include_router(module.router)
    app.include_router(evaluations_router)
    app.include_router(reports_router)
    app.include_router(searches_router)
    app.include_router(keys_router)
    app.include_router(quotas_router)
    return app


app = create_app()
