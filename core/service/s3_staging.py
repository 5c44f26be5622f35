"""Staging of chunked uploads in the object store, so that any API host of a fleet can take any PUT of an upload and
complete it: nothing of an upload in flight lives on one host's disk (core/service/chunked_uploads.py dispatches
here when MCS_ARTIFACT_URL is s3://...; the local store keeps its staging folder).

Objects of upload `u`, file `n`, under the store's prefix:
    uploads/u/files/n           the file: an S3 multipart upload in progress, then (completed) the assembled object
    uploads/u/tails/n/<k>       bytes received after the k full parts (fewer than a part: S3 takes no small part
                                but the last), rewritten at the end of each PUT; a tail whose k is not the current
                                part count is stale (its bytes went into part k+1) and ignored
    uploads/u/checked/n         a safetensors file's header (its first 8 + header-length bytes), written before
                                verified/n when every byte of the file passed the header, layout and finite-value
                                checks of `check_safetensors` as it streamed by: completion validates the folder
                                without reading the file's values again (core/service/chunked_uploads.py)
    uploads/u/verified/n        written once the assembled file's sha256 matched the manifest: the file is complete
Progress is read from the store (one listing, plus ListParts per file in flight), so a PUT costs no database write
and any host sees what every other host received. A part has a fixed size per file (that of its part 1), so the
bytes received are parts x part size + tail.

One writer per file at a time across hosts: a Redis lock (the broker's Redis; an expiring key, renewed with each
part), a process lock without Redis (one API process). The sha256 continues where this process left it when the next
PUT of a file comes back to it (the same multipart upload, offset and tail); otherwise the assembled file is read back
from the store once to hash it (and check its values). Full parts go up in the background, PARTS_IN_FLIGHT_BYTES of
them at most, while the next one fills: a PUT's memory is bounded, and the store's latency overlaps the body's
arrival.
"""

import hashlib
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.compression.safetensors_check import StreamCheck
from core.errors import ChecksumMismatch, Conflict, Unavailable
from core.service.db.models import Upload
from core.service.events import redis_url
from core.service.settings import Settings
from core.service.storage.s3 import S3ArtifactStore, _s3_errors

log = logging.getLogger(__name__)
MiB = 1024**2
MIN_PART = 5 * MiB  # S3's smallest part (but the last)
MAX_PART = 8 * MiB  # the part size of a file up to 80 GB (10,000 parts); a bigger file gets bigger parts
# Parts uploading at once per PUT, in bytes: 3 parts of 8 MiB, plus the one filling, keep a PUT's buffers at 32 MiB
# (the API's RSS may grow by 64 MB during uploads). One part at a time left the store idle while the next part filled
# (83 MB/s into moto's server, 131 MB/s for boto3's transfer manager on the same host); real S3 answers each part at
# tens of MB/s, so several must be in flight.
PARTS_IN_FLIGHT_BYTES = 24 * MiB
# Part buffers no PUT is using, kept for the next ones (at most SPARE_BYTES). Never freeing them keeps glibc's malloc
# from raising its mmap threshold to their size, after which the 1 MiB pieces of every body came from per-thread heaps
# that kept what was freed. The API's RSS grew by 125 MB during the PUTs of a 438 MB model (93 MB in the bench's 2 GB
# run) with a new 16 MiB part per 16 MiB; by 73 MB with parts in flight, 48 MB with this pool and 3 parts in flight.
SPARE_BYTES = PARTS_IN_FLIGHT_BYTES + MAX_PART
_SPARE: list[bytearray] = []
MAX_PARTS = 10_000  # S3's most parts of one upload: a bigger file gets bigger parts
LOCK_TTL_MS = 120_000  # a host that died mid-PUT blocks its file this long at most; a live writer renews it
RENEW_EVERY_S = 10.0
UNLOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
# (multipart upload id, parts, tail etag, received) -> the sha256 (and safetensors check) of those bytes, as this
# process saw them
_DIGESTS: "OrderedDict[str, tuple[tuple[str, int, str, int], Seen]]" = OrderedDict()
_DIGESTS_KEPT = 256
_LOCK = threading.Lock()
_LOCAL_WRITERS: set[str] = set()


