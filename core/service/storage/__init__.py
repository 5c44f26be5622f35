"""Artifact storage: a small protocol with a local-filesystem implementation (the default) and an S3-compatible one
(`MCS_ARTIFACT_URL=s3://bucket/prefix`).

Keys are relative paths such as `models/<id>/model` (a folder) or `artifacts/<job>/attempt-<n>/model.zip` (a file).
"""

import os
from functools import lru_cache

from core.service.storage.local import LocalArtifactStore
from core.service.storage.protocol import ArtifactStore

__all__ = ["ArtifactStore", "LocalArtifactStore", "get_store"]


def get_store() -> ArtifactStore:
    from core.service.settings import get_settings

    settings = get_settings()
    if settings.artifact_url:
        return _s3_store(settings.artifact_url, settings.s3_endpoint_url, settings.s3_public_endpoint_url,
                         settings.s3_multipart_threshold_bytes, settings.s3_multipart_chunk_bytes, os.getpid())
    assert settings.artifact_dir is not None
    return LocalArtifactStore(settings.artifact_dir)


@lru_cache(maxsize=8)
def _s3_store(url: str, endpoint_url: str, public_endpoint_url: str, threshold: int, chunk: int,
              pid: int) -> ArtifactStore:
    """One client per process and configuration (a boto3 client costs milliseconds to build; a forked worker
    process must not share its parent's connections, hence the pid in the cache key)."""
    from core.service.storage.s3 import S3ArtifactStore, parse_s3_url

    bucket, prefix = parse_s3_url(url)
    return S3ArtifactStore(bucket, prefix, endpoint_url or None, public_endpoint_url or None, threshold, chunk)
