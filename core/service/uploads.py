"""Turn an uploaded archive into a stored, validated model folder (used by the API, testable without it)."""

import errno
import hashlib
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from core.compression.archive import extract_archive
from core.compression.modelio import ModelInfo, inspect_model_folder
from core.errors import InvalidRequest, PayloadTooLarge, StorageFailed
from core.service.db.models import Model
from core.service.db.repositories import Models
from core.service.settings import Settings
from core.service.storage import ArtifactStore

CHUNK = 1 << 20
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class StoredUpload:
    info: ModelInfo
    sha256: str
    size_bytes: int
    storage_key: str


@contextmanager
def scratch_dir(settings: Settings, prefix: str) -> Iterator[Path]:
    """A private folder for one upload in flight, removed whatever happens (nothing half-written is left)."""
    scratch = settings.work_dir / f"{prefix}-{uuid.uuid4().hex}"
    scratch.mkdir(parents=True)
    try:
        yield scratch
    except OSError as exc:  # a full disk is the service's problem, not the client's: name it (507), not a 500
        if exc.errno not in DISK_FULL:
            raise
        raise StorageFailed("the service is out of storage space for uploads; try again later") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def display_name(filename: str | None, default: str, suffixes: tuple[str, ...] = ()) -> str:
    """A client's filename reduced to a label: no folders (`../../app.py` -> `app.py`), no control characters
    (a NUL must not reach the database), at most 200 characters. It never names a file on our side."""
    base = UNPRINTABLE.sub("", (filename or "").replace("\\", "/").rsplit("/", 1)[-1])
    for suffix in suffixes:
        base = base.removesuffix(suffix)
    return base.strip()[:200] or default


def model_storage_key(model_id: str) -> str:
    return f"models/{model_id}"


def spool_upload(source: BinaryIO, target: Path, max_bytes: int) -> tuple[str, int]:
    """Copy the upload to `target` in chunks while hashing; stop at `max_bytes` (the upload is never in memory)."""
    digest, size = hashlib.sha256(), 0
    with target.open("xb") as out:
        for chunk in iter(lambda: source.read(CHUNK), b""):
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(f"the upload exceeds the limit of {max_bytes:,} bytes", {"field": "file"})
            digest.update(chunk)
            out.write(chunk)
    if size == 0:
        raise InvalidRequest("the uploaded file is empty", {"field": "file"})
    return digest.hexdigest(), size


def store_model_upload(source: BinaryIO, model_id: str, settings: Settings, store: ArtifactStore) -> StoredUpload:
    """Spool, extract safely, validate and store an uploaded model archive. On any failure nothing is left."""
    with scratch_dir(settings, "upload") as scratch:
        sha256, size = spool_upload(source, scratch / "upload", settings.max_upload_bytes)
        root = extract_archive(scratch / "upload", scratch / "extracted", settings.extraction_limits)
        info, key = store_model_folder(root, model_id, settings, store)
        return StoredUpload(info=info, sha256=sha256, size_bytes=size, storage_key=key)


def store_model_folder(root: Path, model_id: str, settings: Settings, store: ArtifactStore) -> tuple[ModelInfo, str]:
    """Validate a model folder (without loading its weights) and store it under the model's key; returns the
    validation's findings and the key. Shared by archive uploads and chunked uploads, so both accept the same models."""
    info = inspect_model_folder(root, settings.max_model_parameters)
    key = model_storage_key(model_id)
    store.put_tree(key, root)
    return info, key


def model_fields(stored: StoredUpload) -> dict[str, Any]:
    """What a stored model folder sets on its row."""
    return {"architecture": stored.info.architecture, "model_type": stored.info.model_type,
            "num_parameters": stored.info.num_parameters, "size_bytes": stored.info.weight_bytes,
            "block_shape": asdict(stored.info.block_shape) if stored.info.block_shape else None,
            "sha256": stored.sha256, "storage_key": stored.storage_key}


def add_model_row(models: Models, model_id: str, name: str, stored: StoredUpload) -> Model:
    """The model's row for a stored upload (the caller commits)."""
    row: Model = models.add(id=model_id, name=name, **model_fields(stored))
    return row
