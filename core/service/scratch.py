"""Sweeping scratch that a killed process left behind: upload folders of an API killed mid-upload, job folders of
a worker killed mid-job. Shared by the API (at startup) and the workers' periodic sweeper."""

import shutil
import time
from pathlib import Path

from core.service.settings import Settings

UPLOAD_PREFIXES = ("upload-", "dataset-")
JOB_PREFIX = "job-"
CHUNKED_PREFIX = "chunked-"  # a resumable upload: kept until untouched for its whole MCS_UPLOAD_TTL_S


def remove_stale_scratch(settings: Settings, running_job_ids: set[str] | None = None) -> int:
    """Remove upload folders untouched for MCS_SCRATCH_MAX_AGE_S (an upload in flight keeps writing to its own),
    and, given the running jobs, folders of jobs not running (older than a lease, so a job claimed a moment ago
    keeps its new folder). Without `running_job_ids` (the API does not track jobs) job folders are left alone.
    Returns how many folders were removed."""
    if not settings.work_dir.is_dir():
        return 0
    removed = 0
    for entry in settings.work_dir.iterdir():
        max_age = _max_age(entry.name, settings, running_job_ids)
        if max_age is not None and _last_modified(entry) < time.time() - max_age:
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


def _max_age(name: str, settings: Settings, running_job_ids: set[str] | None) -> float | None:
    """How long a scratch entry may sit untouched before it is stale; None: never ours to remove."""
    if name.startswith(UPLOAD_PREFIXES):
        return settings.scratch_max_age_s
    if name.startswith(CHUNKED_PREFIX):  # its last change is after its creation: never swept before it expires
        return settings.upload_ttl_s
    if name.startswith(JOB_PREFIX) and running_job_ids is not None:
        return None if name.removeprefix(JOB_PREFIX) in running_job_ids else settings.job_lease_s
    return None


def _last_modified(folder: Path) -> float:
    try:
        return max([folder.stat().st_mtime, *(child.stat().st_mtime for child in folder.iterdir())])
    except OSError:  # removed meanwhile by its owner
        return time.time()
