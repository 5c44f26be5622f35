"""Artifact downloads that resume (`Range` + `If-Range`) and are checked against the sha256 `ETag`."""

import hashlib
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

import httpx

from api.schemas import ArtifactOut
from client.errors import CHECKSUM_MISMATCH, ApiError
from client.http import backoff, connection_error
from client.progress import Transfer, reporter

if TYPE_CHECKING:
    from client.client import Client
    from client.progress import ProgressArg

CHUNK = 1 << 20
FILENAME_STAR = re.compile(r"filename\*=UTF-8''([^;]+)", re.IGNORECASE)


class Artifacts:
    """`client.artifacts`."""

    def __init__(self, client: "Client") -> None:
        self._client = client

    def head(self, artifact_id: str) -> ArtifactOut:
        """An artifact's name, size and sha256, read from the headers of `HEAD /v1/artifacts/{id}`."""
        response = self._client.http.request("HEAD", f"/v1/artifacts/{artifact_id}")
        match = FILENAME_STAR.search(response.headers.get("Content-Disposition", ""))
        return ArtifactOut(id=artifact_id, name=unquote(match.group(1)) if match else f"{artifact_id}.zip",
                           size_bytes=int(response.headers["Content-Length"]),
                           sha256=response.headers["ETag"].strip('"'), url=str(response.url))

    def download(self, artifact: ArtifactOut | str, dest: str | Path = ".", *, progress: "ProgressArg" = True,
                 attempts: int | None = None) -> Path:
        """Download an artifact (an `ArtifactOut` of a job, or an artifact id) into the folder `dest` (created if
        needed; the file gets the artifact's name) or to `dest` itself when it names a `.zip` file; return the
        file's path.

        The bytes go to a hidden `.part` file next to the target, named after the sha256, so a download that was
        interrupted (here or in an earlier run) resumes with `Range` where it stopped; `If-Range` makes the server
        send the whole file instead if the artifact changed. The finished file's sha256 must equal the `ETag`
        (and the job's `sha256`): a stale partial file is discarded and fetched again once, any other mismatch is an
        `ApiError` `checksum_mismatch`. A dropped connection is resumed up to `attempts` times in a row without
        progress (default: the client's max_retries)."""
        info = self.head(artifact) if isinstance(artifact, str) else artifact
        target = _target(Path(dest), info)
        part = target.parent / f".{target.name}.{info.sha256[:16]}.part"
        tries = self._client.http.max_retries if attempts is None else attempts
        with reporter(progress) as shown:
            transfer = shown.transfer(f"download {target.name}", info.size_bytes)
            try:
                self._fetch(info, part, transfer, tries)
            finally:
                transfer.close()
            part.replace(target)
        return target

    def _fetch(self, info: ArtifactOut, part: Path, transfer: Transfer, tries: int) -> None:
        failures, restarted = 0, False
        while True:
            try:
                digest, resumed = self._get(info, part, transfer)
            except httpx.TransportError as exc:
                failures += 1
                if failures > tries:
                    raise connection_error("GET", f"/v1/artifacts/{info.id}", exc,
                                           {"partial": str(part)}) from exc
                time.sleep(backoff(failures - 1))
                continue
            if digest == info.sha256:
                return
            part.unlink(missing_ok=True)
            if resumed and not restarted:  # a partial file from elsewhere: once more from the first byte
                restarted = True
                continue
            raise ApiError(CHECKSUM_MISMATCH, f"the download of artifact {info.id} has sha256 {digest}, not its ETag "
                           f"{info.sha256}; the file was removed", {"artifact_id": info.id, "sha256": digest,
                                                                    "expected": info.sha256})

    def _get(self, info: ArtifactOut, part: Path, transfer: Transfer) -> tuple[str, bool]:
        """One GET from where the partial file ends; the sha256 of the whole file, and whether it resumed."""
        offset = part.stat().st_size if part.exists() else 0
        with self._open(info, offset) as response:
            if response.status_code == 416:  # the partial file is already as long as the artifact (or longer)
                return _sha256(part), True
            resumed = response.status_code == 206
            if resumed and _range_start(response) != offset:
                raise ApiError("http_206", f"asked for the bytes from {offset}, the server sent "
                               f"{response.headers.get('Content-Range')!r}", {"artifact_id": info.id})
            digest = _sha256_of(part) if resumed else hashlib.sha256()
            transfer.update(offset if resumed else 0)
            with part.open("ab" if resumed else "wb") as out:
                for chunk in response.iter_bytes():  # as they arrive: a cut keeps all it got
                    out.write(chunk)
                    digest.update(chunk)
                    transfer.advance(len(chunk))
        return digest.hexdigest(), resumed

    @contextmanager
    def _open(self, info: ArtifactOut, offset: int) -> Iterator[httpx.Response]:
        """The response with the artifact's bytes from `offset`: the API's own, or, where the API redirects to a
        presigned object-store URL, that URL's (fetched without the API key; its ETag is the store's, so the
        sha256 is checked on the bytes). A fresh URL is asked for on every resume: they expire."""
        etag = f'"{info.sha256}"'
        headers = {"Range": f"bytes={offset}-", "If-Range": etag} if offset else {}
        http = self._client.http
        with http.stream("GET", f"/v1/artifacts/{info.id}", headers, accept=(416,)) as response:
            _check_etag(response, info)
            if not response.is_redirect:
                yield response
                return
            location = str(response.url.join(response.headers["Location"]))
        ranged = {"Range": f"bytes={offset}-"} if offset else {}
        with http.external.stream("GET", location, headers=ranged) as response:
            if response.is_error and response.status_code != 416:
                raise ApiError.from_response(response)
            yield response


def _check_etag(response: httpx.Response, info: ArtifactOut) -> None:
    received = response.headers.get("ETag")
    if response.status_code != 416 and received != f'"{info.sha256}"':
        raise ApiError(CHECKSUM_MISMATCH, f"the server's ETag {received} is not the artifact's sha256 {info.sha256}",
                       {"artifact_id": info.id, "etag": received, "expected": info.sha256})


def _target(dest: Path, info: ArtifactOut) -> Path:
    """The file to write: `dest` itself when it names a `.zip` file, else the artifact's name (its last path part)
    inside the folder `dest` (created)."""
    if dest.is_dir() or dest.suffix.lower() != ".zip":
        dest.mkdir(parents=True, exist_ok=True)
        name = Path(info.name.replace("\\", "/")).name
        return dest / (name if name not in ("", ".", "..") else f"{info.id}.zip")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest


def _range_start(response: httpx.Response) -> int | None:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _sha256_of(path: Path) -> "hashlib._Hash":
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest


def _sha256(path: Path) -> str:
    return _sha256_of(path).hexdigest()