@dataclass
class FileState:
    """What the store holds of one file of an upload."""

    multipart_id: str = ""
    parts: list[dict[str, Any]] = field(default_factory=list)  # contiguous from part 1: PartNumber, ETag, Size
    part_size: int = 0
    tail_key: str = ""
    tail_size: int = 0
    tail_etag: str = ""
    stale_tails: list[str] = field(default_factory=list)
    assembled: bool = False
    checked: bool = False
    verified: bool = False

    def received(self, size: int) -> int:
        if self.assembled or self.verified:
            return size
        return sum(int(part["Size"]) for part in self.parts) + self.tail_size


def part_size(settings: Settings, file_size: int) -> int:
    """The part size of a new file: MCS_S3_MULTIPART_CHUNK_BYTES within [5, 8] MiB, more where 10,000 parts of it
    would not hold the file."""
    wanted = min(max(settings.s3_multipart_chunk_bytes, MIN_PART), MAX_PART)
    return max(wanted, math.ceil(file_size / MAX_PARTS / MiB) * MiB)


class S3Staging:
    """The staging objects of one upload."""

    def __init__(self, store: S3ArtifactStore, upload_id: str, settings: Settings) -> None:
        self.store, self.client, self.bucket, self.settings = store, store.client, store.bucket, settings
        self.base = store.object_key(f"uploads/{upload_id}")

    def file_key(self, name: str) -> str:
        return f"{self.base}/files/{name}"

    def checked_key(self, name: str) -> str:
        return f"{self.base}/checked/{name}"

    # -- progress ------------------------------------------------------------------------------------------------

    def states(self, names: list[str]) -> dict[str, FileState]:
        """The state of each named file: one listing of the upload's objects and of its multipart uploads, and
        ListParts for each file in flight."""
        states = {name: FileState() for name in names}
        with _s3_errors(self.base):
            objects = self._objects(f"{self.base}/")
            multipart = self._multipart_ids()
            for name, state in states.items():
                state.verified = f"{self.base}/verified/{name}" in objects
                state.checked = self.checked_key(name) in objects
                state.assembled = self.file_key(name) in objects
                state.multipart_id = multipart.get(name, "")
                if state.multipart_id and not state.assembled:
                    state.parts, state.part_size = self._parts(name, state.multipart_id)
                self._read_tails(state, name, objects)
        return states

    def _objects(self, prefix: str) -> dict[str, dict[str, Any]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return {item["Key"]: item for page in pages for item in page.get("Contents", [])}

    def _multipart_ids(self) -> dict[str, str]:
        prefix, ids = f"{self.base}/files/", dict[str, str]()
        pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix)
        for page in pages:
            for item in sorted(page.get("Uploads", []), key=lambda item: item["Initiated"]):
                ids.setdefault(item["Key"].removeprefix(prefix), item["UploadId"])  # the first one started
        return ids

    def _parts(self, name: str, multipart_id: str) -> tuple[list[dict[str, Any]], int]:
        pages = self.client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=self.file_key(name),
                                                                  UploadId=multipart_id)
        listed = {part["PartNumber"]: part for page in pages for part in page.get("Parts", [])}
        parts: list[dict[str, Any]] = []
        while len(parts) + 1 in listed:  # a part uploaded after a gap (a crash mid-request) is written again
            parts.append(listed[len(parts) + 1])
        return parts, (parts[0]["Size"] if parts else 0)

    def _read_tails(self, state: FileState, name: str, objects: dict[str, dict[str, Any]]) -> None:
        prefix = f"{self.base}/tails/{name}/"
        current = f"{prefix}{len(state.parts):06d}"
        for key, item in objects.items():
            if not key.startswith(prefix):
                continue
            if key == current and not state.assembled:
                state.tail_key, state.tail_size, state.tail_etag = key, int(item["Size"]), str(item["ETag"])
            else:
                state.stale_tails.append(key)

    # -- writing -------------------------------------------------------------------------------------------------

    def tail_bytes(self, state: FileState) -> bytes:
        if not state.tail_key:
            return b""
        with _s3_errors(state.tail_key):
            body = self.client.get_object(Bucket=self.bucket, Key=state.tail_key)["Body"]
            with body:
                data: bytes = body.read()
        return data

    def upload_part(self, name: str, state: FileState, data: bytes) -> None:
        self.start_multipart(name, state)
        state.parts.append(self.send_part(name, state.multipart_id, len(state.parts) + 1, data))

    def start_multipart(self, name: str, state: FileState) -> None:
        if not state.multipart_id:
            with _s3_errors(name):
                state.multipart_id = self.client.create_multipart_upload(Bucket=self.bucket,
                                                                         Key=self.file_key(name))["UploadId"]

    def send_part(self, name: str, multipart_id: str, number: int, data: bytes | bytearray) -> dict[str, Any]:
        with _s3_errors(name):
            etag = self.client.upload_part(Bucket=self.bucket, Key=self.file_key(name), PartNumber=number,
                                           UploadId=multipart_id, Body=data)["ETag"]
        return {"PartNumber": number, "ETag": etag, "Size": len(data)}

    def save_tail(self, name: str, state: FileState, data: bytes) -> None:
        """Write the bytes after the last full part (or none), then drop the tails it replaces."""
        old = [key for key in (state.tail_key, *state.stale_tails) if key]
        state.stale_tails, state.tail_key, state.tail_size, state.tail_etag = [], "", 0, ""
        with _s3_errors(name):
            if data:
                key = f"{self.base}/tails/{name}/{len(state.parts):06d}"
                etag = self.client.put_object(Bucket=self.bucket, Key=key, Body=data)["ETag"]
                state.tail_key, state.tail_size, state.tail_etag = key, len(data), str(etag)
            self._delete([key for key in old if key != state.tail_key])

    def assemble(self, name: str, state: FileState, rest: bytes) -> None:
        """The last bytes arrived: one PUT for a file that never needed a part, else the last part and the
        completion of the multipart upload."""
        key = self.file_key(name)
        with _s3_errors(name):
            if not state.multipart_id:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=rest)
            else:
                if rest or not state.parts:
                    self.upload_part(name, state, rest)
                parts = [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in state.parts]
                self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=state.multipart_id,
                                                      MultipartUpload={"Parts": parts})
        state.assembled = True
        self.save_tail(name, state, b"")

    def read_back(self, name: str) -> "Seen":
        """The sha256 (and safetensors check) of the assembled file, read back from the store in pieces (no local
        copy)."""
        with _s3_errors(name):
            answer = self.client.get_object(Bucket=self.bucket, Key=self.file_key(name))
            seen, body = Seen.start(name, int(answer["ContentLength"])), answer["Body"]
            with body:  # (the body's `__enter__` answers its raw stream)
                for chunk in body.iter_chunks(MiB):
                    seen.update(chunk)
        return seen

    def verify(self, name: str, expected: str, seen: "Seen | None" = None) -> None:
        """Mark the assembled file complete when its sha256 (of the bytes seen, else read back) is the manifest's;
        reset the file to 0 bytes and raise ChecksumMismatch otherwise. A safetensors file that passed its checks
        gets its header stored beside it first."""
        seen = seen or self.read_back(name)
        actual = seen.digest.hexdigest()
        if actual != expected:
            self.reset(name)
            raise ChecksumMismatch(f"{name!r} does not match the sha256 of the manifest; it was reset to 0 bytes: "
                                   "upload it again", {"path": name, "sha256": actual})
        with _s3_errors(name):
            if seen.check is not None and seen.check.header is not None:
                self.client.put_object(Bucket=self.bucket, Key=self.checked_key(name), Body=seen.check.header)
            self.client.put_object(Bucket=self.bucket, Key=f"{self.base}/verified/{name}", Body=actual.encode())

    def reset(self, name: str) -> None:
        with _s3_errors(name):
            self._abort(f"{self.base}/files/{name}")
            self._delete([self.file_key(name), self.checked_key(name), *self._objects(f"{self.base}/tails/{name}/")])

    def remove(self) -> None:
        """Every object and multipart upload of the upload."""
        with _s3_errors(self.base):
            self._abort(f"{self.base}/")
            self._delete(list(self._objects(f"{self.base}/")))

    def _abort(self, prefix: str) -> None:
        pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix)
        for item in [item for page in pages for item in page.get("Uploads", [])]:
            if prefix.endswith("/") or item["Key"] == prefix:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=item["Key"], UploadId=item["UploadId"])

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # at most 1,000 keys per request
            objects = [{"Key": key} for key in keys[start:start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})

    # -- completion ----------------------------------------------------------------------------------------------

    def stand_in(self, sizes: dict[str, int], checked: set[str], into: Path) -> None:
        """The complete files (name -> size) as a local folder of the completing host's scratch, for the same
        validation as an archive's: a checked safetensors file becomes a sparse file of its size holding its
        header (its values passed the finite check as they streamed by: zeros stand for them, on no disk and at no
        transfer); any other file is downloaded."""
        with _s3_errors(self.base):
            for name, size in sizes.items():
                if name in checked:
                    body = self.client.get_object(Bucket=self.bucket, Key=self.checked_key(name))["Body"]
                    with body, (into / name).open("xb") as out:
                        out.write(body.read())
                        out.truncate(size)
                else:
                    self.client.download_file(self.bucket, self.file_key(name), str(into / name),
                                              Config=self.store.transfer)

    def publish(self, key: str, names: list[str]) -> None:
        """Store the files as the folder `key`, copied inside the store (no byte passes through this host)."""
        self.store.copy_tree(key, {name: self.file_key(name) for name in names})



