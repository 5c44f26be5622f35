from collections.abc import Iterator
from pathlib import Path
from typing import Protocol


class ArtifactStore(Protocol):
    def put_file(self, key: str, source: Path) -> None:
        """Store `source` under `key` atomically (readers see the old object or the new one, never half)."""

    def put_tree(self, key: str, source_dir: Path) -> None:
        """Store a whole folder under `key`, atomically replacing any previous one. `source_dir` is consumed (moved
        into place where it can be, so a big model is not copied)."""

    def local_tree(self, key: str) -> Path:
        """A local folder with the tree stored under `key` (the folder itself for the local store)."""

    def local_file(self, key: str) -> Path:
        """A local path holding the file stored under `key`."""

    def size(self, key: str) -> int: ...

    def read_range(self, key: str, start: int, end: int, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Yield bytes start..end inclusive."""

    def delete(self, key: str) -> None:
        """Remove a file or a tree; missing keys are ignored."""
