"""Hostile inputs: every test here feeds the service something crafted and checks the clear 4xx, that nothing
was stored or left in scratch, and that no code ran."""

from pathlib import Path

from core.settings import get_settings
from tests.api.conftest import auth, bert_folder, client, other_auth, unlimited_app, upload  # noqa: F401 (shared fixtures)


def leftovers() -> list[Path]:
    """Stored models and scratch entries: after a refused upload both must be empty."""
    settings = get_settings()
    roots = [settings.artifact_dir / "models", settings.work_dir]
    return sorted(p for root in roots if root.exists() for p in root.iterdir())