class PartSender:
    """The full parts of one file, uploaded in the background, PARTS_IN_FLIGHT_BYTES at most at once (`send` waits
    for room). `state.parts` gets a part only once every part before it is stored, so it stays contiguous from part
    1 whatever fails; after a failure, `failed` is set and the parts this request sent later are left to be written
    again (a part after a gap is not counted: see `S3Staging._parts`). The part buffers are reused: a PUT allocates
    a few of them, not one per part (allocating and freeing 16 MiB pieces grew the API's RSS by 93 MB)."""

    def __init__(self, staging: S3Staging, name: str, state: FileState, part: int) -> None:
        self.staging, self.name, self.state, self.part = staging, name, state, part
        self.in_flight = max(1, PARTS_IN_FLIGHT_BYTES // part)
        self.pool: ThreadPoolExecutor | None = None
        self.pending: deque[tuple[Future[dict[str, Any]], bytearray]] = deque()
        self.free: list[bytearray] = []
        self.failed = False

    def buffer(self) -> bytearray:
        """An empty part buffer (of the part size) to fill."""
        if self.free:
            return self.free.pop()
        with _LOCK:
            spare = next((i for i, kept in enumerate(_SPARE) if len(kept) == self.part), None)
            if spare is not None:
                return _SPARE.pop(spare)
        return bytearray(self.part)

    def give_back(self, buffers: list[bytearray]) -> None:
        """Keep these buffers (and the sender's unused ones) for the next PUTs, up to SPARE_BYTES."""
        with _LOCK:
            for kept in [*buffers, *self.free]:
                if sum(map(len, _SPARE)) + len(kept) <= SPARE_BYTES:
                    _SPARE.append(kept)
        self.free.clear()

    def send(self, data: bytearray) -> None:
        """Upload `data`, a full buffer from `buffer()`, as the file's next part."""
        if self.failed:
            raise Unavailable(f"an earlier part of {self.name!r} failed to upload")
        while len(self.pending) >= self.in_flight:
            self._settle_first()
        self.staging.start_multipart(self.name, self.state)
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.in_flight, thread_name_prefix="s3-part")
        number = len(self.state.parts) + len(self.pending) + 1
        future = self.pool.submit(self.staging.send_part, self.name, self.state.multipart_id, number, data)
        self.pending.append((future, data))

    def wait(self) -> None:
        """Every part sent is stored (or the first failure is raised)."""
        while self.pending:
            self._settle_first()

    def wait_quietly(self) -> None:
        """Wait for the uploads still running; a failure is known already (`failed`) or raised by `wait` elsewhere."""
        try:
            self.wait()
        except Exception:
            log.debug("a part of %s failed", self.name, exc_info=True)

    def close(self, filling: bytearray) -> None:
        """Stop the threads (once the uploads running end) and keep the buffers (`filling`: the writer's, never
        sent) for the next PUTs."""
        self.wait_quietly()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.give_back([filling])

    def _settle_first(self) -> None:
        first, data = self.pending.popleft()
        try:
            self.state.parts.append(first.result())
        except BaseException:
            self.failed = True
            for later, _ in self.pending:  # finish, but do not count, the parts after the gap
                later.exception()
            self.pending.clear()
            raise
        self.free.append(data)


