import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from core.errors import NotFound, UnsafeInput


class LocalArtifactStore:
    """Artifacts as files under one root; writes go to a temporary name on the same filesystem, are fsynced and
    renamed into place, so a crash never leaves a half-written artifact under its final key."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        target = (self.root / key).resolve()
        if not target.is_relative_to(self.root) or target == self.root:
            raise UnsafeInput(f"storage key {key!r} escapes the artifact root")
        return target

    def put_file(self, key: str, source: Path) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            shutil.copyfile(source, staging)
            with staging.open("rb") as handle:
                os.fsync(handle.fileno())
            os.replace(staging, target)
        except BaseException:  # e.g. the disk filled up: no half-written staging file stays behind
            staging.unlink(missing_ok=True)
            raise

    def put_stream(self, key: str, chunks: Iterator[bytes]) -> int:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        size = 0
        try:
            with staging.open("xb") as out:
                for chunk in chunks:
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(staging, target)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
        return size

    def put_tree(self, key: str, source_dir: Path) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            _move_or_copy(source_dir, staging)
            for file in staging.rglob("*"):
                if file.is_file():
                    with file.open("rb") as handle:
                        os.fsync(handle.fileno())
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        old = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)

    def local_tree(self, key: str, into: Path | None = None) -> Path:
        target = self.path(key)
        if not target.is_dir():
            raise NotFound(f"stored folder {key!r} is missing")
        return target

    def local_file(self, key: str, into: Path | None = None) -> Path:
        target = self.path(key)
        if not target.is_file():
            raise NotFound(f"stored file {key!r} is missing")
        return target

    def size(self, key: str) -> int:
        target = self.path(key)
        if not target.is_file():
            raise NotFound(f"stored file {key!r} is missing")
        return target.stat().st_size

    def read_range(self, key: str, start: int, end: int, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        with self.path(key).open("rb") as handle:
            handle.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                chunk = handle.read(min(chunk_size, remaining))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk

    def presigned_url(self, key: str, expires_s: int, disposition: str, content_type: str) -> str | None:
        return None  # files on local disk are served through the API

    def delete(self, key: str) -> None:
        target = self.path(key)
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)


def _move_or_copy(source_dir: Path, target: Path) -> None:
    """Move the folder when it is on the artifact filesystem (scratch is: a 140 GB upload is renamed, not copied);
    copy it from anywhere else."""
    try:
        os.rename(source_dir, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.copytree(source_dir, target)
