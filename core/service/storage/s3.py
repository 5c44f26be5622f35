"""Artifacts in an S3-compatible object store (AWS S3, MinIO, moto's server), selected by
`MCS_ARTIFACT_URL=s3://bucket/prefix`.

Object layout under the prefix, for a key `k`:
    k                       a stored file (an artifact zip, a dataset): one object; a PUT or a completed multipart
                            upload replaces it atomically, so readers see the old object or the new one.
    k/tree.json             a stored folder (a model): {"version": v, "files": {name: size}}, written last;
    k/<v>/<name>            the folder's files under the version named there. A new folder is uploaded under a
                            new version and published by overwriting tree.json (one atomic PUT), then the old
                            version's objects are deleted: a reader never sees half a folder or two mixed.
Readers on other hosts (workers) fetch a folder into their own scratch (`local_tree(key, into)`), so nothing here
assumes that the API and the workers share a disk. Credentials come from boto3's standard chain (AWS_* variables,
~/.aws files, instance or container roles); `MCS_S3_ENDPOINT_URL` points at a store other than AWS.
"""

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from core.errors import NotFound, StorageFailed, Unavailable, UnsafeInput

log = logging.getLogger(__name__)
TREE_MANIFEST = "tree.json"
MiB = 1024**2
# S3's largest CopyObject. One request per object up to it: a multipart copy in 64 MiB parts took 3.4x as long
# against moto's server, which reads the whole source object for each part it copies.
COPY_OBJECT_MAX = 5 * 1024**3
COPY_PART = 1024**3  # the parts of a bigger object's multipart copy
POOL_CONNECTIONS = 32  # parts of several PUTs, parallel copies and transfers at once (botocore's default: 10)
# Error codes S3 (and compatible stores) answer while overloaded or briefly broken: worth a retry, not a failure.
TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                             "InternalError", "ServiceUnavailable", "503", "500"})
MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchUpload"})


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix"); the prefix may be empty."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"MCS_ARTIFACT_URL must be empty (local disk) or s3://bucket/prefix, not {url!r}")
    return parts.netloc, parts.path.strip("/")


