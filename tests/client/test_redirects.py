"""Downloads the API redirects to a presigned object-store URL (MCS_ARTIFACT_REDIRECT): the URL is fetched without
the API key, resumes with Range, and the bytes are checked against the API's sha256 ETag. httpx's MockTransport
plays the API and the store."""

import hashlib

import httpx
import pytest

from client import ApiError, ArtifactOut, Client

BODY = bytes(range(256)) * 40
SHA = hashlib.sha256(BODY).hexdigest()
ARTIFACT = ArtifactOut(id="art_1", name="m-compressed.zip", size_bytes=len(BODY), sha256=SHA)


def api_and_store(seen: list[httpx.Request], body: bytes = BODY):
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "api.test":
            return httpx.Response(302, headers={"Location": "https://store.test/obj?X-Amz-Signature=s",
                                                "ETag": f'"{SHA}"'})
        start = int(request.headers.get("Range", "bytes=0-")[6:-1])
        status = 206 if start else 200
        headers = {"ETag": '"md5-of-the-store"', "Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"}
        return httpx.Response(status, headers=headers, content=body[start:])

    return httpx.MockTransport(handle)


def test_a_redirect_is_followed_without_the_key_and_resumed_with_range(tmp_path):
    seen: list[httpx.Request] = []
    (tmp_path / f".{ARTIFACT.name}.{SHA[:16]}.part").write_bytes(BODY[:1000])
    with Client("http://api.test", "mcs_secret", transport=api_and_store(seen)) as api:
        path = api.artifacts.download(ARTIFACT, tmp_path, progress=False)
    assert path.read_bytes() == BODY
    api_request, store_request = seen
    assert api_request.headers["Authorization"] == "Bearer mcs_secret"
    assert api_request.headers["Range"] == "bytes=1000-" and api_request.headers["If-Range"] == f'"{SHA}"'
    assert "Authorization" not in store_request.headers and store_request.headers["Range"] == "bytes=1000-"
    assert "If-Range" not in store_request.headers  # the store's ETag is not our sha256


def test_bytes_from_the_store_are_checked_against_the_apis_etag(tmp_path):
    seen: list[httpx.Request] = []
    with Client("http://api.test", "k", transport=api_and_store(seen, BODY[::-1])) as api, \
            pytest.raises(ApiError) as wrong:
        api.artifacts.download(ARTIFACT, tmp_path, progress=False)
    assert wrong.value.code == "checksum_mismatch" and list(tmp_path.iterdir()) == []
