"""The ASGI app: `uvicorn api.main:app`."""

from fastapi import FastAPI

from api import errors
from api.limits import BodySizeLimit
from api.routers import artifacts, datasets, health, jobs, models
from core.settings import get_settings


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(
        title="Model compression service",
        version="0.1.0",
        description="Upload a Hugging Face model, run a compression recipe on a worker, download the result.",
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + 64 * 1024)
    errors.install(app)
    for module in (health, models, datasets, jobs, artifacts):
        app.include_router(module.router)
    return app


app = create_app()
