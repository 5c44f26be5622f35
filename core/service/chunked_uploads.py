"""Resumable, chunked uploads of a model folder, file by file (the archive upload stays for small models).

A client declares a manifest (file names, sizes, sha256), PUTs each file (resuming with `Content-Range` after a dropped
connection), then completes: the folder is validated exactly as an extracted archive is (`store_model_folder`) and
stored as a model. Progress is the size of the staging files, so a chunk costs no database write.

Staging of an upload, under MCS_ARTIFACT_DIR/tmp (same filesystem as the artifacts):
    chunked-<upload id>/parts/<name>   bytes received so far (appended to, one writer at a time)
    chunked-<upload id>/files/<name>   a file whose sha256 matched the manifest (renamed from parts/)
A failed validation at completion discards the upload: its manifest is fixed and its files match it, so the same files
would fail again; the client starts a new upload with the fixed files.
"""

import asyncio
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO

import anyio

from core.compression.modelio import plain_file_name
from core.errors import (
    ChecksumMismatch,
    Conflict,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    StorageFailed,
    UnsafeInput,
    UnsupportedModel,
)
from core.service.db.models import Upload, UploadStatus
from core.service.db.repositories import Uploads
from core.service.db.session import session_scope
from core.service.scratch import CHUNKED_PREFIX
from core.service.settings import Settings
from core.service.storage import ArtifactStore
from core.service.uploads import CHUNK, DISK_FULL, StoredUpload, store_model_folder

CONTENT_RANGE = re.compile(r"^bytes (\d{1,20})-(\d{1,20})/(\d{1,20})$")
# The sha256 of each part file as far as this process wrote it, so the next PUT of the same file continues the hash
# instead of re-reading the file (a 10 GB shard sent in 256 MiB PUTs would be read ~40 times over); a PUT that finds
# no entry at its offset (another API process wrote before, or the entry was evicted) re-reads the prefix once.
_DIGESTS: "OrderedDict[str, tuple[int, Any]]" = OrderedDict()
_DIGESTS_KEPT = 256
_DIGESTS_LOCK = threading.Lock()


@dataclass(frozen=True)
class FileProgress:
    path: str
    size: int
    sha256: str
    received: int
    complete: bool


@dataclass(frozen=True)
class FileTarget:
    """One manifest file of an open upload, where a PUT writes it."""

    path: str
    size: int
    sha256: str
    staging: Path

    @property
    def part(self) -> Path:
        return self.staging / "parts" / self.path

    @property
    def done(self) -> Path:
        return self.staging / "files" / self.path


def staging_dir(settings: Settings, upload_id: str) -> Path:
    return settings.work_dir / f"{CHUNKED_PREFIX}{upload_id}"


def check_manifest(files: list[dict[str, Any]], settings: Settings) -> None:
    """Refuse a manifest the service would not store: unsafe or repeated names, too many or too large files, no
    config.json or no safetensors weights."""
    names = [entry["path"] for entry in files]
    unsafe = [name for name in names if not plain_file_name(name)]
    if unsafe:
        raise UnsafeInput(f"{unsafe[0][:200]!r} is not a plain file name (no folders, '..', or control characters)",
                          {"files": unsafe[:10]})
    if len(set(names)) != len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise InvalidRequest("the manifest names a file twice", {"files": twice[:10]})
    if "config.json" not in names or not any(name.endswith(".safetensors") for name in names):
        raise InvalidRequest("the manifest must include config.json and at least one *.safetensors file")
    _check_sizes(files, settings)


