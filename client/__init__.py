"""The Python client of the model compression service (httpx, synchronous).

    from client import Client
    with Client("http://127.0.0.1:8000", "mcs_...") as mcs:      # or MCS_API_URL / MCS_API_KEY / config file
        model = mcs.models.upload("path/to/hf-folder")               # chunked, resumable, progress bar
        job = mcs.jobs.submit(model, "recipe.yaml").wait()          # polls until the job ended
        if job.status == "succeeded":
            job.download("out/")                                     # resumes with Range, checks the sha256 ETag

Responses are the API's own pydantic schemas (`api.schemas`): `ModelOut`, `DatasetOut`, `JobOut` (as `Job`, with
methods), `Page`. Every failure is an `ApiError` with the API's `code`, `message` and `details`. See docs/client.md.
"""

from api.schemas import ArtifactOut, DatasetOut, JobOut, JobStatus, ModelOut, Page
from client.client import Client
from client.config import config_path
from client.errors import ApiError
from client.jobs import TERMINAL, Job
from client.progress import Lines, Reporter, Rich, Silent

__all__ = ["TERMINAL", "ApiError", "ArtifactOut", "Client", "DatasetOut", "Job", "JobOut", "JobStatus", "Lines",
           "ModelOut", "Page", "Reporter", "Rich", "Silent", "config_path"]
