"""The ASGI app: `uvicorn api.main:app`."""

from fastapi import FastAPI

from api import errors
from api.limits import BodySizeLimit
from api.ratelimit import RateLimit
from api.routers import artifacts, datasets, health, jobs, models
from core.settings import get_settings


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(
        title="Model compression service",
        version="0.1.0",
        description="Upload a Hugging Face model, run a compression recipe on a worker, download the result.",
        form_limits={"max_files": settings.max_form_files, "max_fields": settings.max_form_fields,
                     "max_part_size": settings.max_form_field_bytes},
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + 64 * 1024)
    # added last, so it runs first: a client over its limit costs no body parsing and no database query
    app.add_middleware(RateLimit, per_minute=settings.rate_limit_per_minute, burst=settings.rate_limit_burst)
    errors.install(app)
    for module in (health, models, datasets, jobs, artifacts):
        app.include_router(module.router)
    return app


app = create_app()