def remove_orphaned_staging(session: Session, store: S3ArtifactStore, settings: Settings) -> int:
    """Remove the staging of uploads that have no row any more (a host died between deleting an upload's row and
    its objects); the workers' sweeper calls this. A row is committed before its upload's first object is written,
    so no live upload is taken for an orphan. Returns how many uploads' staging went."""
    prefix = f"{store.object_key('uploads')}/"
    with _s3_errors("uploads"):
        found = set()
        for operation in ("list_objects_v2", "list_multipart_uploads"):  # a file in flight may have parts only
            pages = store.client.get_paginator(operation).paginate(Bucket=store.bucket, Prefix=prefix, Delimiter="/")
            found |= {item["Prefix"][len(prefix):].rstrip("/") for page in pages
                      for item in page.get("CommonPrefixes", [])}
    if not found:
        return 0
    live = set(session.scalars(select(Upload.id).where(Upload.id.in_(found))))
    for upload_id in sorted(found - live):
        S3Staging(store, upload_id, settings).remove()
    return len(found - live)


# -- one writer per file ---------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


class FileLock:
    """Held by the request writing one file, on every API host (Redis) or in this process (no Redis)."""

    def __init__(self, settings: Settings, key: str) -> None:
        self.url, self.key, self.token = redis_url(settings), f"mcs:upload-writer:{key}", uuid.uuid4().hex
        self.renewed = time.monotonic()

    def acquire(self) -> bool:
        if not self.url:
            with _LOCK:
                if self.key in _LOCAL_WRITERS:
                    return False
                _LOCAL_WRITERS.add(self.key)
                return True
        try:
            return bool(_redis(self.url).set(self.key, self.token, nx=True, px=LOCK_TTL_MS))
        except redis.RedisError as exc:  # without the lock two hosts could write one file: refuse, retryable
            raise Unavailable(f"Redis, which orders the writers of an upload, is unreachable ({exc})") from exc

    def renew(self) -> None:
        """Extend the lock (at most every RENEW_EVERY_S, however slowly the body comes: each MiB calls this)."""
        if self.url and time.monotonic() - self.renewed > RENEW_EVERY_S:
            self.renewed = time.monotonic()
            _redis(self.url).eval(RENEW, 1, self.key, self.token, LOCK_TTL_MS)

    def release(self) -> None:
        if not self.url:
            with _LOCK:
                _LOCAL_WRITERS.discard(self.key)
            return
        try:
            _redis(self.url).eval(UNLOCK, 1, self.key, self.token)
        except redis.RedisError:  # the key expires after LOCK_TTL_MS anyway
            log.warning("could not release the upload writer lock %s", self.key, exc_info=True)


