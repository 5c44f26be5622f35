"""Resumable, chunked uploads of a model folder, file by file (the archive upload stays for small models).

A client declares a manifest (file names, sizes, sha256), PUTs each file (resuming with `Content-Range` after a dropped
connection), then completes: the folder is validated exactly as an extracted archive is (`store_model_folder`) and
stored as a model. Progress is the size of the staging files, so a chunk costs no database write.

Staging of an upload on the local store, under MCS_ARTIFACT_DIR/tmp (same filesystem as the artifacts):
    chunked-<upload id>/parts/<name>   bytes received so far (appended to, one writer at a time)
    chunked-<upload id>/files/<name>   a file whose sha256 matched the manifest (renamed from parts/)
A failed validation at completion discards the upload: its manifest is fixed and its files match it, so the same files
would fail again; the client starts a new upload with the fixed files.

With the S3 store (MCS_ARTIFACT_URL=s3://...) the staging is in the bucket instead (core/service/s3_staging.py): any
API host of a fleet takes any PUT of any upload, and completes it.
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
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO

import anyio

from core.compression.modelio import ModelInfo, inspect_model_folder, plain_file_name
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
from core.service.s3_staging import (
    FileLock,
    FileState,
    PartSender,
    S3Staging,
    file_lock,
    keep_digest,
    part_size,
    take_digest,
)
from core.service.scratch import CHUNKED_PREFIX
from core.service.settings import Settings
from core.service.storage import ArtifactStore, get_store
from core.service.storage.s3 import S3ArtifactStore
from core.service.uploads import CHUNK, DISK_FULL, StoredUpload, model_storage_key, scratch_dir, store_model_folder

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
    s3: S3Staging | None = field(default=None, compare=False)  # the upload's staging in the bucket, if S3

    @property
    def part(self) -> Path:
        return self.staging / "parts" / self.path

    @property
    def done(self) -> Path:
        return self.staging / "files" / self.path


def staging_dir(settings: Settings, upload_id: str) -> Path:
    return settings.work_dir / f"{CHUNKED_PREFIX}{upload_id}"


def s3_staging(settings: Settings, upload_id: str) -> S3Staging | None:
    """The upload's staging in the bucket when the store is S3; None: a staging folder on this host."""
    store = get_store()
    return S3Staging(store, upload_id, settings) if isinstance(store, S3ArtifactStore) else None


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
    if s3_staging(settings, row.id) is None:  # objects need no folder
        for sub in ("parts", "files"):
            (staging_dir(settings, row.id) / sub).mkdir(parents=True)
    return row


def remove_expired(uploads: Uploads, settings: Settings) -> None:
    expired = uploads.expired_ids()
    if expired:
        uploads.delete_ids(expired)
        for upload_id in expired:
            remove_staging(settings, upload_id)


def progress(upload: Upload, settings: Settings) -> list[FileProgress]:
    """Bytes received of each file, read from the staging files (objects)."""
    staging = s3_staging(settings, upload.id)
    if staging is None:
        return [_file_progress(_target(upload, entry, settings)) for entry in upload.manifest]
    states = staging.states([entry["path"] for entry in upload.manifest])
    return [_s3_progress(entry, states[entry["path"]]) for entry in upload.manifest]


def _s3_progress(entry: dict[str, Any], state: FileState) -> FileProgress:
    return FileProgress(entry["path"], entry["size"], entry["sha256"], state.received(entry["size"]), state.verified)


def _target(upload: Upload, entry: dict[str, Any], settings: Settings) -> FileTarget:
    return FileTarget(entry["path"], entry["size"], entry["sha256"], staging_dir(settings, upload.id),
                      s3_staging(settings, upload.id))


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
    if target.s3 is not None:
        return await _receive_s3(target, target.s3, start, end, chunks)
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


async def _append(writer: "_Writer | _S3Writer", chunks: AsyncIterator[bytes], end: int) -> None:
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


