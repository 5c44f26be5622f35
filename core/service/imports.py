"""Import a model that already sits in a bucket (`s3://bucket/prefix`) or in a local Hugging Face cache
(`hf://org/name[@revision]`) instead of uploading it.

`start_import` (the API, `POST /v1/models` with JSON) checks what needs no reading of the source (its syntax, the
bucket allow-list, the endpoint, that credentials are given), records the model as `importing` and hands it to a
worker. `run_import` (the worker, worker/imports.py) fetches the files into that worker's scratch with progress on
the model's row, validates them exactly as an upload's (`store_model_folder`), stores them and marks the model
`ready`, or `failed` with the error; a redelivered message finds the model no longer importing and does nothing.

- s3:// reads only the buckets the operator lists (MCS_IMPORT_S3_BUCKETS), with the request's credentials or the
  configured profile (MCS_IMPORT_S3_PROFILE), never the service's own; an endpoint other than AWS must resolve to
  public addresses (the webhook rule), unless MCS_IMPORT_ALLOW_PRIVATE. The request's keys travel to the worker in
  the task message only (never in the database or a log line: the message's kwargsrepr hides them).
- hf:// reads the hub cache layout at MCS_HF_MIRROR_DIR (else HF_HUB_CACHE) on the worker, with `local_files_only`:
  nothing is downloaded from a hub; a repository or revision not in the cache fails the import (not_found).
Only the top-level files a model folder needs are taken (weights, configs, tokenizer), within the chunked upload's
caps (MCS_MAX_UPLOAD_FILES, MCS_MAX_UPLOAD_FILE_BYTES, MCS_MAX_MODEL_UPLOAD_BYTES) and the tenant's stored-bytes quota,
both checked on the source's listing before anything is fetched.
"""

import fnmatch
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.orm import Session

from core.compression.modelio import plain_file_name
from core.errors import Forbidden, InvalidRequest, NotFound, PayloadTooLarge, ServiceError, StorageFailed, Unavailable
from core.service.chunked_uploads import manifest_sha256
from core.service.db.models import Model, ModelStatus, new_id
from core.service.db.repositories import Models
from core.service.db.session import session_scope
from core.service.quotas import check_storage
from core.service.settings import Settings
from core.service.storage import ArtifactStore
from core.service.uploads import StoredUpload, model_fields, scratch_dir, store_model_folder
from core.service.webhooks import UnsafeUrl, check_public_host

log = logging.getLogger(__name__)
MODEL_FILES = ("*.safetensors", "*.json", "tokenizer*", "*.model", "vocab*", "merges.txt", "*.tiktoken")
HF_SOURCE = r"hf://(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})(?:@(?P<rev>[A-Za-z0-9_.-]{1,100}))?"
S3_SOURCE = r"s3://[a-z0-9][a-z0-9.-]{1,62}(?:/[^?#]*)?"
# The request schema's pattern too (api/routers/imports.py): the same syntax in Python and in JSON Schema (ECMA)
SOURCE_PATTERN = f"^(?:{HF_SOURCE.replace('?P<repo>', '').replace('?P<rev>', '')}|{S3_SOURCE})$"


PROGRESS_EVERY_S = 1.0  # at most one progress write per second (a 16 GB import would otherwise write thousands)


@dataclass(frozen=True)
class S3Credentials:
    """Given with the request; none: the operator's MCS_IMPORT_S3_PROFILE."""

    endpoint_url: str = ""
    access_key_id: str = ""
    secret_access_key: str = ""
    session_token: str = ""
    region: str = ""


@dataclass(frozen=True)
class Imported:
    stored: StoredUpload
    resolved: str  # the source as imported: hf://org/name@<commit>, or the s3:// prefix