def _check_sizes(files: list[dict[str, Any]], settings: Settings) -> None:
    if len(files) > settings.max_upload_files:
        raise PayloadTooLarge(f"{len(files)} files exceed the limit of {settings.max_upload_files} "
                              "(MCS_MAX_UPLOAD_FILES)")
    big = [entry["path"] for entry in files if entry["size"] > settings.max_upload_file_bytes]
    if big:
        raise PayloadTooLarge(f"{big[0]!r} exceeds the limit of {settings.max_upload_file_bytes:,} bytes per file "
                              "(MCS_MAX_UPLOAD_FILE_BYTES)", {"files": big[:10]})
    total = sum(entry["size"] for entry in files)
    if total > settings.max_model_upload_bytes:
        raise PayloadTooLarge(f"the files total {total:,} bytes; the limit is {settings.max_model_upload_bytes:,} "
                              "(MCS_MAX_MODEL_UPLOAD_BYTES)")


def create_upload(uploads: Uploads, name: str, files: list[dict[str, Any]], settings: Settings) -> Upload:
    """A new open upload with its empty staging folder (the caller commits). The tenant's expired uploads go first."""
    check_manifest(files, settings)
    manifest = [{"path": f["path"], "size": f["size"], "sha256": f["sha256"].lower()} for f in files]
    remove_expired(uploads, settings)
    row = uploads.add(name, manifest, timedelta(seconds=settings.upload_ttl_s))
    for sub in ("parts", "files"):
        (staging_dir(settings, row.id) / sub).mkdir(parents=True)
    return row


def remove_expired(uploads: Uploads, settings: Settings) -> None:
    expired = uploads.expired_ids()
    if expired:
        uploads.delete_ids(expired)
        for upload_id in expired:
            shutil.rmtree(staging_dir(settings, upload_id), ignore_errors=True)


def progress(upload: Upload, settings: Settings) -> list[FileProgress]:
    """Bytes received of each file, read from the staging files."""
    return [_file_progress(_target(upload, entry, settings)) for entry in upload.manifest]


def _target(upload: Upload, entry: dict[str, Any], settings: Settings) -> FileTarget:
    return FileTarget(entry["path"], entry["size"], entry["sha256"], staging_dir(settings, upload.id))


def _file_progress(target: FileTarget) -> FileProgress:
    complete = target.done.is_file()
    received = target.size if complete else _size(target.part)
    return FileProgress(target.path, target.size, target.sha256, received, complete)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def file_target(tenant_id: str, upload_id: str, path: str, settings: Settings) -> FileTarget:
    """The manifest file a PUT writes, on a connection held only for the lookup (a PUT may stream for minutes)."""
    with session_scope() as session:
        upload = Uploads(session, tenant_id).get(upload_id)
        if upload.status != UploadStatus.open:
            raise Conflict(f"upload {upload_id} is being completed; it takes no more bytes")
        entry = next((entry for entry in upload.manifest if entry["path"] == path), None)
        if entry is None:
            raise NotFound(f"upload {upload_id} declares no file named {path[:200]!r}", {"path": path[:200]})
        return _target(upload, entry, settings)


async def receive_file(target: FileTarget, content_range: str | None, content_length: int | None,
                       chunks: AsyncIterator[bytes]) -> FileProgress:
    """Append a request body to the file at the offset `Content-Range` names (0 without one), which must be the bytes
    received so far. The body is written in 1 MiB pieces (memory stays flat); what arrived before a dropped connection
    is kept. A complete file whose sha256 differs from the manifest is reset to 0 bytes (ChecksumMismatch)."""
    start, end = _range(content_range, target.size)
    if content_length is not None and start + content_length > end:
        raise PayloadTooLarge(f"a body of {content_length:,} bytes at offset {start:,} runs past byte {end:,} of "
                              f"{target.path!r}", {"path": target.path, "size": target.size})
    with _writer(target) as writer:
        writer.expect_offset(start)
        await anyio.to_thread.run_sync(writer.hash_prefix)
        await _append(writer, chunks, end)
        if writer.received == target.size:
            await anyio.to_thread.run_sync(writer.finish)
    return _file_progress(target)


