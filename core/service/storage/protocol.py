from collections.abc import Iterator
from pathlib import Path
from typing import Protocol


class ArtifactStore(Protocol):
    def put_file(self, key: str, source: Path) -> None:
        """Store `source` under `key` atomically (readers see the old object or the new one, never half)."""

    def put_stream(self, key: str, chunks: Iterator[bytes]) -> int:
        """Store the bytes `chunks` yields under `key` atomically, holding at most one part in memory and nothing on
        local disk but the store's own files; if the iterator raises, nothing is stored. Returns the size."""

    def put_tree(self, key: str, source_dir: Path) -> None:
        """Store a whole folder under `key`, atomically replacing any previous one. `source_dir` is consumed (moved
        into place where it can be, so a big model is not copied; removed once uploaded otherwise)."""

    def local_tree(self, key: str, into: Path) -> Path:
        """A local folder with the tree stored under `key`: the stored folder itself for the local store, else a
        copy downloaded into `into` (the caller's scratch: the caller removes it; a copy already there is reused)."""

    def local_file(self, key: str, into: Path) -> Path:
        """A local path holding the file stored under `key`: the stored file itself for the local store, else a
        copy downloaded to `into` (as for `local_tree`)."""

    def size(self, key: str) -> int: ...

    def read_range(self, key: str, start: int, end: int, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Yield bytes start..end inclusive, streamed (never the whole range in memory)."""

    def presigned_url(self, key: str, expires_s: int, disposition: str, content_type: str) -> str | None:
        """A URL a client can GET the file from directly for `expires_s` seconds, answered with this
        Content-Disposition and Content-Type; None where the store has no such URLs (local disk)."""

    def delete(self, key: str) -> None:
        """Remove a file or a tree; missing keys are ignored."""