async def _receive_s3(target: FileTarget, staging: S3Staging, start: int, end: int,
                      chunks: AsyncIterator[bytes]) -> FileProgress:
    """`receive_file` into the bucket: the same offsets, errors and overlap of receiving and writing; what arrived
    before a dropped connection is kept (as parts and a tail), for any host to resume."""
    lock = FileLock(staging.settings, staging.file_key(target.path))
    if not await anyio.to_thread.run_sync(lock.acquire):
        raise Conflict(f"another request is uploading {target.path!r} right now", {"path": target.path})
    writer: _S3Writer | None = None
    try:
        writer = await anyio.to_thread.run_sync(_S3Writer.open, target, staging, lock)
        writer.expect_offset(start)
        await _append(writer, chunks, end)
        if writer.received == target.size:
            await anyio.to_thread.run_sync(writer.finish)
        return FileProgress(target.path, target.size, target.sha256, writer.received, writer.state.verified)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_close_s3, writer, lock)


def _close_s3(writer: "_S3Writer | None", lock: FileLock) -> None:
    try:
        if writer is not None:
            writer.close()
    finally:
        lock.release()


class _S3Writer:
    """Appends to one file staged in the bucket: full parts as they fill (uploaded in the background while the next
    fills), the rest as the file's tail at the end of the request, hashing (and checking a safetensors file) as it
    goes when this process saw what came before."""

    def __init__(self, target: FileTarget, staging: S3Staging, lock: FileLock, state: FileState) -> None:
        self.target, self.staging, self.lock, self.state = target, staging, lock, state
        self.part = state.part_size or part_size(staging.settings, target.size)
        self.received = self.start = state.received(target.size)
        self.seen = take_digest(staging.file_key(target.path), state, self.received, target.path, target.size)
        self.sender = PartSender(staging, target.path, state, self.part)
        self.buffer, self.filled = self.sender.buffer(), 0  # the part filling: its first `filled` bytes
        self._fill(memoryview(staging.tail_bytes(state)))
        self.discarded = self.changed = False

    @classmethod
    def open(cls, target: FileTarget, staging: S3Staging, lock: FileLock) -> "_S3Writer":
        """The writer of the file as the bucket holds it. Refused when complete; an assembled file that was never
        verified (a host died in between) is verified now; one whose every byte arrived is assembled now."""
        state = staging.states([target.path])[target.path]
        writer = cls(target, staging, lock, state)
        if not state.verified and writer.received == target.size:
            try:
                writer.finish()
            except ChecksumMismatch:  # reset to 0 bytes: this PUT starts it again
                return cls(target, staging, lock, FileState())
        if state.verified:
            raise Conflict(f"{target.path!r} is already complete", {"path": target.path, "received": target.size})
        return writer

    def expect_offset(self, start: int) -> None:
        if start != self.received:
            raise Conflict(f"{self.target.path!r} has {self.received:,} bytes; resume at that offset "
                           f"(Content-Range: bytes {self.received}-...), not at {start:,}",
                           {"path": self.target.path, "received": self.received, "size": self.target.size})

    def write(self, data: bytes) -> None:
        self.received += len(data)
        self.changed = True
        if self.seen is not None:
            self.seen.update(data)
        self._fill(memoryview(data))
        self.lock.renew()

    def _fill(self, view: memoryview) -> None:
        """Copy `view` into the part filling; a full one goes to the sender as it is."""
        while view:
            count = min(self.part - self.filled, len(view))
            self.buffer[self.filled:self.filled + count] = view[:count]
            self.filled += count
            view = view[count:]
            if self.filled == self.part:
                self.sender.send(self.buffer)  # waits for room, which frees a buffer: take one after
                self.buffer, self.filled = self.sender.buffer(), 0

    def rest(self) -> bytes:
        """The bytes after the last full part."""
        return bytes(memoryview(self.buffer)[:self.filled])

    def discard_request(self) -> None:
        """A body longer than announced: what it brought in full parts stays (the bytes of their offsets); its
        tail is not written, nor its hash kept, so the sha256 is read back from the bucket at the end."""
        self.discarded = True

    def finish(self) -> None:
        if not self.state.assembled:
            self.sender.wait()
            self.staging.assemble(self.target.path, self.state, self.rest())
            self.filled = 0
        seen = self.seen if not self.discarded else None
        self.seen = None
        self.staging.verify(self.target.path, self.target.sha256, seen)
        self.state.verified = True

    def close(self) -> None:
        """At the end of the request, whatever ended it: once the parts in flight are stored, the bytes after the
        last full part become the file's tail, and this process keeps the hash for the file's next PUT. After a
        part failed, the bytes past the parts stored are dropped (the client resumes at the new offset) and the
        hash is read back at the end."""
        try:
            self.sender.wait_quietly()
            if self.discarded or self.state.assembled or not self.changed or self.sender.failed:
                return
            self.staging.save_tail(self.target.path, self.state, self.rest())
            if self.seen is not None:
                keep_digest(self.staging.file_key(self.target.path), self.state, self.received, self.seen)
        finally:
            self.sender.close(self.buffer)