@dataclass
class Progress:
    """An import's stage and bytes, handed to `report` at most once a second and at every change of stage. Safe
    from several threads (boto3 downloads in its transfer threads). `planned` may refuse the total (a quota)."""

    report: Callable[[dict[str, Any]], None]
    planned_check: Callable[[int], None] = lambda total: None
    stage: str = "listing"
    bytes_done: int = 0
    bytes_total: int = 0
    _reported_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "bytes_done": self.bytes_done, "bytes_total": self.bytes_total}

    def enter(self, stage: str) -> None:
        with self._lock:
            self.stage = stage
            self._report()

    def planned(self, total: int) -> None:
        self.planned_check(total)
        with self._lock:
            self.stage, self.bytes_total = "downloading", total
            self._report()

    def advanced(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_done += nbytes
            if time.monotonic() - self._reported_at >= PROGRESS_EVERY_S:
                self._report()

    def _report(self) -> None:
        self._reported_at = time.monotonic()
        self.report(self.as_dict())


# -- the API's half --------------------------------------------------------------------------------------------------


def check_source(source: str, credentials: S3Credentials | None, settings: Settings) -> None:
    """Refuse, before anything is recorded, what can be refused without reading the source: a malformed source, a
    bucket not on the allow-list, a private endpoint, an s3:// source without credentials or a profile."""
    if source.startswith("hf://"):
        if re.fullmatch(HF_SOURCE, source) is None:
            raise InvalidRequest("an hf:// source reads hf://org/name or hf://org/name@revision", {"field": "source"})
    elif source.startswith("s3://"):
        _s3_source(source, settings)
        _client(credentials or S3Credentials(), settings)
    else:
        raise InvalidRequest("source must be s3://bucket/prefix or hf://org/name[@revision]", {"field": "source"})


def start_import(session: Session, tenant_id: str, source: str, name: str | None, credentials: S3Credentials | None,
                 settings: Settings, enqueue: Callable[[Model, S3Credentials | None], bool]) -> Model:
    """Record the model as `importing` and hand it to a worker; a broker that refuses withdraws it (503)."""
    check_source(source, credentials, settings)
    models = Models(session, tenant_id)
    row: Model = models.add(id=new_id("mdl"), name=name or source[:200], architecture="", model_type="",
                            num_parameters=0, size_bytes=0, sha256="", storage_key="", status=ModelStatus.importing,
                            source=source, progress={"stage": "queued", "bytes_done": 0, "bytes_total": 0})
    session.commit()
    if not enqueue(row, credentials):
        models.delete(row)
        session.commit()
        raise Unavailable("the import queue is unreachable, so the import was not started; retry shortly")
    return row


# -- the worker's half -----------------------------------------------------------------------------------------------


def run_import(model_id: str, tenant_id: str, credentials: S3Credentials | None, settings: Settings,
               store: ArtifactStore) -> None:
    """Fetch, check and store the importing model `model_id`; it ends `ready` or `failed` with the error (a fault
    that is not the user's is also re-raised, for the worker's log)."""
    with session_scope() as session:
        models = Models(session, tenant_id)
        row = models.get(model_id) if models.exists(model_id) else None
        if row is None or row.status != ModelStatus.importing:
            return  # deleted before it started, or a redelivered message of an import that ended
        source, default_name = row.source or "", row.name == (row.source or "")[:200]

    def report(progress: dict[str, Any]) -> None:
        with session_scope() as session:
            Models(session, tenant_id).get(model_id).progress = progress

    def within_quota(total: int) -> None:
        with session_scope() as session:
            check_storage(session, tenant_id, total, settings)

    progress = Progress(report, within_quota)
    try:
        imported = import_model(source, credentials, model_id, settings, store, progress)
        _record(model_id, tenant_id, imported, default_name, progress, settings, store)
    except ServiceError as exc:
        _fail(model_id, tenant_id, exc.as_dict(), progress)
    except BaseException as exc:
        _fail(model_id, tenant_id, {"code": "internal_error", "message": f"the import failed on the worker "
                                    f"({type(exc).__name__}); it has been logged", "details": None}, progress)
        raise


def _record(model_id: str, tenant_id: str, imported: Imported, default_name: bool, progress: Progress,
            settings: Settings, store: ArtifactStore) -> None:
    """The stored model's row, ready; its files are removed unless this commits (nothing is left half-written)."""
    try:
        with session_scope() as session:
            check_storage(session, tenant_id, imported.stored.size_bytes, settings)  # others may have stored since
            row = Models(session, tenant_id).get(model_id)  # NotFound: deleted while importing
            for name, value in model_fields(imported.stored).items():
                setattr(row, name, value)
            progress.stage = "done"
            row.status, row.source, row.progress = ModelStatus.ready, imported.resolved, progress.as_dict()
            row.name = imported.resolved[:200] if default_name else row.name
    except BaseException:
        store.delete(imported.stored.storage_key)
        raise


def _fail(model_id: str, tenant_id: str, error: dict[str, Any], progress: Progress) -> None:
    with session_scope() as session:
        try:
            row = Models(session, tenant_id).get(model_id)
        except NotFound:
            log.info("model %s was deleted while it was importing", model_id)
            return
        row.status, row.error, row.progress = ModelStatus.failed, error, progress.as_dict()
    log.info("import of model %s failed: %s", model_id, error["code"])


def import_model(source: str, credentials: S3Credentials | None, model_id: str, settings: Settings,
                 store: ArtifactStore, progress: Progress) -> Imported:
    """Fetch, validate and store the model at `source`; nothing is left on failure. Its sha256 is a chunked
    upload's: of its manifest (names, sizes and sha256 of its files)."""
    with scratch_dir(settings, "upload") as scratch:
        folder = scratch / "model"
        folder.mkdir()
        if source.startswith("hf://"):
            resolved = _fetch_hf(source, folder, settings, progress)
        else:
            resolved = _fetch_s3(source, credentials or S3Credentials(), folder, settings, progress)
        progress.enter("checking")
        files = sorted(folder.iterdir())
        size = sum(f.stat().st_size for f in files)
        manifest: list[dict[str, Any]] = [{"path": f.name, "size": f.stat().st_size, "sha256": _sha256(f)}
                                          for f in files]
        progress.enter("storing")
        info, key = store_model_folder(folder, model_id, settings, store)
    stored = StoredUpload(info=info, sha256=manifest_sha256(manifest), size_bytes=size, storage_key=key)
    return Imported(stored, resolved)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _wanted(name: str) -> bool:
    return "/" not in name and plain_file_name(name) and any(fnmatch.fnmatch(name, p) for p in MODEL_FILES)


def _check_caps(sizes: dict[str, int], settings: Settings) -> None:
    if not sizes:
        raise NotFound("the source holds no model files (config.json, *.safetensors, tokenizer files)")
    if len(sizes) > settings.max_upload_files:
        raise PayloadTooLarge(f"{len(sizes)} files exceed the limit of {settings.max_upload_files} "
                              "(MCS_MAX_UPLOAD_FILES)")
    big = [name for name, size in sizes.items() if size > settings.max_upload_file_bytes]
    if big:
        raise PayloadTooLarge(f"{big[0]!r} exceeds the limit of {settings.max_upload_file_bytes:,} bytes per file "
                              "(MCS_MAX_UPLOAD_FILE_BYTES)", {"files": big[:10]})
    if sum(sizes.values()) > settings.max_model_upload_bytes:
        raise PayloadTooLarge(f"the files total {sum(sizes.values()):,} bytes; the limit is "
                              f"{settings.max_model_upload_bytes:,} (MCS_MAX_MODEL_UPLOAD_BYTES)")


# -- hf:// --------------------------------------------------------------------------------------------------------


def _fetch_hf(source: str, folder: Path, settings: Settings, progress: Progress) -> str:
    """Copy the model files of a cached snapshot (resolving its symlinks into the cache's blobs)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    match = re.fullmatch(HF_SOURCE, source)
    if match is None:
        raise InvalidRequest("an hf:// source reads hf://org/name or hf://org/name@revision", {"field": "source"})
    repo, revision = match["repo"], match["rev"] or "main"
    try:
        snapshot = Path(snapshot_download(repo, revision=revision, cache_dir=settings.hf_mirror_dir or None,
                                          local_files_only=True, allow_patterns=list(MODEL_FILES)))
    except (LocalEntryNotFoundError, FileNotFoundError, HFValidationError) as exc:  # an invalid id is not cached
        raise NotFound(f"{repo}@{revision} is not in the local Hugging Face cache (MCS_HF_MIRROR_DIR, else "
                       "HF_HUB_CACHE); this service never downloads from the Hub: put the snapshot there first",
                       {"source": source}) from exc
    files = {entry.name: entry for entry in snapshot.iterdir() if _wanted(entry.name) and entry.is_file()}
    sizes = {name: path.stat().st_size for name, path in files.items()}
    _check_caps(sizes, settings)
    progress.planned(sum(sizes.values()))
    for name, path in files.items():
        _copy(path, folder / name, progress)  # follows the snapshot's symlink to its blob
    return f"hf://{repo}@{snapshot.name}"


def _copy(source: Path, target: Path, progress: Progress) -> None:
    with source.open("rb") as reader, target.open("wb") as writer:
        while chunk := reader.read(8 << 20):
            writer.write(chunk)
            progress.advanced(len(chunk))


# -- s3:// --------------------------------------------------------------------------------------------------------


def _fetch_s3(source: str, credentials: S3Credentials, folder: Path, settings: Settings, progress: Progress) -> str:
    """Download the model files directly under the prefix (not deeper), after the allow-list and endpoint checks."""
    bucket, prefix = _s3_source(source, settings)
    client = _client(credentials, settings)
    listing = f"{prefix}/" if prefix else ""
    with _remote_errors(source):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=listing)
        sizes = {item["Key"][len(listing):]: int(item["Size"]) for page in pages for item in page.get("Contents", [])
                 if _wanted(item["Key"][len(listing):])}
        _check_caps(sizes, settings)
        progress.planned(sum(sizes.values()))
        for name, size in sizes.items():
            client.download_file(bucket, f"{listing}{name}", str(folder / name), Callback=progress.advanced)
            if (folder / name).stat().st_size != size:
                raise Unavailable(f"{name}: got {(folder / name).stat().st_size} bytes, expected {size}")
    return f"s3://{bucket}/{listing}"


def _s3_source(source: str, settings: Settings) -> tuple[str, str]:
    parts = urlsplit(source)
    allowed = {name.strip() for name in settings.import_s3_buckets.split(",") if name.strip()}
    if parts.netloc not in allowed:
        raise Forbidden(f"bucket {parts.netloc[:100]!r} is not one this service imports from "
                        "(MCS_IMPORT_S3_BUCKETS)", {"bucket": parts.netloc[:100]})
    if parts.query or parts.fragment or ".." in parts.path.split("/"):
        raise InvalidRequest("an s3:// source reads s3://bucket/prefix", {"field": "source"})
    return parts.netloc, parts.path.strip("/")


def _client(credentials: S3Credentials, settings: Settings) -> Any:
    """A client with the request's keys, else the operator's import profile; never the service's own chain."""
    import boto3
    from botocore.config import Config

    endpoint = credentials.endpoint_url
    if endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UnsafeUrl("an S3 endpoint must be http:// or https:// with a host", [{"field": "endpoint_url"}])
        if not settings.import_allow_private:
            check_public_host(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), "S3 endpoint",
                              "MCS_IMPORT_ALLOW_PRIVATE")
    if credentials.access_key_id and credentials.secret_access_key:
        session = boto3.session.Session(aws_access_key_id=credentials.access_key_id,
                                        aws_secret_access_key=credentials.secret_access_key,
                                        aws_session_token=credentials.session_token or None,
                                        region_name=credentials.region or None)
    elif settings.import_s3_profile:
        session = boto3.session.Session(profile_name=settings.import_s3_profile, region_name=credentials.region or None)
    else:
        raise InvalidRequest("give access_key_id and secret_access_key for the bucket (no import profile is set: "
                             "MCS_IMPORT_S3_PROFILE)", {"field": "s3"})
    config = Config(signature_version="s3v4", retries={"max_attempts": 3, "mode": "standard"},
                    s3={"addressing_style": "path" if endpoint else "auto"})
    return session.client("s3", endpoint_url=endpoint or None, config=config)


@contextmanager
def _remote_errors(source: str) -> Iterator[None]:
    """The source bucket's failures as the client's (403/404) or the store's (503) problem, with the source named."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise Forbidden(f"the source bucket refused these credentials: {code}", {"source": source}) from exc
        if code in ("NoSuchBucket", "NoSuchKey", "404"):
            raise NotFound(f"{source} does not exist: {code}", {"source": source}) from exc
        raise StorageFailed(f"the source bucket failed: {code}") from exc
    except BotoCoreError as exc:
        raise Unavailable(f"the source bucket is unreachable ({type(exc).__name__})") from exc