def _range(content_range: str | None, size: int) -> tuple[int, int]:
    """Offsets [start, end) a body fills: `bytes a-b/total` (total: the declared size), or the whole file."""
    if content_range is None:
        return 0, size
    match = CONTENT_RANGE.match(content_range.strip())
    if match is None:
        raise InvalidRequest(f"Content-Range must read `bytes <first>-<last>/{size}`",
                             {"content_range": content_range[:100]})
    first, last, total = (int(group) for group in match.groups())
    if total != size or first > last or last >= size:
        raise InvalidRequest(f"Content-Range {content_range[:100]!r} does not fit the declared size of {size:,} bytes",
                             {"content_range": content_range[:100], "size": size})
    return first, last + 1


async def _append(writer: "_Writer", chunks: AsyncIterator[bytes], end: int) -> None:
    """Write the body in pieces of CHUNK bytes. Each piece is written and hashed in a worker thread while the next
    one arrives (hashlib and file writes let go of the GIL), so receiving, hashing and writing overlap; at most one
    piece is in flight, so memory stays at two pieces."""
    buffer = bytearray()
    taken = writer.received  # bytes handed to the writer, written or in flight
    in_flight: asyncio.Future[None] | None = None
    try:
        async for chunk in chunks:
            if taken + len(buffer) + len(chunk) > end:
                if in_flight is not None:
                    await in_flight
                    in_flight = None
                writer.discard_request()
                target = writer.target
                raise PayloadTooLarge(f"the body runs past byte {end:,} of {target.path!r} (its declared size or "
                                      "Content-Range)", {"path": target.path, "size": target.size})
            buffer += chunk
            if len(buffer) >= CHUNK:
                if in_flight is not None:
                    await in_flight
                in_flight = asyncio.get_running_loop().run_in_executor(None, writer.write, bytes(buffer))
                taken += len(buffer)
                buffer.clear()
    finally:
        with anyio.CancelScope(shield=True):
            if in_flight is not None:
                await in_flight
            if buffer and not writer.discarded:  # a dropped connection keeps what arrived: the client resumes
                await anyio.to_thread.run_sync(writer.write, bytes(buffer))


class _Writer:
    """Appends to one part file under an exclusive lock, hashing as it goes."""

    def __init__(self, target: FileTarget, handle: BinaryIO) -> None:
        self.target, self.handle = target, handle
        self.received = self.start = handle.seek(0, 2)
        with _DIGESTS_LOCK:
            offset, digest = _DIGESTS.pop(str(target.part), (-1, None))
        self.hashed = offset == self.received
        self.digest = digest if self.hashed else hashlib.sha256()
        self.discarded = False

    def expect_offset(self, start: int) -> None:
        if start != self.received:
            raise Conflict(f"{self.target.path!r} has {self.received:,} bytes; resume at that offset "
                           f"(Content-Range: bytes {self.received}-...), not at {start:,}",
                           {"path": self.target.path, "received": self.received, "size": self.target.size})

    def hash_prefix(self) -> None:
        if self.hashed:
            return
        with self.target.part.open("rb") as prefix:
            for _ in range(0, self.received, CHUNK):
                self.digest.update(prefix.read(CHUNK))

    def write(self, data: bytes) -> None:
        with _disk_errors():
            self.handle.write(data)
            self.handle.flush()
        self.digest.update(data)
        self.received += len(data)

    def discard_request(self) -> None:
        """Drop what this request wrote: a body longer than announced is refused as a whole."""
        self.handle.truncate(self.start)
        self.discarded = True

    def keep_digest(self) -> None:
        """Leave the hash of what the file now holds for the next PUT of it (not after a discarded request, whose
        bytes were truncated, nor once the file is complete)."""
        if self.discarded or self.received in (0, self.target.size):
            return
        with _DIGESTS_LOCK:
            _DIGESTS[str(self.target.part)] = (self.received, self.digest)
            while len(_DIGESTS) > _DIGESTS_KEPT:
                _DIGESTS.popitem(last=False)

    def finish(self) -> None:
        if self.digest.hexdigest() != self.target.sha256:
            self.handle.truncate(0)
            raise ChecksumMismatch(f"{self.target.path!r} does not match the sha256 of the manifest; it was reset to "
                                   "0 bytes: upload it again", {"path": self.target.path,
                                                                "sha256": self.digest.hexdigest()})
        with _disk_errors():
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.target.part.replace(self.target.done)