def complete_upload(uploads: Uploads, upload_id: str, model_id: str, settings: Settings,
                    store: ArtifactStore) -> tuple[Upload, StoredUpload]:
    """Validate the complete folder as an archive's is and store it under the model's key (the caller adds the
    model's row, deletes the upload and commits, then calls `remove_staging`). A model the validation refuses
    discards the upload; any other failure leaves it open, to complete again."""
    upload = uploads.get(upload_id)
    staging = s3_staging(settings, upload_id)
    if staging is not None:
        _verify_assembled(upload, staging)
    incomplete = [vars(f) for f in progress(upload, settings) if not f.complete]
    if incomplete:
        raise Conflict(f"{len(incomplete)} file(s) of upload {upload_id} are not complete", {"incomplete": incomplete})
    if not uploads.set_status(upload, UploadStatus.open, UploadStatus.completing):
        raise Conflict(f"upload {upload_id} is being completed by another request")
    uploads.session.commit()  # the claim is seen by concurrent PUTs, completes and deletes
    try:
        if staging is None:
            info, key = store_model_folder(staging_dir(settings, upload_id) / "files", model_id, settings, store)
        else:
            info, key = _store_staged(upload, staging, model_id, settings)
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


def _verify_assembled(upload: Upload, staging: S3Staging) -> None:
    """Verify the files assembled in the bucket whose verification a host did not live to write (or raises
    ChecksumMismatch for the first that does not match, which it resets)."""
    names = [entry["path"] for entry in upload.manifest]
    for name, state in staging.states(names).items():
        if state.assembled and not state.verified:
            with file_lock(staging.settings, staging.file_key(name), name):
                staging.verify(name, next(e["sha256"] for e in upload.manifest if e["path"] == name))


def _store_staged(upload: Upload, staging: S3Staging, model_id: str, settings: Settings) -> tuple[ModelInfo, str]:
    """Validate the staged files as an archive's are, on stand-ins in this host's scratch (the safetensors files
    whose values were checked as they arrived are their headers in sparse files of their size, the rest are
    downloaded), then store them as the model's folder by copies inside the bucket. Every byte used to be
    downloaded here to be validated (with the copies, completing 2 GB took 51 s against moto's server)."""
    sizes = {entry["path"]: entry["size"] for entry in upload.manifest}
    checked = {name for name, state in staging.states(list(sizes)).items() if state.checked}
    with scratch_dir(settings, "upload") as scratch:
        staging.stand_in(sizes, checked, scratch)
        info = inspect_model_folder(scratch, settings.max_model_parameters)
    key = model_storage_key(model_id)
    staging.publish(key, list(sizes))
    return info, key


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
    staging = s3_staging(settings, upload_id)
    if staging is None:
        shutil.rmtree(staging_dir(settings, upload_id), ignore_errors=True)
    else:
        staging.remove()
