"""Rows that own stored files (models, datasets): the files never outlive or precede their committed row."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy.orm import Session

from core.service.storage import ArtifactStore


@contextmanager
def discard_unless_committed(store: ArtifactStore, key: str) -> Iterator[None]:
    """Remove what was stored under `key` if recording its row fails: nothing is left half-written."""
    try:
        yield
    except BaseException:
        store.delete(key)
        raise


def delete_with_files(repo: Any, row: Any, session: Session, store: ArtifactStore) -> None:
    """Delete the row first (commit), then its files: a crash in between leaves only unreferenced files."""
    repo.delete(row)
    session.commit()
    if row.storage_key:  # empty: a model deleted while importing (its worker removes what it stored)
        store.delete(row.storage_key)