@contextmanager
def file_lock(settings: Settings, key: str, path: str) -> Iterator[FileLock]:
    lock = FileLock(settings, key)
    if not lock.acquire():
        raise Conflict(f"another request is uploading {path!r} right now", {"path": path})
    try:
        yield lock
    finally:
        lock.release()


# -- the sha256 kept between PUTs --------------------------------------------------------------------------------


def _where(state: FileState, received: int) -> tuple[str, int, str, int]:
    return state.multipart_id, len(state.parts), state.tail_etag, received


@dataclass
class Seen:
    """What this process saw of a file's bytes, in order from byte 0: their sha256 and, for a safetensors file,
    its streamed check."""

    digest: Any
    check: StreamCheck | None

    @classmethod
    def start(cls, name: str, size: int) -> "Seen":
        return cls(hashlib.sha256(), StreamCheck(size) if name.endswith(".safetensors") else None)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self.digest.update(data)
        if self.check is not None:
            self.check.update(data)


def take_digest(key: str, state: FileState, received: int, name: str, size: int) -> Seen | None:
    """What this process kept of exactly these bytes (same multipart upload, parts, tail), or None."""
    with _LOCK:
        kept = _DIGESTS.pop(key, None)
    if received == 0:
        return Seen.start(name, size)
    if kept is None or kept[0] != _where(state, received):
        return None
    return kept[1]


def keep_digest(key: str, state: FileState, received: int, seen: Seen) -> None:
    with _LOCK:
        _DIGESTS[key] = (_where(state, received), seen)
        while len(_DIGESTS) > _DIGESTS_KEPT:
            _DIGESTS.popitem(last=False)