@contextmanager
def _writer(target: FileTarget) -> Iterator[_Writer]:
    try:
        handle = target.part.open("ab")
    except FileNotFoundError as exc:  # deleted (or expired and swept) since the lookup
        raise NotFound(f"the upload of {target.path!r} was deleted") from exc
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise Conflict(f"another request is uploading {target.path!r} right now", {"path": target.path}) from exc
        if target.done.exists():
            raise Conflict(f"{target.path!r} is already complete", {"path": target.path, "received": target.size})
        writer = _Writer(target, handle)
        try:
            yield writer
        finally:  # also after a dropped connection: what arrived was written and hashed
            writer.keep_digest()


@contextmanager
def _disk_errors() -> Iterator[None]:
    try:
        yield
    except FileNotFoundError as exc:
        raise NotFound("the upload was deleted while this file was being written") from exc
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        raise StorageFailed("the service is out of storage space for uploads; try again later") from exc


def complete_upload(uploads: Uploads, upload_id: str, model_id: str, settings: Settings,
                    store: ArtifactStore) -> tuple[Upload, StoredUpload]:
    """Validate the complete folder as an archive's is and store it under the model's key (the caller adds the
    model's row, deletes the upload and commits, then calls `remove_staging`). A model the validation refuses
    discards the upload; any other failure leaves it open, to complete again."""
    upload = uploads.get(upload_id)
    incomplete = [vars(f) for f in progress(upload, settings) if not f.complete]
    if incomplete:
        raise Conflict(f"{len(incomplete)} file(s) of upload {upload_id} are not complete", {"incomplete": incomplete})
    if not uploads.set_status(upload, UploadStatus.open, UploadStatus.completing):
        raise Conflict(f"upload {upload_id} is being completed by another request")
    uploads.session.commit()  # the claim is seen by concurrent PUTs, completes and deletes
    try:
        info, key = store_model_folder(staging_dir(settings, upload_id) / "files", model_id, settings, store)
    except (UnsupportedModel, UnsafeInput):
        discard(uploads, upload, settings)
        raise
    except BaseException:
        uploads.set_status(upload, UploadStatus.completing, UploadStatus.open)
        uploads.session.commit()
        raise
    total = sum(entry["size"] for entry in upload.manifest)
    return upload, StoredUpload(info=info, sha256=manifest_sha256(upload.manifest), size_bytes=total,
                                storage_key=key)


def manifest_sha256(manifest: list[dict[str, Any]]) -> str:
    """A chunked model's `sha256`: of its manifest (names, sizes and sha256 of every file), sorted by name."""
    canonical = json.dumps(sorted(manifest, key=lambda entry: entry["path"]), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def delete_upload(uploads: Uploads, upload_id: str, settings: Settings) -> None:
    """Abort an upload: its row and its staging go (the caller's session is committed here)."""
    upload = uploads.get(upload_id)
    if upload.status != UploadStatus.open:
        raise Conflict(f"upload {upload_id} is being completed; it cannot be deleted now")
    discard(uploads, upload, settings)


def discard(uploads: Uploads, upload: Upload, settings: Settings) -> None:
    """Delete the row (committed), then the staging: a crash in between leaves only files the sweep removes."""
    upload_id = upload.id
    uploads.delete(upload)
    uploads.session.commit()
    remove_staging(settings, upload_id)


def remove_staging(settings: Settings, upload_id: str) -> None:
    shutil.rmtree(staging_dir(settings, upload_id), ignore_errors=True)
