"""Artifact storage: a small protocol with a local-filesystem implementation (the default).

Keys are relative paths such as `models/<id>/model` (a folder) or `artifacts/<job>/attempt-<n>/model.zip` (a file); an
S3-compatible store implements the same methods.
"""

from core.service.storage.local import LocalArtifactStore
from core.service.storage.protocol import ArtifactStore

__all__ = ["ArtifactStore", "LocalArtifactStore", "get_store"]


def get_store() -> ArtifactStore:
    from core.service.settings import get_settings

    settings = get_settings()
    assert settings.artifact_dir is not None
    return LocalArtifactStore(settings.artifact_dir)
