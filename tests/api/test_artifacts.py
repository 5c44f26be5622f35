import base64
import hashlib
from datetime import timedelta

import pytest

from core.db.repositories import JobRuns
from core.db.session import session_scope
from core.storage import get_store

INT8 = {"type": "quantize"}
PAYLOAD = bytes(range(256)) * 40


@pytest.fixture()
def artifact(client, auth, upload, tmp_path) -> dict:
    """A finished job with a stored artifact, recorded through the worker's own repository calls."""
    model = upload()
    job_id = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [INT8]}, headers=auth).json()["id"]
    source = tmp_path / "model.zip"
    source.write_bytes(PAYLOAD)
    key = f"artifacts/{job_id}/model.zip"
    get_store().put_file(key, source)
    with session_scope() as session:
        runs = JobRuns(session)
        job = runs.claim(job_id, timedelta(seconds=60), max_attempts=1)  # a run holds the job it ends
        runs.succeed(job, {"size_ratio": 0.25}, {"name": "m-compressed.zip", "storage_key": key,
                                                  "sha256": hashlib.sha256(PAYLOAD).hexdigest(),
                                                  "size_bytes": len(PAYLOAD)})
    return client.get(f"/v1/jobs/{job_id}", headers=auth).json()["artifacts"][0]


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
