"""Uploads: model folders through the resumable chunked upload (`/v1/uploads`), archives and datasets as one
multipart request; all streamed from disk with a progress bar."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import httpx

from api.schemas import DatasetOut, ModelOut, Page, UploadOut
from client.errors import UPLOAD_INTERRUPTED, ApiError
from client.http import RETRY_STATUSES, backoff, retry_after
from client.progress import Reporter, Transfer, reporter

if TYPE_CHECKING:
    from client.client import Client
    from client.progress import ProgressArg

CHUNK = 1 << 20
Manifest = list[dict[str, Any]]  # (a module-level name: `list` is a method of the classes below)
LONG = httpx.Timeout(1800.0, connect=10.0)  # completing a big upload validates every shard before it answers


class Models:
    """`client.models`."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def upload(self, path: str | Path, name: str | None = None, *, progress: ProgressArg = True,
               upload_id: str | None = None) -> ModelOut:
        """Upload a Hugging Face model folder (`config.json`, `*.safetensors`, tokenizer files) or an archive of one
        (`.zip`, `.tar.gz`) and return the stored model.

        A folder goes file by file through the resumable chunked upload: its top-level files (not hidden ones,
        not subfolders) are hashed, declared, and each is PUT from disk; a dropped connection resumes at the bytes
        the server received (`Content-Range`). If it gives up, the `ApiError` (`upload_interrupted`) carries
        `details["upload_id"]`: pass it as `upload_id` to continue that upload later (for 24 h by default). A
        server without chunked uploads gets the folder as a zip. An archive is sent as one multipart request.
        `name` defaults to the folder's (or archive's) name."""
        path = Path(path)
        with reporter(progress) as shown:
            if path.is_dir():
                return self._upload_folder(path, name or path.resolve().name, shown, upload_id)
            if path.is_file():
                return self._upload_archive(path, name, shown)
        raise ApiError("no_such_file", f"{path} is neither a model folder nor an archive", {"path": str(path)})

    def import_from(self, source: str, name: str | None = None, *, s3: dict[str, str] | None = None,
                    wait: bool = True, progress: ProgressArg = True, timeout: float | None = None,
                    interval: float = 1.0) -> ModelOut:
        """Import a model the service fetches itself, instead of uploading it: `s3://bucket/prefix/` (a bucket the
        operator allows; `s3` gives `endpoint_url`, `access_key_id`, `secret_access_key`, `session_token`,
        `region`, else the operator's import profile) or `hf://org/name[@revision]` from the workers' Hugging Face
        cache. A worker fetches and validates it; with `wait` this follows it, showing its bytes, and returns the
        model once ready, or raises the import's error (`ApiError` with its code) when it failed or `timeout` s
        passed. Without `wait`: the model as accepted (`status` importing)."""
        body: dict[str, Any] = {"source": source, **({"name": name} if name else {}), **({"s3": s3} if s3 else {})}
        model = ModelOut.model_validate(self._client.http.json("POST", "/v1/models", json=body, retry=False))
        if not wait:
            return model
        with reporter(progress) as shown:
            return self._follow_import(model, shown, timeout, interval)

    def _follow_import(self, model: ModelOut, shown: Reporter, timeout: float | None, interval: float) -> ModelOut:
        deadline = None if timeout is None else time.monotonic() + timeout
        transfer: Transfer | None = None
        try:
            while model.status == "importing":
                if deadline is not None and time.monotonic() > deadline:
                    raise ApiError("timeout", f"model {model.id} is still importing after {timeout} s",
                                   {"model_id": model.id, "progress": model.progress})
                done, total = (model.progress or {}).get("bytes_done", 0), (model.progress or {}).get("bytes_total")
                if total and transfer is None:
                    transfer = shown.transfer(f"importing {model.source}", total)
                if transfer is not None:
                    transfer.update(done)
                time.sleep(interval)
                model = self.get(model.id)
        finally:
            if transfer is not None:
                transfer.close()
        if model.status == "failed":
            error = model.error or {}
            raise ApiError(error.get("code", "import_failed"), error.get("message", "the import failed"),
                           {"model_id": model.id, **({"details": error["details"]} if error.get("details") else {})})
        return model

    def get(self, model_id: str) -> ModelOut:
        return ModelOut.model_validate(self._client.http.json("GET", f"/v1/models/{model_id}"))

    def list(self, *, page: int = 1, page_size: int = 20) -> Page[ModelOut]:
        data = self._client.http.json("GET", "/v1/models", params={"page": page, "page_size": page_size})
        return Page[ModelOut].model_validate(data)

    def delete(self, model_id: str) -> None:
        """Delete a model (a `conflict` while it has queued or running jobs)."""
        self._client.http.request("DELETE", f"/v1/models/{model_id}")

    def _upload_archive(self, archive: Path, name: str | None, shown: Reporter) -> ModelOut:
        content_type = "application/zip" if archive.suffix == ".zip" else "application/gzip"
        with _file_part(archive, content_type, shown) as files:
            data = self._client.http.json("POST", "/v1/models", retry=False, timeout=LONG, files=files,
                                          data={"name": name} if name else None)
        return ModelOut.model_validate(data)

    def _upload_folder(self, folder: Path, name: str, shown: Reporter, upload_id: str | None) -> ModelOut:
        files = [file for file in sorted(folder.iterdir()) if file.is_file() and not file.name.startswith(".")]
        manifest = _manifest(files, shown, folder.name)
        try:
            upload = self._open_upload(name, manifest, upload_id)
        except ApiError as exc:
            if exc.code != "http_404" or upload_id is not None:  # 404 for the route itself: no chunked uploads
                raise
            return self._zip_and_upload(folder, files, name, shown)
        try:
            self._send_files(upload, {file.name: file for file in files}, shown, folder.name)
        except (ApiError, KeyboardInterrupt) as exc:
            if not isinstance(exc, ApiError) or exc.code == UPLOAD_INTERRUPTED:
                shown.note(f"upload {upload.id} is kept until {upload.expires_at:%Y-%m-%d %H:%M} UTC: resume it "
                           f"with upload_id={upload.id!r} (mcs models upload {folder} --resume {upload.id})")
            raise
        data = self._client.http.json("POST", f"/v1/uploads/{upload.id}/complete", retry=False, timeout=LONG)
        return ModelOut.model_validate(data)

    def _open_upload(self, name: str, manifest: Manifest, upload_id: str | None) -> UploadOut:
        http = self._client.http
        if upload_id is None:
            return UploadOut.model_validate(http.json("POST", "/v1/uploads", retry=False,
                                                      json={"name": name, "files": manifest}))
        upload = UploadOut.model_validate(http.json("GET", f"/v1/uploads/{upload_id}"))
        declared = sorted((f.path, f.size, f.sha256.lower()) for f in upload.files)
        if declared != sorted((f["path"], f["size"], f["sha256"]) for f in manifest):
            raise ApiError("manifest_mismatch", f"upload {upload_id} declared other files than {name!r} holds now; "
                           "start a new upload", {"upload_id": upload_id})
        return upload

    def _send_files(self, upload: UploadOut, paths: dict[str, Path], shown: Reporter, label: str) -> None:
        transfer = shown.transfer(f"upload {label}", upload.total_bytes)
        try:
            done = sum(f.size for f in upload.files if f.complete)
            transfer.update(upload.received_bytes)
            for entry in upload.files:
                if not entry.complete:
                    self._send_file(upload.id, paths[entry.path], entry.received, entry.size, transfer, done)
                    done += entry.size
        finally:
            transfer.close()

    def _send_file(self, upload_id: str, path: Path, received: int, size: int, transfer: Transfer,
                   before: int) -> None:
        """PUT one file from `received` on; after a dropped connection (or a 409 naming the bytes the server holds)
        continue from what the server reports, giving up after max_retries tries in a row without progress."""
        http, url = self._client.http, f"/v1/uploads/{upload_id}/files/{path.name}"
        failures, best = 0, received
        while True:
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size - received)}
            if size:
                headers["Content-Range"] = f"bytes {received}-{size - 1}/{size}"
            transfer.update(before + received)
            try:
                with path.open("rb") as handle:
                    handle.seek(received)
                    response = http.client.put(url, content=_read(handle, size - received, transfer),
                                               headers=headers, timeout=LONG)
                if response.is_success:
                    return
                error = ApiError.from_response(response)
                if error.status not in (409, *RETRY_STATUSES):
                    raise error
                wait = retry_after(response, failures)
            except httpx.TransportError as exc:
                error, wait = ApiError(UPLOAD_INTERRUPTED, f"PUT {url}: {type(exc).__name__}: {exc}"), None
            failures += 1
            if failures > http.max_retries:
                raise ApiError(UPLOAD_INTERRUPTED, f"gave up on {path.name} after {failures} tries without progress:"
                               f" {error.message}", {"upload_id": upload_id, "path": path.name}, error.status)
            time.sleep(wait if wait is not None else backoff(failures - 1))
            received = self._received(upload_id, path.name, error)
            if received >= size:  # complete (a 409 "already complete" after a response we never saw)
                return
            if received > best:
                failures, best = 0, received

    def _received(self, upload_id: str, name: str, error: ApiError) -> int:
        """Where to resume: the 409's `details.received`, else the upload's progress."""
        if isinstance(error.details, dict) and isinstance(error.details.get("received"), int):
            return int(error.details["received"])
        upload = UploadOut.model_validate(self._client.http.json("GET", f"/v1/uploads/{upload_id}"))
        entry = next(f for f in upload.files if f.path == name)
        return entry.size if entry.complete else entry.received

    def _zip_and_upload(self, folder: Path, files: Sequence[Path], name: str, shown: Reporter) -> ModelOut:
        with tempfile.TemporaryDirectory(prefix="mcs-upload-") as tmp:
            archive = Path(tmp) / f"{folder.name}.zip"
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
                for file in files:
                    zf.write(file, f"{folder.name}/{file.name}")
            return self._upload_archive(archive, name, shown)


