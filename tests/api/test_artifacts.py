import base64
import hashlib
from collections.abc import Callable
from datetime import timedelta
from email.message import Message
from email.utils import collapse_rfc2231_value

import pytest

from core.service.db.repositories import JobRuns
from core.service.db.session import session_scope
from core.service.storage import get_store

INT8 = {"type": "quantize"}
PAYLOAD = bytes(range(256)) * 40
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
ETAG = f'"{SHA256}"'


@pytest.fixture()
def stored_artifact(client, auth, upload, tmp_path) -> Callable[[str], dict]:
    """A finished job with a stored artifact of the given name, recorded through the worker's repository calls."""
    def store(name: str) -> dict:
        model = upload()
        job_id = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [INT8]}, headers=auth).json()["id"]
        source = tmp_path / "model.zip"
        source.write_bytes(PAYLOAD)
        key = f"artifacts/{job_id}/model.zip"
        get_store().put_file(key, source)
        with session_scope() as session:
            runs = JobRuns(session)
            job = runs.claim(job_id, timedelta(seconds=60), max_attempts=1)  # a run holds the job it ends
            runs.succeed(job, {"size_ratio": 0.25}, {"name": name, "storage_key": key, "sha256": SHA256,
                                                      "size_bytes": len(PAYLOAD)})
        return client.get(f"/v1/jobs/{job_id}", headers=auth).json()["artifacts"][0]

    return store


@pytest.fixture()
def artifact(stored_artifact) -> dict:
    return stored_artifact("m-compressed.zip")


def test_download_streams_with_digests(client, auth, artifact):
    response = client.get(f"/v1/artifacts/{artifact['id']}", headers=auth)
    assert response.status_code == 200
    assert response.content == PAYLOAD
    assert response.headers["Content-Length"] == str(len(PAYLOAD))
    assert response.headers["ETag"] == f'"{hashlib.sha256(PAYLOAD).hexdigest()}"'
    digest = base64.b64encode(hashlib.sha256(PAYLOAD).digest()).decode()
    assert response.headers["Repr-Digest"] == f"sha-256=:{digest}:"
    assert artifact["url"].endswith(f"/v1/artifacts/{artifact['id']}")


@pytest.mark.parametrize(("header", "start", "end"), [("bytes=0-9", 0, 9), ("bytes=100-", 100, len(PAYLOAD) - 1),
                                                       ("bytes=-16", len(PAYLOAD) - 16, len(PAYLOAD) - 1),
                                                       ("bytes=10-999999", 10, len(PAYLOAD) - 1)])
def test_single_ranges_are_206(client, auth, artifact, header, start, end):
    response = client.get(f"/v1/artifacts/{artifact['id']}", headers={**auth, "Range": header})
    assert response.status_code == 206
    assert response.content == PAYLOAD[start:end + 1]
    assert response.headers["Content-Range"] == f"bytes {start}-{end}/{len(PAYLOAD)}"


@pytest.mark.parametrize("header", ["bytes=5-1", f"bytes={len(PAYLOAD)}-", "bytes=abc", "items=0-1"])
def test_bad_ranges_are_416(client, auth, artifact, header):
    response = client.get(f"/v1/artifacts/{artifact['id']}", headers={**auth, "Range": header})
    assert response.status_code == 416
    assert response.headers["Content-Range"] == f"bytes */{len(PAYLOAD)}"


def test_many_ranges_get_the_whole_file(client, auth, artifact):
    header = "bytes=" + ",".join(f"{i}-{i}" for i in range(30))
    response = client.get(f"/v1/artifacts/{artifact['id']}", headers={**auth, "Range": header})
    assert response.status_code == 200 and response.content == PAYLOAD


def test_other_tenant_cannot_download(client, other_auth, artifact):
    assert client.get(f"/v1/artifacts/{artifact['id']}", headers=other_auth).status_code == 404


@pytest.mark.parametrize("name", ["模型-compressed.zip", 'a"; filename="evil.exe', "back\\slash;semi\r\nX-Injected: 1",
                                  "naïve.zip"])
def test_any_name_downloads_under_one_safe_filename(client, auth, stored_artifact, name):
    response = client.get(f"/v1/artifacts/{stored_artifact(name)['id']}", headers=auth)
    assert response.status_code == 200 and response.content == PAYLOAD and "X-Injected" not in response.headers
    header = Message()
    header["Content-Disposition"] = response.headers["Content-Disposition"]
    (kind, _), (_, fallback), (_, utf8) = header.get_params(header="Content-Disposition")
    assert (kind, collapse_rfc2231_value(utf8)) == ("attachment", name)
    assert fallback.isascii() and fallback.isprintable() and not set(fallback) & set('"\\;')


@pytest.mark.parametrize(("if_none_match", "status"), [(ETAG, 304), (f"W/{ETAG}", 304), (f'"other", {ETAG}', 304),
                                                       ("*", 304), ('"other"', 200), ('W/"other"', 200)])
def test_if_none_match_is_304_when_the_client_copy_is_current(client, auth, artifact, if_none_match, status):
    response = client.get(f"/v1/artifacts/{artifact['id']}", headers={**auth, "If-None-Match": if_none_match})
    assert response.status_code == status and response.headers["ETag"] == ETAG
    assert response.content == (b"" if status == 304 else PAYLOAD)


@pytest.mark.parametrize(("if_match", "status"), [(ETAG, 200), ("*", 200), (f'"other", {ETAG}', 200),
                                                  ('"other"', 412), (f"W/{ETAG}", 412)])
def test_if_match_is_412_unless_it_names_the_etag(client, auth, artifact, if_match, status):
    response = client.get(f"/v1/artifacts/{artifact['id']}", headers={**auth, "If-Match": if_match})
    assert response.status_code == status
    if status == 412:
        assert response.json()["error"]["code"] == "precondition_failed"


@pytest.mark.parametrize(("if_range", "status"), [(ETAG, 206), ('"other"', 200), (f"W/{ETAG}", 200),
                                                  ("Wed, 21 Oct 2015 07:28:00 GMT", 200)])
def test_range_is_honoured_only_when_if_range_names_the_etag(client, auth, artifact, if_range, status):
    response = client.get(f"/v1/artifacts/{artifact['id']}", headers={**auth, "Range": "bytes=0-9",
                                                                       "If-Range": if_range})
    assert response.status_code == status
    assert response.content == (PAYLOAD[:10] if status == 206 else PAYLOAD)


def test_head_answers_the_headers_of_a_get_without_a_body(client, auth, artifact):
    url = f"/v1/artifacts/{artifact['id']}"
    head, get = client.head(url, headers=auth), client.get(url, headers=auth)
    assert (head.status_code, head.content) == (200, b"")
    per_response = ("date", "x-request-id")
    assert {k: v for k, v in head.headers.items() if k not in per_response} == {
        k: v for k, v in get.headers.items() if k not in per_response}
    assert client.head(url, headers={**auth, "If-None-Match": ETAG}).status_code == 304
    assert client.head(url).status_code == 401