class S3ArtifactStore:
    """`ArtifactStore` on boto3. Files over `multipart_threshold` bytes go up as multipart uploads of
    `multipart_chunk` bytes, several parts at once; downloads of big files are ranged GETs in parallel; `read_range`
    streams one ranged GET without holding it in memory."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None,
                 presign_endpoint_url: str | None = None, multipart_threshold: int = 64 * MiB,
                 multipart_chunk: int = 64 * MiB, max_concurrency: int = 8) -> None:
        from boto3.s3.transfer import TransferConfig

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = _client(endpoint_url)
        # Presigned URLs are signed offline; a store that clients reach under another name than the service does
        # (MinIO at http://minio:9000 inside compose, localhost:9000 outside) signs them for the clients' name.
        self.presign_client = _client(presign_endpoint_url) if presign_endpoint_url else self.client
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunk,
                                       max_concurrency=max_concurrency, use_threads=True)
        self.copy_transfer = TransferConfig(multipart_threshold=COPY_OBJECT_MAX + 1, multipart_chunksize=COPY_PART,
                                            max_concurrency=max_concurrency, use_threads=True)

    def object_key(self, key: str) -> str:
        parts = key.split("/")
        if not key or key.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\\" in key:
            raise UnsafeInput(f"storage key {key!r} is not a plain relative path")
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- writing -------------------------------------------------------------------------------------------------

    def put_file(self, key: str, source: Path) -> None:
        with _s3_errors(key):
            self.client.upload_file(str(source), self.bucket, self.object_key(key), Config=self.transfer)

    def put_stream(self, key: str, chunks: Iterator[bytes]) -> int:
        """One PUT when the bytes fit in a part, else a multipart upload of `multipart_chunk` parts sent one at a
        time (one part in memory), aborted if the iterator raises: nothing half-written is ever visible."""
        target, part = self.object_key(key), self.transfer.multipart_chunksize
        buffer, parts, upload_id, size = bytearray(), list[dict[str, Any]](), "", 0
        with _s3_errors(key):
            try:
                for chunk in chunks:
                    buffer += chunk
                    size += len(chunk)
                    while len(buffer) >= part:
                        upload_id = upload_id or self.client.create_multipart_upload(
                            Bucket=self.bucket, Key=target)["UploadId"]
                        parts.append(self._upload_part(target, upload_id, len(parts) + 1, bytes(buffer[:part])))
                        del buffer[:part]
                if not upload_id:
                    self.client.put_object(Bucket=self.bucket, Key=target, Body=bytes(buffer))
                    return size
                if buffer:
                    parts.append(self._upload_part(target, upload_id, len(parts) + 1, bytes(buffer)))
                self.client.complete_multipart_upload(Bucket=self.bucket, Key=target, UploadId=upload_id,
                                                      MultipartUpload={"Parts": parts})
            except BaseException:
                if upload_id:
                    self._abort_quietly(target, upload_id)
                raise
        return size

    def _abort_quietly(self, target: str, upload_id: str) -> None:
        """A cleanup after a failure, which must not hide it (a bucket lifecycle rule aborts what is left)."""
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=target, UploadId=upload_id)
        except Exception:
            log.warning("could not abort the multipart upload of %s", target, exc_info=True)

    def _upload_part(self, target: str, upload_id: str, number: int, data: bytes) -> dict[str, Any]:
        etag = self.client.upload_part(Bucket=self.bucket, Key=target, PartNumber=number, UploadId=upload_id,
                                       Body=data)["ETag"]
        return {"PartNumber": number, "ETag": etag}

    def put_tree(self, key: str, source_dir: Path) -> None:
        """Upload every file under a new version, published as `_publish_tree` says; the local folder is consumed
        (removed) once stored."""
        files = sorted(path for path in source_dir.rglob("*") if path.is_file() and not path.is_symlink())
        names = {path.relative_to(source_dir).as_posix(): path.stat().st_size for path in files}

        def upload(version_prefix: str) -> None:
            for name, path in zip(names, files, strict=True):
                self.client.upload_file(str(path), self.bucket, f"{version_prefix}{name}", Config=self.transfer)

        self._publish_tree(key, names, upload)
        shutil.rmtree(source_dir, ignore_errors=True)

    def copy_tree(self, key: str, sources: dict[str, str]) -> None:
        """Store objects of this bucket (file name -> object key) as the folder `key`, published as `put_tree`
        publishes; copied inside the store, several objects at once, each in one CopyObject (multipart copies in
        COPY_PART parts above COPY_OBJECT_MAX), so no byte passes through this host. The chunked uploads staged
        here become a model this way."""
        with _s3_errors(key):
            names = {name: int(self.client.head_object(Bucket=self.bucket, Key=source)["ContentLength"])
                     for name, source in sources.items()}

        def copy_one(name: str, source: str, target: str) -> None:
            if names[name] <= COPY_OBJECT_MAX:
                self.client.copy_object(Bucket=self.bucket, Key=target, CopySource={"Bucket": self.bucket,
                                                                                    "Key": source})
            else:
                self.client.copy({"Bucket": self.bucket, "Key": source}, self.bucket, target,
                                 Config=self.copy_transfer)

        def copy(version_prefix: str) -> None:
            workers = max(1, min(len(sources), self.transfer.max_concurrency))
            with ThreadPoolExecutor(workers, thread_name_prefix="s3-copy") as pool:
                done = [pool.submit(copy_one, name, source, f"{version_prefix}{name}")
                        for name, source in sources.items()]
                for future in done:
                    future.result()  # the first failure, once every copy ended (none runs on after a cleanup)

        self._publish_tree(key, names, copy)

    def _publish_tree(self, key: str, names: dict[str, int], write: Callable[[str], None]) -> None:
        """`write` the files under a new version, publish it in tree.json, then drop the version it replaced; a
        failed write removes what it had written."""
        base, version = self.object_key(key), uuid.uuid4().hex
        with _s3_errors(key):
            previous = self._manifest_or_none(key)
            try:
                write(f"{base}/{version}/")
                manifest = json.dumps({"version": version, "files": names}).encode()
                self.client.put_object(Bucket=self.bucket, Key=f"{base}/{TREE_MANIFEST}", Body=manifest,
                                       ContentType="application/json")
            except BaseException:
                self._delete_prefix(f"{base}/{version}/", quiet=True)
                raise
            if previous is not None and previous["version"] != version:
                self._delete_prefix(f"{base}/{previous['version']}/")

    def delete(self, key: str) -> None:
        base = self.object_key(key)
        with _s3_errors(key):
            self.client.delete_object(Bucket=self.bucket, Key=base)
            self._delete_prefix(f"{base}/")

    # -- reading -------------------------------------------------------------------------------------------------

    def local_tree(self, key: str, into: Path) -> Path:
        """Download the folder into `into` (the caller's scratch, which it removes). A folder already fetched there
        for the stored version is reused: a retried job does not download its model again."""
        marker = into.with_name(f".{into.name}.version")
        with _s3_errors(key):
            manifest = self._manifest(key)
            if into.is_dir() and marker.is_file() and marker.read_text() == manifest["version"]:
                return into
            base = f"{self.object_key(key)}/{manifest['version']}"
            staging = into.with_name(f".{into.name}.{uuid.uuid4().hex}.tmp")
            staging.mkdir(parents=True)
            try:
                for name, size in manifest["files"].items():
                    target = staging / name
                    if not target.resolve().is_relative_to(staging.resolve()):
                        raise UnsafeInput(f"stored folder {key!r} names a file outside itself: {name!r}")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    self.client.download_file(self.bucket, f"{base}/{name}", str(target), Config=self.transfer)
                    if target.stat().st_size != size:
                        raise Unavailable(f"{key}/{name}: got {target.stat().st_size} bytes, expected {size}")
                marker.unlink(missing_ok=True)
                shutil.rmtree(into, ignore_errors=True)
                os.replace(staging, into)
                marker.write_text(manifest["version"])
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return into

    def local_file(self, key: str, into: Path) -> Path:
        """Download the file to `into`; a copy already there with the stored object's ETag is reused."""
        marker = into.with_name(f".{into.name}.etag")
        with _s3_errors(key):
            etag = self._head(key)["ETag"]
            if into.is_file() and marker.is_file() and marker.read_text() == etag:
                return into
            into.parent.mkdir(parents=True, exist_ok=True)
            staging = into.with_name(f".{into.name}.{uuid.uuid4().hex}.tmp")
            try:
                self.client.download_file(self.bucket, self.object_key(key), str(staging), Config=self.transfer)
                os.replace(staging, into)
            finally:
                staging.unlink(missing_ok=True)
            marker.write_text(etag)
        return into

    def size(self, key: str) -> int:
        with _s3_errors(key):
            return int(self._head(key)["ContentLength"])

    def read_range(self, key: str, start: int, end: int, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """One GET with `Range: bytes=start-end`, yielded in chunks as it arrives (never the whole range in
        memory); the connection goes back to the pool when the caller stops early."""
        with _s3_errors(key):
            body = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key),
                                          Range=f"bytes={start}-{end}")["Body"]
            try:
                yield from body.iter_chunks(chunk_size)
            finally:
                body.close()

    def presigned_url(self, key: str, expires_s: int, disposition: str, content_type: str) -> str | None:
        """A GET URL valid for `expires_s` seconds whose answer carries the given Content-Disposition and type."""
        with _s3_errors(key):
            url: str = self.presign_client.generate_presigned_url(
                "get_object", ExpiresIn=expires_s,
                Params={"Bucket": self.bucket, "Key": self.object_key(key), "ResponseContentType": content_type,
                        "ResponseContentDisposition": disposition},
            )
        return url

    def ready(self) -> bool:
        """The bucket answers (for readiness checks)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return True
        except Exception:
            return False

    # -- helpers -------------------------------------------------------------------------------------------------

    def _head(self, key: str) -> dict[str, Any]:
        head: dict[str, Any] = self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
        return head

    def _manifest(self, key: str) -> dict[str, Any]:
        body = self.client.get_object(Bucket=self.bucket, Key=f"{self.object_key(key)}/{TREE_MANIFEST}")["Body"]
        with body:
            manifest: dict[str, Any] = json.loads(body.read())
        return manifest

    def _manifest_or_none(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return self._manifest(key)
        except ClientError as exc:
            if _code(exc) in MISSING_CODES:
                return None
            raise

    def _delete_prefix(self, prefix: str, quiet: bool = False) -> None:
        """Delete every object under `prefix`; `quiet`: a cleanup after a failure, which must not hide that failure
        (what it leaves is unreferenced: no manifest names it)."""
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if objects:  # a page holds at most 1,000 keys, the most one delete_objects takes
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
        except Exception:
            if not quiet:
                raise
            log.warning("could not remove the partial upload under %s", prefix, exc_info=True)


def _client(endpoint_url: str | None) -> Any:
    """An S3 client from a session of its own (clients are thread-safe; sessions are not). Path-style addressing
    for a custom endpoint: MinIO and moto serve buckets as paths, not host names."""
    import boto3
    from botocore.config import Config

    config = Config(signature_version="s3v4", retries={"max_attempts": 5, "mode": "standard"},
                    s3={"addressing_style": "path" if endpoint_url else "auto"}, max_pool_connections=POOL_CONNECTIONS)
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextmanager
def _s3_errors(key: str) -> Iterator[None]:
    """The store's failures in the service's terms: a missing object is NotFound (404); an unreachable, overloaded
    or failing store is Unavailable (503 in the API, retried by the worker); anything else (access denied, no such
    bucket) is StorageFailed, a configuration fault that a retry would not fix."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

    try:
        yield
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise StorageFailed(f"no usable credentials for the object store ({exc}): set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or give the host a role") from exc
    except ClientError as exc:
        code = _code(exc)
        if code in MISSING_CODES:
            raise NotFound(f"stored object {key!r} is missing") from exc
        if code in TRANSIENT_CODES or code.startswith("5"):
            raise Unavailable(f"the object store failed on {key!r}: {code}; try again shortly") from exc
        raise StorageFailed(f"the object store refused {key!r}: {code}") from exc
    except S3UploadFailedError as exc:  # boto3's wrapper of a ClientError met while uploading
        cause = exc.__context__
        if isinstance(cause, ClientError) and not (_code(cause) in TRANSIENT_CODES or _code(cause).startswith("5")):
            raise StorageFailed(f"the object store refused {key!r}: {_code(cause)}") from exc
        raise Unavailable(f"uploading {key!r} to the object store failed: {exc}") from exc
    except (BotoCoreError, RetriesExceededError) as exc:  # connection refused or reset, timeouts...
        raise Unavailable(f"the object store is unreachable ({type(exc).__name__}: {exc})") from exc