class Datasets:
    """`client.datasets`."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def upload(self, path: str | Path, name: str | None = None, *, format: str = "auto",
               progress: ProgressArg = True) -> DatasetOut:
        """Upload calibration or training text: JSONL with a `text` field (optional `label`) or plain text, one
        sample per line (`format`: `auto`, `jsonl` or `text`). Steps use it through its `id` as `dataset_id`."""
        path = Path(path)
        if not path.is_file():
            raise ApiError("no_such_file", f"no dataset file {path}", {"path": str(path)})
        fields = {"format": format, **({"name": name} if name else {})}
        with reporter(progress) as shown, _file_part(path, "text/plain", shown) as files:
            data = self._client.http.json("POST", "/v1/datasets", retry=False, timeout=LONG, data=fields,
                                          files=files)
        return DatasetOut.model_validate(data)

    def get(self, dataset_id: str) -> DatasetOut:
        return DatasetOut.model_validate(self._client.http.json("GET", f"/v1/datasets/{dataset_id}"))

    def list(self, *, page: int = 1, page_size: int = 20) -> Page[DatasetOut]:
        data = self._client.http.json("GET", "/v1/datasets", params={"page": page, "page_size": page_size})
        return Page[DatasetOut].model_validate(data)

    def delete(self, dataset_id: str) -> None:
        self._client.http.request("DELETE", f"/v1/datasets/{dataset_id}")


def _manifest(files: list[Path], shown: Reporter, label: str) -> list[dict[str, Any]]:
    """Name, size and sha256 of each file (read once, with a progress bar: big shards take a while)."""
    sizes = {file: file.stat().st_size for file in files}
    transfer = shown.transfer(f"sha256 {label}", sum(sizes.values()))
    manifest = []
    try:
        for file in files:
            digest = hashlib.sha256()
            with file.open("rb") as handle:
                while chunk := handle.read(CHUNK):
                    digest.update(chunk)
                    transfer.advance(len(chunk))
            manifest.append({"path": file.name, "size": sizes[file], "sha256": digest.hexdigest()})
    finally:
        transfer.close()
    return manifest


def _read(handle: BinaryIO, remaining: int, transfer: Transfer) -> Iterator[bytes]:
    while remaining > 0:
        chunk = handle.read(min(CHUNK, remaining))
        if not chunk:
            raise ApiError("file_changed", f"{handle.name} got shorter while it was uploaded")
        remaining -= len(chunk)
        transfer.advance(len(chunk))
        yield chunk


class _Counted(io.RawIOBase):
    """A file httpx's multipart encoder reads in chunks (its length known from fstat), counting what it read."""

    def __init__(self, handle: BinaryIO, transfer: Transfer) -> None:
        self.handle, self.transfer = handle, transfer

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self.handle.read(size)
        self.transfer.advance(len(chunk))
        return chunk

    def fileno(self) -> int:
        return self.handle.fileno()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        position = self.handle.seek(offset, whence)
        self.transfer.update(position)
        return position

    def tell(self) -> int:
        return self.handle.tell()


@contextmanager
def _file_part(path: Path, content_type: str, shown: Reporter) -> Iterator[dict[str, tuple[str, Any, str]]]:
    """The multipart `file` field, streamed from disk with a progress bar."""
    transfer = shown.transfer(f"upload {path.name}", path.stat().st_size)
    try:
        with path.open("rb") as handle:
            yield {"file": (path.name, _Counted(handle, transfer), content_type)}
    finally:
        transfer.close()
